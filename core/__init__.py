"""The generic machinery every job shares: storage (fsspec), checkpoints (safetensors + JSON),
heartbeats, the metrics log, progress bars, EMA, the config base, the device policy and the one
training loop (``ddm.core.trainer.Trainer``) that experts, the router and the student specialise.

Nothing here knows about DiTs, routers or the coordinator: core imports none of expert/, router/ or
coordinator/; they all import core."""

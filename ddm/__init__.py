"""ddm: decentralized diffusion models (McAllister et al., CVPR 2025).

The code lives in the top-level folders ``core/``, ``expert/``, ``router/``, ``coordinator/`` and
``proto/``, installed as ``ddm.core``, ``ddm.expert``, ``ddm.router``, ``ddm.coordinator`` and ``ddm.proto``.
"""

import os

# Idle OpenMP threads spin by default, holding a core that another process (a second expert, a
# server, anyone's job) needs: on a busy 2-core machine a 2-thread training step then runs 5-15x
# slower (measured: SmallCNN step 2,190 ms spinning vs 172-412 ms passive, load average 8). Sleeping
# idle threads cost little on a quiet machine. Set before torch loads OpenMP (every ddm entry point,
# TorchX jobs included, imports ddm first); an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

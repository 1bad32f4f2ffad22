"""The expert gRPC server: one expert checkpoint behind ``ddm.v1.Expert`` with dynamic batching.

The checkpoint is loaded by itself (``expert.load``: the DiT config is in its metadata). While it loads
the port is already open: health reports NOT_SERVING and Predict/Info answer UNAVAILABLE, so an
orchestrator can tell "starting" from "gone". Then:

* Predict validates every field (INVALID_ARGUMENT naming it), queues the rows on a
  :class:`~ddm.expert.batching.DynamicBatcher` (RESOURCE_EXHAUSTED when too many are pending), waits
  no longer than the caller's deadline (a request whose deadline passed is dropped before compute:
  DEADLINE_EXCEEDED) and returns its own rows of the batched forward.
* Message limits come from ``max_batch`` x the size of one row, with headroom.
* Optional TLS (mutual with a client CA) and a bearer token (UNAUTHENTICATED without it).
* Prometheus metrics on an optional HTTP port: requests by code, rows, batch sizes, latency, queue.

The model runs on ``device`` (``core.device`` policy: ``auto`` is CUDA when present), announced once
loaded. Requests are decoded and batched on the host; each batched forward copies its rows to the
device once (pinned, non-blocking) and its velocities back once, so tensors cross only at the wire.
Inference is fp32 (TF32 matmuls on CUDA).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ddm.core import checkpoint, storage
from ddm.core.placement import Placement
from ddm.expert.batching import DynamicBatcher, Expired, QueueFull
from ddm.expert.denoiser import ModuleDenoiser
from ddm.expert.generation import read_generation
from ddm.expert.load import load_model
from ddm.expert.objectives import objective_of
from ddm.proto import rpc
from ddm.proto.ddm.v1 import ddm_pb2 as pb
from ddm.proto.ddm.v1 import ddm_pb2_grpc as pb_grpc
from ddm.proto.tensors import FLOATS, INTEGERS, TensorError, from_proto, to_proto

log = logging.getLogger(__name__)
SERVICE = "ddm.v1.Expert"


class ExpertMetrics:
    """Prometheus metrics of one server, in its own registry (several servers may share a process)."""

    def __init__(self, name: str):
        self.registry = CollectorRegistry()
        labels = dict(labelnames=["expert"], registry=self.registry)
        self.requests = Counter(
            "ddm_expert_requests", "Predict calls by status code", ["expert", "code"], registry=self.registry
        )
        self.rows = Counter("ddm_expert_rows", "rows computed", **labels)
        self.batches = Counter("ddm_expert_batches", "forward passes", **labels)
        self.batch_rows = Histogram(
            "ddm_expert_batch_rows",
            "rows per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            **labels,
        )
        self.forward_seconds = Histogram(
            "ddm_expert_forward_seconds", "time of one batched forward", **labels
        )
        self.latency = Histogram("ddm_expert_request_seconds", "Predict latency on the server", **labels)
        self.pending = Gauge("ddm_expert_pending_requests", "requests queued or being gathered", **labels)
        self.name = name

    def on_batch(self, rows: int, requests: int, seconds: float) -> None:
        self.rows.labels(self.name).inc(rows)
        self.batches.labels(self.name).inc()
        self.batch_rows.labels(self.name).observe(rows)
        self.forward_seconds.labels(self.name).observe(seconds)

    def on_request(self, code: grpc.StatusCode, seconds: float, pending: int) -> None:
        self.requests.labels(self.name, code.name).inc()
        self.latency.labels(self.name).observe(seconds)
        self.pending.labels(self.name).set(pending)


def _row_bytes(image_shape: tuple[int, int, int]) -> int:
    """Bytes one row takes in a Predict request: x_t in fp32, plus t (fp32) and y (int64)."""
    c, h, w = image_shape
    return c * h * w * 4 + 4 + 8


def expert_index_from_name(name: str) -> int:
    """``"expert-3"`` -> 3; -1 for anything else (a monolith)."""
    m = re.fullmatch(r"expert-(\d+)", name)
    return int(m.group(1)) if m else -1


class ExpertServer(rpc.LoadingServer):
    """Serves one expert checkpoint. ``start()`` opens the port at once and loads in the background."""

    SERVICE = SERVICE

    def __init__(
        self,
        checkpoint: str,
        *,
        address: str = "127.0.0.1:0",
        max_batch: int = 64,
        max_delay: float = 0.002,
        max_queue: int = 128,
        num_threads: int | None = None,
        tls: rpc.ServerTLS | None = None,
        token: str | None = None,
        metrics_port: int | None = None,
        name: str | None = None,
        expert_index: int | None = None,
        ema: bool = True,
        device: str | Placement = "cpu",
    ):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch}, {max_queue}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.placement = Placement.of(device)  # DeviceError (a ValueError) before any port opens
        super().__init__(address, tls=tls, token=token)
        self.checkpoint = checkpoint
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.num_threads = num_threads
        self.metrics_port = metrics_port
        self.ema = ema
        self._name = name
        self._expert_index = expert_index
        self.max_message = 0  # bytes, decided in start()
        self.metrics: ExpertMetrics | None = None
        self.batcher: DynamicBatcher | None = None
        self.info: pb.ExpertInfo | None = None

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self, *, wait: bool = True, timeout: float | None = None) -> ExpertServer:
        """Open the port, start loading; with ``wait`` block until loaded (raising the load error)."""
        self.max_message = self._message_limit_guess()
        self._serve(
            lambda server: pb_grpc.add_ExpertServicer_to_server(_ExpertServicer(self), server),
            workers=self.max_queue + 8,  # every pending request holds a handler thread; 8 for Info/health
            max_message=self.max_message,
            wait=wait,
            timeout=timeout,
        )
        return self

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls, let running ones finish within ``grace`` seconds, stop the worker."""
        super().stop(grace)
        if self.batcher is not None:
            self.batcher.close()

    # -- loading -----------------------------------------------------------------------------------------

    def _message_limit_guess(self) -> int:
        """Message limit from max_batch x one row, decided before the weights load (the port opens first).

        The row size comes from the checkpoint's JSON sidecar (cheap to read); without one, from the
        largest image an expert plausibly serves (3 x 256 x 256). ``_load`` checks the real size fits.
        """
        shape = (3, 256, 256)
        try:
            url = (
                self.checkpoint
                if self.checkpoint.endswith(".safetensors")
                else checkpoint.latest(self.checkpoint)
            )
            model = storage.read_json(url.removesuffix(".safetensors") + ".json")["model"] if url else None
            if model:
                shape = (int(model["in_channels"]), int(model["image_size"]), int(model["image_size"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # the real load below reports a bad checkpoint properly
        return rpc.message_limit(self.max_batch, _row_bytes(shape))

    def _load_model(self) -> tuple[torch.nn.Module, dict[str, Any]]:
        return load_model(self.checkpoint, ema=self.ema, device=self.placement.device)

    def _load(self) -> None:
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        model, meta = self._load_model()
        cfg = model.config
        # The wire carries velocities: an eps- or x0-expert's prediction is converted here, exactly
        # (ddm.expert.objectives), so the router never needs to know what is behind an expert.
        denoiser = ModuleDenoiser(model, model.num_classes, objective_of(meta, self.checkpoint).name)
        name = self._name or str(meta.get("name") or "expert")
        generation, lifecycle = read_generation(self.checkpoint)
        self.info = pb.ExpertInfo(
            name=name,
            expert_index=self._expert_index
            if self._expert_index is not None
            else expert_index_from_name(name),
            num_classes=model.num_classes,
            image_shape=[cfg.in_channels, cfg.image_size, cfg.image_size],
            arch=str(meta.get("arch") or ""),
            step=int(meta.get("step", 0)),
            checkpoint=str(meta.get("url", self.checkpoint)),
            max_batch=self.max_batch,
            objective=denoiser.objective.name,
            autoencoder=str((meta.get("latent") or {}).get("autoencoder", "")),
            time_shift=float(meta.get("time_shift") or 1.0),
            generation=generation,
            lifecycle=lifecycle,
        )
        row_bytes = _row_bytes((cfg.in_channels, cfg.image_size, cfg.image_size))
        if rpc.message_limit(self.max_batch, row_bytes) > self.max_message:
            raise ValueError(
                f"max_batch {self.max_batch} x {tuple(self.info.image_shape)} images exceed the server's "
                "message limit; lower --max-batch"
            )
        self.metrics = ExpertMetrics(name)
        to = self.placement.to

        @torch.inference_mode()
        def forward(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return denoiser.velocity(
                to(x_t), to(t), to(y)
            ).cpu()  # (B, C, H, W) back on the host for encoding

        self.batcher = DynamicBatcher(
            forward,
            max_batch=self.max_batch,
            max_delay=self.max_delay,
            max_queue=self.max_queue,
            on_batch=self.metrics.on_batch,
            name=f"{name}-batcher",
        )
        if self.metrics_port is not None:
            self._http = start_http_server(self.metrics_port, registry=self.metrics.registry)
        self.placement.announce(f"expert server: {name} ({self.info.arch or 'DiT'}, step {self.info.step})")
        log.info(
            "expert %s (%s, step %d) loaded from %s", name, self.info.arch, self.info.step, self.checkpoint
        )


class _ExpertServicer(pb_grpc.ExpertServicer):
    def __init__(self, server: ExpertServer):
        self.s = server

    def _require_ready(self, context: grpc.ServicerContext) -> None:
        self.s.abort_unless_ready(context, f"expert {self.s.checkpoint}")

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.ExpertInfo:
        self._require_ready(context)
        return self.s.info

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        self._require_ready(context)
        start = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        try:
            x_t, t, y = self._decode(request)
            remaining = rpc.remaining_time(context)  # None without a deadline
            deadline = None if remaining is None else time.monotonic() + remaining
            req = self.s.batcher.submit(x_t, t, y, deadline=deadline)
            context.add_callback(req.cancel)  # client cancelled: the worker skips it
            v = self.s.batcher.wait(req, remaining)
            return pb.PredictResponse(v=to_proto(v))
        except TensorError as e:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except QueueFull as e:
            code, message = (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"expert {self.s.info.name} is overloaded: {e}",
            )
        except Expired as e:
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, f"expert {self.s.info.name}: {e}"
        except Exception as e:  # a failed forward: a server bug, not the caller's
            log.exception("Predict failed")
            code, message = grpc.StatusCode.INTERNAL, f"expert {self.s.info.name}: forward failed: {e}"
        finally:
            self.s.metrics.on_request(code, time.perf_counter() - start, self.s.batcher.pending)
        context.abort(code, message)

    def _decode(self, request: pb.PredictRequest) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validated (x_t, t, y) as float32/float32/int64; TensorError names the bad field."""
        info = self.s.info
        c, h, w = info.image_shape
        x_t = from_proto(request.x_t, "x_t", dtypes=FLOATS, shape=(None, c, h, w))  # (N, C, H, W)
        n = x_t.shape[0]
        if not 1 <= n <= info.max_batch:
            raise TensorError("x_t", f"{n} rows; send 1..{info.max_batch} (ExpertInfo.max_batch) per request")
        t = from_proto(request.t, "t", dtypes=FLOATS, shape=(n,)).float()  # (N,)
        if bool((t < 0).any() or (t > 1).any()):
            raise TensorError(
                "t", f"times must lie in [0, 1], got range [{float(t.min())}, {float(t.max())}]"
            )
        y = from_proto(request.y, "y", dtypes=INTEGERS, shape=(n,)).long()  # (N,)
        if bool((y < 0).any() or (y > info.num_classes).any()):
            raise TensorError(
                "y",
                f"labels must lie in [0, {info.num_classes}] ({info.num_classes} = unconditional), "
                f"got range [{int(y.min())}, {int(y.max())}]",
            )
        return x_t.float(), t, y

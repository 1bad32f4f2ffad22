from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("x_t", "t", "y")
    X_T_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x_t: Tensor
    t: Tensor
    y: Tensor
    def __init__(self, x_t: _Optional[_Union[Tensor, _Mapping]] = ..., t: _Optional[_Union[Tensor, _Mapping]] = ..., y: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("v",)
    V_FIELD_NUMBER: _ClassVar[int]
    v: Tensor
    def __init__(self, v: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertInfo(_message.Message):
    __slots__ = ("name", "expert_index", "num_classes", "image_shape", "arch", "step", "checkpoint", "max_batch", "generation", "lifecycle", "autoencoder", "time_shift", "objective")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPERT_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LIFECYCLE_FIELD_NUMBER: _ClassVar[int]
    AUTOENCODER_FIELD_NUMBER: _ClassVar[int]
    TIME_SHIFT_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    name: str
    expert_index: int
    num_classes: int
    image_shape: _containers.RepeatedScalarFieldContainer[int]
    arch: str
    step: int
    checkpoint: str
    max_batch: int
    generation: int
    lifecycle: str
    autoencoder: str
    time_shift: float
    objective: str
    def __init__(self, name: _Optional[str] = ..., expert_index: _Optional[int] = ..., num_classes: _Optional[int] = ..., image_shape: _Optional[_Iterable[int]] = ..., arch: _Optional[str] = ..., step: _Optional[int] = ..., checkpoint: _Optional[str] = ..., max_batch: _Optional[int] = ..., generation: _Optional[int] = ..., lifecycle: _Optional[str] = ..., autoencoder: _Optional[str] = ..., time_shift: _Optional[float] = ..., objective: _Optional[str] = ...) -> None: ...

class ExpertGeneration(_message.Message):
    __slots__ = ("name", "generation", "lifecycle")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LIFECYCLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    generation: int
    lifecycle: str
    def __init__(self, name: _Optional[str] = ..., generation: _Optional[int] = ..., lifecycle: _Optional[str] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("n", "labels", "guidance", "steps", "sampler", "strategy", "top_k", "threshold", "seed", "time_shift", "churn", "allow_degraded", "include_float", "model", "time_grid", "guidance_mode", "route_every")
    N_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TIME_SHIFT_FIELD_NUMBER: _ClassVar[int]
    CHURN_FIELD_NUMBER: _ClassVar[int]
    ALLOW_DEGRADED_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FLOAT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIME_GRID_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_MODE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_EVERY_FIELD_NUMBER: _ClassVar[int]
    n: int
    labels: _containers.RepeatedScalarFieldContainer[int]
    guidance: float
    steps: int
    sampler: str
    strategy: str
    top_k: int
    threshold: float
    seed: int
    time_shift: float
    churn: float
    allow_degraded: bool
    include_float: bool
    model: str
    time_grid: str
    guidance_mode: str
    route_every: int
    def __init__(self, n: _Optional[int] = ..., labels: _Optional[_Iterable[int]] = ..., guidance: _Optional[float] = ..., steps: _Optional[int] = ..., sampler: _Optional[str] = ..., strategy: _Optional[str] = ..., top_k: _Optional[int] = ..., threshold: _Optional[float] = ..., seed: _Optional[int] = ..., time_shift: _Optional[float] = ..., churn: _Optional[float] = ..., allow_degraded: _Optional[bool] = ..., include_float: _Optional[bool] = ..., model: _Optional[str] = ..., time_grid: _Optional[str] = ..., guidance_mode: _Optional[str] = ..., route_every: _Optional[int] = ...) -> None: ...

class SampleEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: Result
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total", "t", "degraded_experts")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    t: float
    degraded_experts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., t: _Optional[float] = ..., degraded_experts: _Optional[_Iterable[str]] = ...) -> None: ...

class ExpertCalls(_message.Message):
    __slots__ = ("name", "calls", "rows")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    name: str
    calls: int
    rows: int
    def __init__(self, name: _Optional[str] = ..., calls: _Optional[int] = ..., rows: _Optional[int] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("images", "labels", "expert_calls", "seconds", "degraded_experts", "seed", "samples", "batched_with", "expert_generations")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_CALLS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BATCHED_WITH_FIELD_NUMBER: _ClassVar[int]
    EXPERT_GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    images: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    expert_calls: _containers.RepeatedCompositeFieldContainer[ExpertCalls]
    seconds: float
    degraded_experts: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    samples: Tensor
    batched_with: int
    expert_generations: _containers.RepeatedCompositeFieldContainer[ExpertGeneration]
    def __init__(self, images: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ..., expert_calls: _Optional[_Iterable[_Union[ExpertCalls, _Mapping]]] = ..., seconds: _Optional[float] = ..., degraded_experts: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., samples: _Optional[_Union[Tensor, _Mapping]] = ..., batched_with: _Optional[int] = ..., expert_generations: _Optional[_Iterable[_Union[ExpertGeneration, _Mapping]]] = ...) -> None: ...

class ListExpertsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertStatus(_message.Message):
    __slots__ = ("name", "address", "healthy", "info", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    healthy: bool
    info: ExpertInfo
    error: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., healthy: _Optional[bool] = ..., info: _Optional[_Union[ExpertInfo, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class ListExpertsResponse(_message.Message):
    __slots__ = ("experts",)
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertStatus]
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertStatus, _Mapping]]] = ...) -> None: ...

class RouterInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouterInfo(_message.Message):
    __slots__ = ("num_classes", "image_shape", "num_experts", "strategies", "samplers", "max_n", "max_steps", "default_strategy", "default_top_k", "default_steps", "default_guidance", "checkpoint", "ready", "models", "student_checkpoint", "down_experts", "time_grids", "guidance_modes", "default_guidance_mode", "default_route_every", "class_names", "output_shape", "autoencoder")
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    SAMPLERS_FIELD_NUMBER: _ClassVar[int]
    MAX_N_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOP_K_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    STUDENT_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    DOWN_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TIME_GRIDS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_MODES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_MODE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ROUTE_EVERY_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    AUTOENCODER_FIELD_NUMBER: _ClassVar[int]
    num_classes: int
    image_shape: _containers.RepeatedScalarFieldContainer[int]
    num_experts: int
    strategies: _containers.RepeatedScalarFieldContainer[str]
    samplers: _containers.RepeatedScalarFieldContainer[str]
    max_n: int
    max_steps: int
    default_strategy: str
    default_top_k: int
    default_steps: int
    default_guidance: float
    checkpoint: str
    ready: bool
    models: _containers.RepeatedScalarFieldContainer[str]
    student_checkpoint: str
    down_experts: _containers.RepeatedScalarFieldContainer[str]
    time_grids: _containers.RepeatedScalarFieldContainer[str]
    guidance_modes: _containers.RepeatedScalarFieldContainer[str]
    default_guidance_mode: str
    default_route_every: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    autoencoder: str
    def __init__(self, num_classes: _Optional[int] = ..., image_shape: _Optional[_Iterable[int]] = ..., num_experts: _Optional[int] = ..., strategies: _Optional[_Iterable[str]] = ..., samplers: _Optional[_Iterable[str]] = ..., max_n: _Optional[int] = ..., max_steps: _Optional[int] = ..., default_strategy: _Optional[str] = ..., default_top_k: _Optional[int] = ..., default_steps: _Optional[int] = ..., default_guidance: _Optional[float] = ..., checkpoint: _Optional[str] = ..., ready: _Optional[bool] = ..., models: _Optional[_Iterable[str]] = ..., student_checkpoint: _Optional[str] = ..., down_experts: _Optional[_Iterable[str]] = ..., time_grids: _Optional[_Iterable[str]] = ..., guidance_modes: _Optional[_Iterable[str]] = ..., default_guidance_mode: _Optional[str] = ..., default_route_every: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., output_shape: _Optional[_Iterable[int]] = ..., autoencoder: _Optional[str] = ...) -> None: ...

class ReplaceExpertRequest(_message.Message):
    __slots__ = ("expert", "address", "connect_timeout", "drain_timeout", "checkpoint")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CONNECT_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    expert: str
    address: str
    connect_timeout: float
    drain_timeout: float
    checkpoint: str
    def __init__(self, expert: _Optional[str] = ..., address: _Optional[str] = ..., connect_timeout: _Optional[float] = ..., drain_timeout: _Optional[float] = ..., checkpoint: _Optional[str] = ...) -> None: ...

class ReplaceExpertResponse(_message.Message):
    __slots__ = ("previous", "current", "previous_address", "switch_seconds", "drain_seconds", "drained")
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SWITCH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    previous: ExpertInfo
    current: ExpertInfo
    previous_address: str
    switch_seconds: float
    drain_seconds: float
    drained: bool
    def __init__(self, previous: _Optional[_Union[ExpertInfo, _Mapping]] = ..., current: _Optional[_Union[ExpertInfo, _Mapping]] = ..., previous_address: _Optional[str] = ..., switch_seconds: _Optional[float] = ..., drain_seconds: _Optional[float] = ..., drained: _Optional[bool] = ...) -> None: ...

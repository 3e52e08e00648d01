from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerLoad(_message.Message):
    __slots__ = ("num_free_pages", "num_total_pages", "num_running", "num_waiting", "expert_tokens", "expert_token_layers", "num_cached_pages", "num_swapped", "num_preemptions", "cache_bytes", "num_cached_images", "num_cache_hits", "num_cache_misses")
    NUM_FREE_PAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOTAL_PAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    EXPERT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_TOKEN_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_PAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_SWAPPED_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    num_free_pages: int
    num_total_pages: int
    num_running: int
    num_waiting: int
    expert_tokens: _containers.RepeatedScalarFieldContainer[int]
    expert_token_layers: _containers.RepeatedScalarFieldContainer[int]
    num_cached_pages: int
    num_swapped: int
    num_preemptions: int
    cache_bytes: int
    num_cached_images: int
    num_cache_hits: int
    num_cache_misses: int
    def __init__(self, num_free_pages: _Optional[int] = ..., num_total_pages: _Optional[int] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., expert_tokens: _Optional[_Iterable[int]] = ..., expert_token_layers: _Optional[_Iterable[int]] = ..., num_cached_pages: _Optional[int] = ..., num_swapped: _Optional[int] = ..., num_preemptions: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., num_cached_images: _Optional[int] = ..., num_cache_hits: _Optional[int] = ..., num_cache_misses: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("role", "worker_id", "address")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    role: str
    worker_id: str
    address: str
    def __init__(self, role: _Optional[str] = ..., worker_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("heartbeat_interval_s",)
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    def __init__(self, heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "load")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    load: WorkerLoad
    def __init__(self, worker_id: _Optional[str] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("worker_id", "timeout_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    timeout_s: float
    def __init__(self, worker_id: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("drained", "num_inflight")
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    NUM_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    drained: bool
    num_inflight: int
    def __init__(self, drained: _Optional[bool] = ..., num_inflight: _Optional[int] = ...) -> None: ...

class RemoveRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class RemoveResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("role", "worker_id", "address", "state", "load", "num_inflight", "num_served", "seconds_since_heartbeat", "num_pinned")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    NUM_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_SERVED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    NUM_PINNED_FIELD_NUMBER: _ClassVar[int]
    role: str
    worker_id: str
    address: str
    state: str
    load: WorkerLoad
    num_inflight: int
    num_served: int
    seconds_since_heartbeat: float
    num_pinned: int
    def __init__(self, role: _Optional[str] = ..., worker_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ..., num_inflight: _Optional[int] = ..., num_served: _Optional[int] = ..., seconds_since_heartbeat: _Optional[float] = ..., num_pinned: _Optional[int] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class MetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MetricsResponse(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: bytes
    def __init__(self, text: _Optional[bytes] = ...) -> None: ...

class ScaleRequest(_message.Message):
    __slots__ = ("pool_sizes",)
    class PoolSizesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    POOL_SIZES_FIELD_NUMBER: _ClassVar[int]
    pool_sizes: _containers.ScalarMap[str, int]
    def __init__(self, pool_sizes: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ScaleResponse(_message.Message):
    __slots__ = ("pool_sizes",)
    class PoolSizesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    POOL_SIZES_FIELD_NUMBER: _ClassVar[int]
    pool_sizes: _containers.ScalarMap[str, int]
    def __init__(self, pool_sizes: _Optional[_Mapping[str, int]] = ...) -> None: ...

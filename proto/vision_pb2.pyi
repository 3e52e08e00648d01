from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodedImage(_message.Message):
    __slots__ = ("width", "height", "rgb")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    RGB_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    rgb: bytes
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., rgb: _Optional[bytes] = ...) -> None: ...

class ImageInput(_message.Message):
    __slots__ = ("data", "decoded")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DECODED_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    decoded: DecodedImage
    def __init__(self, data: _Optional[bytes] = ..., decoded: _Optional[_Union[DecodedImage, _Mapping]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "images")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[ImageInput]
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[ImageInput, _Mapping]]] = ...) -> None: ...

class ImageHandle(_message.Message):
    __slots__ = ("content_hash", "num_tokens")
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    content_hash: str
    num_tokens: int
    def __init__(self, content_hash: _Optional[str] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class EncodeResult(_message.Message):
    __slots__ = ("handle", "error")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    handle: ImageHandle
    error: str
    def __init__(self, handle: _Optional[_Union[ImageHandle, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EncodeResult]
    def __init__(self, results: _Optional[_Iterable[_Union[EncodeResult, _Mapping]]] = ...) -> None: ...

class ImageRefs(_message.Message):
    __slots__ = ("vision_address", "images")
    VISION_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    vision_address: str
    images: _containers.RepeatedCompositeFieldContainer[ImageHandle]
    def __init__(self, vision_address: _Optional[str] = ..., images: _Optional[_Iterable[_Union[ImageHandle, _Mapping]]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("content_hashes",)
    CONTENT_HASHES_FIELD_NUMBER: _ClassVar[int]
    content_hashes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, content_hashes: _Optional[_Iterable[str]] = ...) -> None: ...

class EmbeddingChunk(_message.Message):
    __slots__ = ("image_index", "shape", "dtype", "row_start", "data")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    row_start: int
    data: bytes
    def __init__(self, image_index: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., row_start: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("num_released",)
    NUM_RELEASED_FIELD_NUMBER: _ClassVar[int]
    num_released: int
    def __init__(self, num_released: _Optional[int] = ...) -> None: ...

class VisionStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VisionStatus(_message.Message):
    __slots__ = ("worker_id", "state", "cache_bytes", "max_cache_bytes", "num_cached_images", "num_hits", "num_misses", "num_pinned_images", "num_waiting")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_HITS_FIELD_NUMBER: _ClassVar[int]
    NUM_MISSES_FIELD_NUMBER: _ClassVar[int]
    NUM_PINNED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    state: str
    cache_bytes: int
    max_cache_bytes: int
    num_cached_images: int
    num_hits: int
    num_misses: int
    num_pinned_images: int
    num_waiting: int
    def __init__(self, worker_id: _Optional[str] = ..., state: _Optional[str] = ..., cache_bytes: _Optional[int] = ..., max_cache_bytes: _Optional[int] = ..., num_cached_images: _Optional[int] = ..., num_hits: _Optional[int] = ..., num_misses: _Optional[int] = ..., num_pinned_images: _Optional[int] = ..., num_waiting: _Optional[int] = ...) -> None: ...

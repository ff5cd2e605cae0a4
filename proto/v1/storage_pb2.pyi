from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FileInfo(_message.Message):
    __slots__ = ("path", "version", "size", "sha256", "created", "deleted", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    path: str
    version: int
    size: int
    sha256: str
    created: float
    deleted: bool
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, path: _Optional[str] = ..., version: _Optional[int] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., created: _Optional[float] = ..., deleted: _Optional[bool] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class WriteRequest(_message.Message):
    __slots__ = ("path", "data", "metadata", "index", "owner")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    path: str
    data: bytes
    metadata: _containers.ScalarMap[str, str]
    index: bool
    owner: str
    def __init__(self, path: _Optional[str] = ..., data: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ..., index: _Optional[bool] = ..., owner: _Optional[str] = ...) -> None: ...

class ReadRequest(_message.Message):
    __slots__ = ("path", "version", "owner")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    path: str
    version: int
    owner: str
    def __init__(self, path: _Optional[str] = ..., version: _Optional[int] = ..., owner: _Optional[str] = ...) -> None: ...

class ReadReply(_message.Message):
    __slots__ = ("info", "data")
    INFO_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    info: FileInfo
    data: bytes
    def __init__(self, info: _Optional[_Union[FileInfo, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class StatRequest(_message.Message):
    __slots__ = ("path", "version", "owner")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    path: str
    version: int
    owner: str
    def __init__(self, path: _Optional[str] = ..., version: _Optional[int] = ..., owner: _Optional[str] = ...) -> None: ...

class ListFilesRequest(_message.Message):
    __slots__ = ("prefix", "owner")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    owner: str
    def __init__(self, prefix: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class ListFilesReply(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[FileInfo]
    def __init__(self, files: _Optional[_Iterable[_Union[FileInfo, _Mapping]]] = ...) -> None: ...

class DeleteFileRequest(_message.Message):
    __slots__ = ("path", "owner")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    path: str
    owner: str
    def __init__(self, path: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("path", "owner")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    path: str
    owner: str
    def __init__(self, path: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("path", "version", "owner")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    path: str
    version: int
    owner: str
    def __init__(self, path: _Optional[str] = ..., version: _Optional[int] = ..., owner: _Optional[str] = ...) -> None: ...

class SearchFilesRequest(_message.Message):
    __slots__ = ("query", "k", "owner")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    query: str
    k: int
    owner: str
    def __init__(self, query: _Optional[str] = ..., k: _Optional[int] = ..., owner: _Optional[str] = ...) -> None: ...

class FileHit(_message.Message):
    __slots__ = ("path", "version", "snippet", "distance")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SNIPPET_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    path: str
    version: int
    snippet: str
    distance: float
    def __init__(self, path: _Optional[str] = ..., version: _Optional[int] = ..., snippet: _Optional[str] = ..., distance: _Optional[float] = ...) -> None: ...

class SearchFilesReply(_message.Message):
    __slots__ = ("hits",)
    HITS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[FileHit]
    def __init__(self, hits: _Optional[_Iterable[_Union[FileHit, _Mapping]]] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MemoryItem(_message.Message):
    __slots__ = ("id", "text", "metadata", "created")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    metadata: _containers.ScalarMap[str, str]
    created: float
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., created: _Optional[float] = ...) -> None: ...

class AddMemoryRequest(_message.Message):
    __slots__ = ("items", "namespace")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[MemoryItem]
    namespace: str
    def __init__(self, items: _Optional[_Iterable[_Union[MemoryItem, _Mapping]]] = ..., namespace: _Optional[str] = ...) -> None: ...

class AddMemoryReply(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SearchMemoryRequest(_message.Message):
    __slots__ = ("query", "k", "where", "namespace")
    class WhereEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    QUERY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    query: str
    k: int
    where: _containers.ScalarMap[str, str]
    namespace: str
    def __init__(self, query: _Optional[str] = ..., k: _Optional[int] = ..., where: _Optional[_Mapping[str, str]] = ..., namespace: _Optional[str] = ...) -> None: ...

class MemoryHit(_message.Message):
    __slots__ = ("item", "distance")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    item: MemoryItem
    distance: float
    def __init__(self, item: _Optional[_Union[MemoryItem, _Mapping]] = ..., distance: _Optional[float] = ...) -> None: ...

class SearchMemoryReply(_message.Message):
    __slots__ = ("hits",)
    HITS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[MemoryHit]
    def __init__(self, hits: _Optional[_Iterable[_Union[MemoryHit, _Mapping]]] = ...) -> None: ...

class GetMemoryRequest(_message.Message):
    __slots__ = ("ids", "namespace")
    IDS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    namespace: str
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., namespace: _Optional[str] = ...) -> None: ...

class GetMemoryReply(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[MemoryItem]
    def __init__(self, items: _Optional[_Iterable[_Union[MemoryItem, _Mapping]]] = ...) -> None: ...

class UpdateMemoryRequest(_message.Message):
    __slots__ = ("id", "text", "metadata", "replace_metadata", "namespace")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REPLACE_METADATA_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    metadata: _containers.ScalarMap[str, str]
    replace_metadata: bool
    namespace: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., replace_metadata: _Optional[bool] = ..., namespace: _Optional[str] = ...) -> None: ...

class DeleteMemoryRequest(_message.Message):
    __slots__ = ("ids", "namespace")
    IDS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    namespace: str
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., namespace: _Optional[str] = ...) -> None: ...

class DeleteMemoryReply(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class ContextInfo(_message.Message):
    __slots__ = ("context_id", "budget_tokens", "summarize", "blocks", "evicted", "created", "model")
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SUMMARIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    budget_tokens: int
    summarize: bool
    blocks: int
    evicted: int
    created: float
    model: str
    def __init__(self, context_id: _Optional[str] = ..., budget_tokens: _Optional[int] = ..., summarize: _Optional[bool] = ..., blocks: _Optional[int] = ..., evicted: _Optional[int] = ..., created: _Optional[float] = ..., model: _Optional[str] = ...) -> None: ...

class CreateContextRequest(_message.Message):
    __slots__ = ("context_id", "budget_tokens", "summarize", "system", "model")
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SUMMARIZE_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    budget_tokens: int
    summarize: bool
    system: str
    model: str
    def __init__(self, context_id: _Optional[str] = ..., budget_tokens: _Optional[int] = ..., summarize: _Optional[bool] = ..., system: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class ListContextsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListContextsReply(_message.Message):
    __slots__ = ("contexts",)
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    contexts: _containers.RepeatedCompositeFieldContainer[ContextInfo]
    def __init__(self, contexts: _Optional[_Iterable[_Union[ContextInfo, _Mapping]]] = ...) -> None: ...

class ContextRef(_message.Message):
    __slots__ = ("context_id",)
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    def __init__(self, context_id: _Optional[str] = ...) -> None: ...

class ContextBlock(_message.Message):
    __slots__ = ("block_id", "role", "content", "pinned", "kind", "label", "seq", "tokens")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    role: str
    content: str
    pinned: bool
    kind: str
    label: str
    seq: int
    tokens: int
    def __init__(self, block_id: _Optional[str] = ..., role: _Optional[str] = ..., content: _Optional[str] = ..., pinned: _Optional[bool] = ..., kind: _Optional[str] = ..., label: _Optional[str] = ..., seq: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class ListBlocksReply(_message.Message):
    __slots__ = ("blocks", "tokens")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[ContextBlock]
    tokens: int
    def __init__(self, blocks: _Optional[_Iterable[_Union[ContextBlock, _Mapping]]] = ..., tokens: _Optional[int] = ...) -> None: ...

class AddBlockRequest(_message.Message):
    __slots__ = ("context_id", "role", "content", "pinned", "label")
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    role: str
    content: str
    pinned: bool
    label: str
    def __init__(self, context_id: _Optional[str] = ..., role: _Optional[str] = ..., content: _Optional[str] = ..., pinned: _Optional[bool] = ..., label: _Optional[str] = ...) -> None: ...

class EditBlockRequest(_message.Message):
    __slots__ = ("context_id", "block_id", "content", "pinned")
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    block_id: str
    content: str
    pinned: bool
    def __init__(self, context_id: _Optional[str] = ..., block_id: _Optional[str] = ..., content: _Optional[str] = ..., pinned: _Optional[bool] = ...) -> None: ...

class BlockRef(_message.Message):
    __slots__ = ("context_id", "block_id")
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    block_id: str
    def __init__(self, context_id: _Optional[str] = ..., block_id: _Optional[str] = ...) -> None: ...

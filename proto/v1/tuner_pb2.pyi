from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class FeedbackRequest(_message.Message):
    __slots__ = ("request_id", "reward", "success", "note")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reward: float
    success: bool
    note: str
    def __init__(self, request_id: _Optional[str] = ..., reward: _Optional[float] = ..., success: _Optional[bool] = ..., note: _Optional[str] = ...) -> None: ...

class FeedbackReply(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: int
    def __init__(self, outcomes: _Optional[int] = ...) -> None: ...

class BuildDatasetRequest(_message.Message):
    __slots__ = ("name", "kind", "min_reward", "eval_fraction")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MIN_REWARD_FIELD_NUMBER: _ClassVar[int]
    EVAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    min_reward: float
    eval_fraction: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., min_reward: _Optional[float] = ..., eval_fraction: _Optional[float] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("name", "train", "eval", "version", "card_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    train: int
    eval: int
    version: int
    card_json: str
    def __init__(self, name: _Optional[str] = ..., train: _Optional[int] = ..., eval: _Optional[int] = ..., version: _Optional[int] = ..., card_json: _Optional[str] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ContinualRequest(_message.Message):
    __slots__ = ("spec_json",)
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    spec_json: str
    def __init__(self, spec_json: _Optional[str] = ...) -> None: ...

class ContinualState(_message.Message):
    __slots__ = ("state_json",)
    STATE_JSON_FIELD_NUMBER: _ClassVar[int]
    state_json: str
    def __init__(self, state_json: _Optional[str] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("request_id", "reward", "success", "note", "preferred")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reward: float
    success: bool
    note: str
    preferred: str
    def __init__(self, request_id: _Optional[str] = ..., reward: _Optional[float] = ..., success: _Optional[bool] = ..., note: _Optional[str] = ..., preferred: _Optional[str] = ...) -> None: ...

class FeedbackReply(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: int
    def __init__(self, outcomes: _Optional[int] = ...) -> None: ...

class RagItem(_message.Message):
    __slots__ = ("question", "oracle_id", "answer")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    ORACLE_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    question: str
    oracle_id: str
    answer: str
    def __init__(self, question: _Optional[str] = ..., oracle_id: _Optional[str] = ..., answer: _Optional[str] = ...) -> None: ...

class BuildDatasetRequest(_message.Message):
    __slots__ = ("name", "kind", "min_reward", "eval_fraction", "samples", "reward_regex", "temperature", "model", "max_tokens", "items", "distractors", "oracle_fraction", "seed", "reward", "adapter")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MIN_REWARD_FIELD_NUMBER: _ClassVar[int]
    EVAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    REWARD_REGEX_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DISTRACTORS_FIELD_NUMBER: _ClassVar[int]
    ORACLE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    min_reward: float
    eval_fraction: float
    samples: int
    reward_regex: str
    temperature: float
    model: str
    max_tokens: int
    items: _containers.RepeatedCompositeFieldContainer[RagItem]
    distractors: int
    oracle_fraction: float
    seed: int
    reward: str
    adapter: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., min_reward: _Optional[float] = ..., eval_fraction: _Optional[float] = ..., samples: _Optional[int] = ..., reward_regex: _Optional[str] = ..., temperature: _Optional[float] = ..., model: _Optional[str] = ..., max_tokens: _Optional[int] = ..., items: _Optional[_Iterable[_Union[RagItem, _Mapping]]] = ..., distractors: _Optional[int] = ..., oracle_fraction: _Optional[float] = ..., seed: _Optional[int] = ..., reward: _Optional[str] = ..., adapter: _Optional[str] = ...) -> None: ...

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

class FinetuneRequest(_message.Message):
    __slots__ = ("name", "dataset", "model", "config_json", "set_default", "min_improvement", "method", "start_from")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SET_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    MIN_IMPROVEMENT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    START_FROM_FIELD_NUMBER: _ClassVar[int]
    name: str
    dataset: str
    model: str
    config_json: str
    set_default: bool
    min_improvement: float
    method: str
    start_from: str
    def __init__(self, name: _Optional[str] = ..., dataset: _Optional[str] = ..., model: _Optional[str] = ..., config_json: _Optional[str] = ..., set_default: _Optional[bool] = ..., min_improvement: _Optional[float] = ..., method: _Optional[str] = ..., start_from: _Optional[str] = ...) -> None: ...

class JobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("all_agents",)
    ALL_AGENTS_FIELD_NUMBER: _ClassVar[int]
    all_agents: bool
    def __init__(self, all_agents: _Optional[bool] = ...) -> None: ...

class Eval(_message.Message):
    __slots__ = ("loss", "accuracy", "examples")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    loss: float
    accuracy: float
    examples: int
    def __init__(self, loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., examples: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "owner", "name", "dataset", "model", "state", "step", "total_steps", "loss", "steps_per_s", "eta_s", "base", "tuned", "adapter", "version", "message", "peak_rss_mb", "created", "started", "finished", "config_json", "resumed_from_step", "method", "retention_json", "start_from")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    TUNED_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_MB_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RETENTION_JSON_FIELD_NUMBER: _ClassVar[int]
    START_FROM_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    owner: str
    name: str
    dataset: str
    model: str
    state: str
    step: int
    total_steps: int
    loss: float
    steps_per_s: float
    eta_s: float
    base: Eval
    tuned: Eval
    adapter: str
    version: int
    message: str
    peak_rss_mb: float
    created: float
    started: float
    finished: float
    config_json: str
    resumed_from_step: int
    method: str
    retention_json: str
    start_from: str
    def __init__(self, job_id: _Optional[str] = ..., owner: _Optional[str] = ..., name: _Optional[str] = ..., dataset: _Optional[str] = ..., model: _Optional[str] = ..., state: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., steps_per_s: _Optional[float] = ..., eta_s: _Optional[float] = ..., base: _Optional[_Union[Eval, _Mapping]] = ..., tuned: _Optional[_Union[Eval, _Mapping]] = ..., adapter: _Optional[str] = ..., version: _Optional[int] = ..., message: _Optional[str] = ..., peak_rss_mb: _Optional[float] = ..., created: _Optional[float] = ..., started: _Optional[float] = ..., finished: _Optional[float] = ..., config_json: _Optional[str] = ..., resumed_from_step: _Optional[int] = ..., method: _Optional[str] = ..., retention_json: _Optional[str] = ..., start_from: _Optional[str] = ...) -> None: ...

class JobList(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("name", "owner", "version", "model", "base", "tuned", "job_id", "created", "loaded", "is_default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    TUNED_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    owner: str
    version: int
    model: str
    base: Eval
    tuned: Eval
    job_id: str
    created: float
    loaded: bool
    is_default: bool
    def __init__(self, name: _Optional[str] = ..., owner: _Optional[str] = ..., version: _Optional[int] = ..., model: _Optional[str] = ..., base: _Optional[_Union[Eval, _Mapping]] = ..., tuned: _Optional[_Union[Eval, _Mapping]] = ..., job_id: _Optional[str] = ..., created: _Optional[float] = ..., loaded: _Optional[bool] = ..., is_default: _Optional[bool] = ...) -> None: ...

class AdapterList(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    def __init__(self, adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ...) -> None: ...

class DefaultAdapterRequest(_message.Message):
    __slots__ = ("model", "adapter")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    model: str
    adapter: str
    def __init__(self, model: _Optional[str] = ..., adapter: _Optional[str] = ...) -> None: ...

class DefaultAdapterReply(_message.Message):
    __slots__ = ("model", "adapter")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    model: str
    adapter: str
    def __init__(self, model: _Optional[str] = ..., adapter: _Optional[str] = ...) -> None: ...

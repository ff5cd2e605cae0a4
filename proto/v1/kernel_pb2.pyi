from . import tuner_pb2 as _tuner_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("name", "description", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("agent_id", "token")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    token: str
    def __init__(self, agent_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("server_time",)
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    server_time: float
    def __init__(self, server_time: _Optional[float] = ...) -> None: ...

class ExitRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExitReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ("include_exited",)
    INCLUDE_EXITED_FIELD_NUMBER: _ClassVar[int]
    include_exited: bool
    def __init__(self, include_exited: _Optional[bool] = ...) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("agent_id", "name", "description", "labels", "state", "registered_at", "last_seen", "syscalls", "prompt_tokens", "completion_tokens")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    SYSCALLS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    name: str
    description: str
    labels: _containers.ScalarMap[str, str]
    state: str
    registered_at: float
    last_seen: float
    syscalls: int
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, agent_id: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., state: _Optional[str] = ..., registered_at: _Optional[float] = ..., last_seen: _Optional[float] = ..., syscalls: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class ListAgentsReply(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentInfo]
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentInfo, _Mapping]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RequestStats(_message.Message):
    __slots__ = ("request_id", "agent_id", "model", "state", "prompt_tokens", "generated_tokens", "age_ms", "preemptions", "priority", "cache_bytes", "program_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AGE_MS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    agent_id: str
    model: str
    state: str
    prompt_tokens: int
    generated_tokens: int
    age_ms: float
    preemptions: int
    priority: int
    cache_bytes: int
    program_id: str
    def __init__(self, request_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., model: _Optional[str] = ..., state: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., age_ms: _Optional[float] = ..., preemptions: _Optional[int] = ..., priority: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., program_id: _Optional[str] = ...) -> None: ...

class ModelStats(_message.Message):
    __slots__ = ("name", "architecture", "device", "dtype", "adapters", "parameters", "running", "waiting", "completed", "prompt_tokens", "generated_tokens", "decode_steps", "tokens_per_s", "mean_batch_size", "cache_bytes", "requests", "cancelled", "policy", "context_switches", "switch_ms", "swaps", "recomputes", "preempted", "suspended", "cache_budget_bytes", "preempted_by_reason", "queue_wait_ms", "resident_bytes", "resident_entries", "prefix_lookups", "prefix_hits", "prefix_tokens_reused", "tool_pauses", "draft_tokens", "draft_accepted")
    class PreemptedByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ToolPausesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_SWITCHES_FIELD_NUMBER: _ClassVar[int]
    SWITCH_MS_FIELD_NUMBER: _ClassVar[int]
    SWAPS_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTES_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    SUSPENDED_FIELD_NUMBER: _ClassVar[int]
    CACHE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HITS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_REUSED_FIELD_NUMBER: _ClassVar[int]
    TOOL_PAUSES_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: str
    device: str
    dtype: str
    adapters: _containers.RepeatedScalarFieldContainer[str]
    parameters: int
    running: int
    waiting: int
    completed: int
    prompt_tokens: int
    generated_tokens: int
    decode_steps: int
    tokens_per_s: float
    mean_batch_size: float
    cache_bytes: int
    requests: _containers.RepeatedCompositeFieldContainer[RequestStats]
    cancelled: int
    policy: str
    context_switches: int
    switch_ms: float
    swaps: int
    recomputes: int
    preempted: int
    suspended: int
    cache_budget_bytes: int
    preempted_by_reason: _containers.ScalarMap[str, int]
    queue_wait_ms: float
    resident_bytes: int
    resident_entries: int
    prefix_lookups: int
    prefix_hits: int
    prefix_tokens_reused: int
    tool_pauses: _containers.ScalarMap[str, int]
    draft_tokens: int
    draft_accepted: int
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., adapters: _Optional[_Iterable[str]] = ..., parameters: _Optional[int] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., completed: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., decode_steps: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., mean_batch_size: _Optional[float] = ..., cache_bytes: _Optional[int] = ..., requests: _Optional[_Iterable[_Union[RequestStats, _Mapping]]] = ..., cancelled: _Optional[int] = ..., policy: _Optional[str] = ..., context_switches: _Optional[int] = ..., switch_ms: _Optional[float] = ..., swaps: _Optional[int] = ..., recomputes: _Optional[int] = ..., preempted: _Optional[int] = ..., suspended: _Optional[int] = ..., cache_budget_bytes: _Optional[int] = ..., preempted_by_reason: _Optional[_Mapping[str, int]] = ..., queue_wait_ms: _Optional[float] = ..., resident_bytes: _Optional[int] = ..., resident_entries: _Optional[int] = ..., prefix_lookups: _Optional[int] = ..., prefix_hits: _Optional[int] = ..., prefix_tokens_reused: _Optional[int] = ..., tool_pauses: _Optional[_Mapping[str, int]] = ..., draft_tokens: _Optional[int] = ..., draft_accepted: _Optional[int] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("version", "uptime_s", "active_agents", "syscalls", "in_flight", "models", "default_model", "tuner_jobs", "programs", "node_id", "nodes", "forwarded", "served_for_unreachable")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_AGENTS_FIELD_NUMBER: _ClassVar[int]
    SYSCALLS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    TUNER_JOBS_FIELD_NUMBER: _ClassVar[int]
    PROGRAMS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_FIELD_NUMBER: _ClassVar[int]
    SERVED_FOR_UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    version: str
    uptime_s: float
    active_agents: int
    syscalls: int
    in_flight: int
    models: _containers.RepeatedCompositeFieldContainer[ModelStats]
    default_model: str
    tuner_jobs: _containers.RepeatedCompositeFieldContainer[_tuner_pb2.Job]
    programs: _containers.RepeatedCompositeFieldContainer[ProgramStats]
    node_id: str
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    forwarded: int
    served_for_unreachable: int
    def __init__(self, version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., active_agents: _Optional[int] = ..., syscalls: _Optional[int] = ..., in_flight: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelStats, _Mapping]]] = ..., default_model: _Optional[str] = ..., tuner_jobs: _Optional[_Iterable[_Union[_tuner_pb2.Job, _Mapping]]] = ..., programs: _Optional[_Iterable[_Union[ProgramStats, _Mapping]]] = ..., node_id: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., forwarded: _Optional[int] = ..., served_for_unreachable: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "grpc_address", "http_address", "models", "state", "alive", "heartbeat_age_s", "uptime_s")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HTTP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    grpc_address: str
    http_address: str
    models: _containers.RepeatedScalarFieldContainer[str]
    state: str
    alive: bool
    heartbeat_age_s: float
    uptime_s: float
    def __init__(self, node_id: _Optional[str] = ..., grpc_address: _Optional[str] = ..., http_address: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., state: _Optional[str] = ..., alive: _Optional[bool] = ..., heartbeat_age_s: _Optional[float] = ..., uptime_s: _Optional[float] = ...) -> None: ...

class ProgramStats(_message.Message):
    __slots__ = ("program_id", "agent_id", "state", "service_tokens", "calls", "tool_pauses", "tool_pause_s", "age_s", "paused_on")
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    TOOL_PAUSES_FIELD_NUMBER: _ClassVar[int]
    TOOL_PAUSE_S_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    PAUSED_ON_FIELD_NUMBER: _ClassVar[int]
    program_id: str
    agent_id: str
    state: str
    service_tokens: int
    calls: int
    tool_pauses: int
    tool_pause_s: float
    age_s: float
    paused_on: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, program_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., state: _Optional[str] = ..., service_tokens: _Optional[int] = ..., calls: _Optional[int] = ..., tool_pauses: _Optional[int] = ..., tool_pause_s: _Optional[float] = ..., age_s: _Optional[float] = ..., paused_on: _Optional[_Iterable[str]] = ...) -> None: ...

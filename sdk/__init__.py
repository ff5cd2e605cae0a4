"""Kernos SDK: the thin client agent apps use to issue syscalls to a running kernel.

    import kernos.sdk
    with kernos.sdk.connect("127.0.0.1:7070", agent="researcher") as s:
        print(s.llm.chat("What is the capital of France?", max_tokens=32).text)

Depends on grpcio, protobuf and pydantic only: never torch. `kernos.sdk.aio` is the asyncio twin.
"""

from . import aio
from ._wire import to_dict
from .client import Session, connect
from .errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    KernosError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .functions import run_tools
from .types import (
    AdapterInfo,
    AgentInfo,
    Choice,
    Chunk,
    Completion,
    ContextBlock,
    ContextInfo,
    EvalResult,
    FileHit,
    FileInfo,
    GrantInfo,
    JobInfo,
    MemoryItem,
    Message,
    ModelInfo,
    PromptLogprob,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolResult,
    ToolRun,
)

__all__ = [
    "to_dict",
    "Choice",
    "TokenLogprob",
    "run_tools",
    "ToolCall",
    "ToolCallDelta",
    "ToolRun",
    "connect",
    "Session",
    "aio",
    "AdapterInfo",
    "JobInfo",
    "EvalResult",
    "Completion",
    "PromptLogprob",
    "Chunk",
    "FileInfo",
    "FileHit",
    "GrantInfo",
    "ToolResult",
    "MemoryItem",
    "ContextInfo",
    "ContextBlock",
    "Message",
    "ModelInfo",
    "AgentInfo",
    "KernosError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "Unauthenticated",
    "ResourceExhausted",
    "FailedPrecondition",
    "Unavailable",
    "DeadlineExceeded",
    "Internal",
]

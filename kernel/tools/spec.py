"""What a tool is and what one call of it is."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


def schema(props: dict, required: list[str]) -> dict:
    """A closed JSON schema of an object's arguments."""
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


@dataclass
class ToolSpec:
    """A tool an agent registers: Python run in the sandbox, its JSON schema (a string), and its limits
    (0: the default)."""
    name: str
    code: str
    schema_json: str = ""
    description: str = ""
    irreversible: bool = False
    public: bool = False
    timeout_s: float = 0
    max_concurrency: int = 0
    cpu_s: float = 0
    memory_mb: int = 0


@dataclass
class Tool:
    name: str
    description: str
    schema: dict
    owner: str = "kernel"
    code: str = ""
    irreversible: bool = False
    timeout_s: float = 10.0
    max_concurrency: int = 4
    cpu_s: float = 5.0
    memory_mb: int = 256
    public: bool = True
    builtin: object = None           # async fn(tools, principal, args) for built-ins (and mounted MCP tools)
    source: str = ""                 # "mcp:SERVER" for a mounted MCP server's tools, "builtin" for `python`
    semaphore: asyncio.Semaphore | None = None

    @property
    def kernels_own(self) -> bool:
        """Built in, or a mounted MCP server's: made by the kernel at each start, never stored or removed."""
        return self.builtin is not None or bool(self.source)

    @property
    def key(self) -> str:
        """Where it lives: public tools in the one shared namespace ("name"), private ones in their owner's
        ("owner/name"), so that a private name never clashes with, or shows through, anyone else's."""
        return self.name if self.public else f"{self.owner}/{self.name}"

    def name_for(self, principal) -> str:
        """The name `principal` calls it by: its own and public tools by name, others' by "owner/name"."""
        return self.name if self.public or self.owner == principal.agent_id else self.key


@dataclass
class Call:
    call_id: str
    tool: str
    principal: object                # who called: its calls run (and are accounted) as that principal
    args: dict
    state: str = "pending"           # pending -> done | error | denied
    result: object = None
    error: str = ""
    started: float = field(default_factory=time.monotonic)
    duration_ms: float = 0.0
    decided: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def agent_id(self) -> str:
        return self.principal.agent_id

"""Kernel configuration: one TOML file validated by pydantic, every field defaulted, `KERNOS_*` overrides.

Environment overrides name a field by its path, sections joined by a double underscore:
`KERNOS_DATA_DIR=/srv/kernos`, `KERNOS_SERVER__LISTEN=0.0.0.0:7070`, `KERNOS_ENGINE__MAX_BATCH_SIZE=16`.
Values are parsed as TOML literals when they can be (numbers, booleans, arrays), else taken as strings.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import tomllib
from pydantic import Field, ValidationError, field_validator, model_validator

from .cluster.config import ClusterConfig
from .llm.settings import EMBEDDED_MODEL, EngineConfig, ModelConfig, VllmArgs, _Strict

__all__ = ["EMBEDDED_MODEL", "ConfigError", "EngineConfig", "KernelConfig", "ModelConfig", "VllmArgs",
           "load_config"]


class ServerConfig(_Strict):
    listen: str = Field("127.0.0.1:7070", description="host:port for TCP, or unix:/path/kernos.sock")
    http_listen: str = Field("127.0.0.1:7071", pattern=r"^(|\[?[A-Za-z0-9.:-]*\]?:\d{1,5})$",
                             description="host:port of the OpenAI-compatible HTTP API (/v1); empty: off")
    socket_mode: int = Field(0o660, ge=0, le=0o777, description="file mode of a Unix socket (owner and group only)")
    tls_cert: Path | None = Field(None, description="server certificate (PEM): TLS on the TCP port")
    tls_key: Path | None = Field(None, description="its private key (PEM)")
    tls_client_ca: Path | None = Field(None, description="CA (PEM) that client certificates must chain to: mTLS")
    max_message_bytes: int = Field(32 * 1024 * 1024, gt=1024, description="largest gRPC message accepted")
    max_http_body_bytes: int = Field(32 << 20, gt=1024, description="largest HTTP body, checked before it is read")
    http_body_timeout_s: float = Field(30.0, gt=0, description="an HTTP request's head, then its body, must each "
                                                               "arrive within this (closed; 408 for a body)")
    drain_timeout_s: float = Field(30.0, ge=0, description="SIGTERM waits this long for in-flight generations")
    agent_ttl_s: float = Field(600.0, gt=0, description="an agent silent this long is idle (its session ends; "
                                                       "its name and token stay its own)")
    admin_token: str | None = Field(
        None, min_length=16, description="an operator token; or: kernos token create --admin"
    )
    reflection: bool = True
    metrics_public: bool = Field(False, description="serve GET /metrics without an operator token")
    console: bool = Field(True, description="the operator console at /console on the HTTP server")
    mcp: bool = Field(True, description="Kernos as an MCP server at /mcp on the HTTP server (agents' tokens)")
    aios_compat: bool = Field(False, description="serve AIOS's /query API (agents written with Cerebrum) on the "
                                                 "HTTP server; see [aios]")
    console_session_idle_s: float = Field(8 * 3600.0, gt=0, description="a console login ends after this long "
                                                                          "unused")
    console_sessions_per_principal: int = Field(16, gt=0, description="console logins one principal holds at most")

    @model_validator(mode="after")
    def _tls(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if self.tls_cert is not None and self.listen.startswith("unix:"):
            raise ValueError("TLS is for TCP; a Unix socket is protected by its file mode")
        for f in (self.tls_cert, self.tls_key, self.tls_client_ca):
            if f is not None and not f.exists():
                raise ValueError(f"{f} does not exist")
        return self


REQUEST_BASE_BYTES = 64 * 1024     # a request's room besides its prompt (tools, schemas, sampling fields)
REQUEST_BYTES_PER_TOKEN = 32       # a prompt's bytes per token of the model's window (text runs ~4)


class LimitsConfig(_Strict):
    max_request_bytes: int | None = Field(
        None, gt=0, description="largest GenerateRequest, serialized; unset: 64 KiB + 32 bytes per token of the "
                                "model's context length")
    max_prompt_tokens: int | None = Field(
        None, gt=0, description="longest prompt, in tokens, on any model; unset: each model's context length less "
                                "the reply's room (its max_tokens)")
    max_tokens_cap: int = Field(4096, gt=0, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, gt=0)
    default_temperature: float = Field(0.0, ge=0, description="0 is greedy decoding")
    max_stop_strings: int = Field(16, ge=0)
    max_schema_bytes: int = Field(64 * 1024, gt=0, description="largest JSON schema (a tool's parameters or "
                                                                 "response_format's)")
    max_schema_repeats: int = Field(10_000, gt=0, description="sum of a schema's array bounds (min/maxItems, "
                                                               "min/maxContains): the grammar unrolls them, ~1 KB each")
    grammar_compile_s: float = Field(5.0, gt=0, description="longest a request's output grammar may take to compile")
    max_n: int = Field(8, gt=0, description="samples one request may ask for (n)")
    max_snapshots_per_agent: int = Field(8, ge=0, description="snapshots one agent holds; 0: no limit")
    snapshot_ttl_s: float = Field(7 * 86400.0, ge=0, description="a snapshot is deleted this long after; 0: kept")
    max_suspended_per_agent: int = Field(4, ge=0, description="generations one agent keeps suspended at once (each "
                                                              "holds its KV in swap); 0: no limit")
    default_tool_rounds: int = Field(4, gt=0, description="tool_execution 'kernel': rounds of calls when unset")
    max_tool_rounds: int = Field(8, gt=0, description="tool_execution 'kernel': the most rounds a request may ask")

    def prompt_limit(self, context_length: int, reply: int = 1) -> int:
        """The longest prompt on a model of `context_length` positions that leaves `reply` tokens to answer."""
        room = max(0, context_length - reply)
        return room if self.max_prompt_tokens is None else min(room, self.max_prompt_tokens)

    def request_limit(self, context_length: int) -> int:
        """The largest request (serialized bytes) to a model of `context_length` positions."""
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return REQUEST_BASE_BYTES + REQUEST_BYTES_PER_TOKEN * context_length


class SchedulerConfig(_Strict):
    # fair_share measured best for mixed agent workloads (benchmarks/scheduling.py): lowest p99 for short
    # requests, highest throughput and fairness.
    policy: Literal["fifo", "round_robin", "priority", "fair_share", "program"] = "fair_share"
    quantum_steps: int = Field(16, gt=0, description="round-robin and fair-share time slice, in decode steps")
    aging_per_s: float = Field(1.0, ge=0, description="priority gained per second of waiting")
    preempt_margin: float = Field(1.0, ge=0, description="priority lead needed to preempt a running request")
    fair_share_window_s: float = Field(60.0, gt=0)
    agent_weights: dict[str, float] = Field(default_factory=dict, description="fair-share weight per agent (default 1)")
    program_level_tokens: int = Field(512, gt=0, description="program policy: tokens of a program's attained "
                                                             "service in its first level (each next one doubles)")
    program_max_wait_s: float = Field(30.0, gt=0, description="program policy: a call waiting this long runs next "
                                                              "(the starvation bound)")
    program_order: Literal["service", "arrival"] = Field(
        "service", description="program policy: by the program's attained service (Autellix's PLAS) or by when "
                               "its first call came (program-level FCFS, Continuum)")

    def make(self):
        from kernos.scheduler import make_policy

        options = {
            "fifo": {},
            "round_robin": {"quantum": self.quantum_steps},
            "priority": {"aging_per_s": self.aging_per_s, "preempt_margin": self.preempt_margin},
            "fair_share": {
                "window_s": self.fair_share_window_s,
                "weights": self.agent_weights,
                "quantum": self.quantum_steps,
            },
            "program": {
                "level_tokens": self.program_level_tokens,
                "max_wait_s": self.program_max_wait_s,
                "order": self.program_order,
                "window_s": self.fair_share_window_s,
                "weights": self.agent_weights,
                "quantum": self.quantum_steps,
            },
        }[self.policy]
        return make_policy(self.policy, **options)


class StorageConfig(_Strict):
    quota_bytes: int = Field(1 << 30, ge=0, description="bytes per agent, every version counted; 0: no limit")
    max_file_bytes: int = Field(
        16 << 20, gt=0, description="largest single file (also bounded by server.max_message_bytes)"
    )
    max_indexed_bytes: int = Field(1 << 20, gt=0, description="largest file written with index=true (its passages "
                                                              "are embedded: about 12 s a MiB on 2 cores)")
    trace_max_age_s: float = Field(30 * 86400.0, ge=0, description="trace and audit records kept this long; 0: ever")
    trace_max_per_agent: int = Field(100_000, ge=0, description="trace (and audit) records kept per agent, the "
                                                                "newest; 0: no limit")
    workers: int = Field(8, gt=0, description="threads for storage calls (fsync, SQLite)")
    workers_per_agent: int = Field(2, gt=0, description="of those, the most one agent holds")


class QuotaLimits(_Strict):
    requests_per_second: float = Field(0, ge=0, description="every syscall; 0: no limit")
    tokens_per_minute: int = Field(0, ge=0, description="LLM prompt + generated tokens; 0: no limit")
    concurrent_generations: int = Field(0, ge=0, description="0: no limit")


class GroupQuotaLimits(QuotaLimits):
    storage_bytes: int = Field(0, ge=0, description="bytes of files the members hold together; 0: no limit")


class QuotasConfig(QuotaLimits):
    agents: dict[str, QuotaLimits] = Field(default_factory=dict, description="per-agent overrides")
    groups: dict[str, GroupQuotaLimits] = Field(default_factory=dict, description="one budget a group's members "
                                                                                    "share (on top of their own)")


class RegistrationConfig(_Strict):
    policy: Literal["open", "enroll", "closed"] = Field(
        "open", description="open: anyone registers new names; enroll: with an enrollment token "
                            "(kernos token create --enroll); closed: operators create agents")
    per_peer_per_minute: int = Field(60, ge=0, description="Register calls per client address and minute; 0: no limit")
    max_agents: int = Field(10_000, ge=0, description="agents that non-operators may bring the kernel to; 0: no limit")
    group: str = Field("registered", pattern=r"^([A-Za-z0-9_.-]{1,64})?$",
                       description="group that agents registered without an operator join: one budget that new "
                                   "names share (tool slots: tools.max_calls_per_group; quota it with "
                                   "[quotas.groups.NAME]); a budget, not a team (members do not see each other); an "
                                   "enrollment token's own group wins; empty: none")


class AiosConfig(_Strict):
    """AIOS compatibility (server.aios_compat): AIOS has no authentication, so each agent name a caller claims
    becomes a Kernos agent of its own (its own memory and files), in one group with the capabilities set here."""
    prefix: str = Field("aios.", pattern=r"^[A-Za-z0-9_.-]{1,16}$", description="Kernos agent name = prefix + "
                                                                               "the AIOS name (sanitized)")
    group: str = Field("aios", pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                       description="group every AIOS agent joins (quota it with [quotas.groups.NAME])")
    capabilities: list[Literal["llm", "memory", "storage", "tools", "tuner"]] = Field(
        ["llm", "memory", "storage", "tools"], description="capability families of every AIOS agent")
    token: str | None = Field(None, min_length=16, description="a shared bearer token every /query must carry "
                                                              "(Authorization: Bearer ...); unset: none")
    allow_remote: bool = Field(False, description="answer AIOS calls from other hosts, not only loopback")
    unknown_model: Literal["default", "error"] = Field(
        "default", description="an `llms` name the kernel does not serve: use the default model, or answer 404")
    max_agents: int = Field(1000, ge=0, description="AIOS agent names the kernel creates at most; 0: no limit")
    new_agents_per_minute: int = Field(30, ge=0, description="new AIOS names per client address a minute; 0: any")


class McpServerConfig(_Strict):
    """An external MCP server whose tools the kernel mounts into its tool registry as NAME__TOOL."""
    name: str = Field(pattern=r"^[a-z0-9_]{1,24}$", description="prefix of its tools' names in the kernel")
    command: list[str] = Field(default_factory=list, description="start it and speak MCP over its stdio")
    url: str = Field("", pattern=r"^(|https?://.+)$", description="or: its streamable-HTTP endpoint")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for `command`")
    headers: dict[str, str] = Field(default_factory=dict, description="extra HTTP headers for `url` (e.g. auth)")
    timeout_s: float = Field(30.0, gt=0, description="a call that takes longer fails (the server is not waited on)")
    public: bool = Field(True, description="every agent may call its tools; else only operators and grantees")
    irreversible: list[str] = Field(default_factory=list, description="its tools that wait for an operator's "
                                                                     "confirmation (their MCP names)")

    @model_validator(mode="after")
    def _one_transport(self):
        if bool(self.command) == bool(self.url):
            raise ValueError("give exactly one of command (stdio) and url (streamable HTTP)")
        return self


class ToolsConfig(_Strict):
    confirm_timeout_s: float = Field(300.0, gt=0, description="an irreversible call not confirmed by then is denied")
    unsafe_no_jail: bool = Field(False, description="run tool code without the bubblewrap jail where none works "
                                                    "(it then sees the kernel's files): never on a shared kernel")
    max_concurrent_calls: int = Field(8, gt=0, description="tool calls running at once, all agents together")
    max_calls_per_agent: int = Field(4, gt=0, description="tool calls one agent may run at once")
    max_pending_per_agent: int = Field(16, gt=0, description="irreversible calls one agent has awaiting an operator")
    max_calls_per_group: int = Field(0, ge=0, description="tool calls one group's agents (self-registered names "
                                                          "share one) run at once; 0: half of max_concurrent_calls")
    mcp: list[McpServerConfig] = Field(default_factory=list, description="external MCP servers to mount "
                                                                         "([[tools.mcp]])")
    max_wall_s: float = Field(300.0, gt=0, description="the longest wall-clock limit a tool may have")
    max_processes: int = Field(32, gt=0, description="processes one call of tool code may run")


class RetentionConfig(_Strict):
    """The retention gate (kernos.kernel.tuner.retention): an adapter is published only if, against the base
    model's greedy replies on the agent's other prompts and on the shipped generic prompts, it agrees enough
    and drifts little."""
    enabled: bool = Field(True, description="measure retention after training and gate publishing on it")
    generic_prompts: int = Field(24, ge=0, le=256, description="generic prompts measured (of the shipped set)")
    replay_prompts: int = Field(16, ge=0, le=1024, description="the agent's other traced prompts measured")
    reply_tokens: int = Field(16, ge=1, le=256, description="tokens of the base's greedy reply compared")
    min_agreement: float = Field(0.8, ge=0, le=1, description="least top-1 agreement with the base's reply tokens")
    max_kl: float = Field(0.5, ge=0, description="most mean KL(base || adapter) per reply token, nats")


class TunerConfig(_Strict):
    max_jobs: int = Field(1, ge=1, description="fine-tuning jobs training at once; the rest wait queued")
    max_queued_per_agent: int = Field(4, ge=1, description="jobs an agent may have queued or running")
    threads: int = Field(0, ge=0, description="torch threads per training worker; 0: half the CPU cores")
    nice: int = Field(10, ge=0, le=19, description="worker niceness: serving threads win the CPU over training")
    max_examples: int = Field(100_000, gt=0, description="largest training set a job may use")
    retention: RetentionConfig = RetentionConfig()
    continual_tick_s: float = Field(10.0, gt=0, description="how often continual tuning checks each agent's round")


class MemoryConfig(_Strict):
    chroma_url: str = Field("", description="empty: embedded chromadb under the data dir; else http://host:port")
    max_entries: int = Field(100_000, ge=0, description="long-term entries per namespace; 0: no limit")
    summary_max_tokens: int = Field(128, gt=0, description="length of a context's summary block")
    workers: int = Field(8, gt=0, description="threads for memory calls (Chroma, contexts)")
    workers_per_agent: int = Field(2, gt=0, description="of those, the most one agent holds")
    embed_chunk: int = Field(4, gt=0, description="texts embedded per turn: agents with texts waiting take turns "
                                                  "a chunk each, so one agent's big batch never starves another")
    embed_pending_per_agent: int = Field(4096, gt=0, description="texts one agent may have waiting to be embedded")

    @field_validator("chroma_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v and not re.match(r"^https?://[^/:]+:\d+/?$", v):
            raise ValueError("must look like http://host:port")
        return v


class KernelConfig(_Strict):
    data_dir: Path = Field(Path("~/.kernos"), description="agents, traces and converted models live here")
    default_model: str | None = Field(None, description="model used when a request names none")
    server: ServerConfig = ServerConfig()
    limits: LimitsConfig = LimitsConfig()
    engine: EngineConfig = EngineConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    storage: StorageConfig = StorageConfig()
    memory: MemoryConfig = MemoryConfig()
    quotas: QuotasConfig = QuotasConfig()
    registration: RegistrationConfig = RegistrationConfig()
    tools: ToolsConfig = ToolsConfig()
    aios: AiosConfig = AiosConfig()
    tuner: TunerConfig = TunerConfig()
    cluster: ClusterConfig = ClusterConfig()      # kernel/cluster/config.py
    models: list[ModelConfig] = Field(default_factory=list, description="empty: the embedded default model")

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return Path(os.path.expanduser(str(v)))

    def effective_models(self) -> list[ModelConfig]:
        if self.models:
            names = [m.name for m in self.models]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ConfigError(f"models: duplicate name(s) {sorted(dup)}")
            return self.models
        return [ModelConfig(name=EMBEDDED_MODEL, path="embedded")]

    def default_model_name(self) -> str:
        models = self.effective_models()
        if self.default_model is None:
            return models[0].name
        if self.default_model not in {m.name for m in models}:
            raise ConfigError(f"default_model: '{self.default_model}' is not among models {[m.name for m in models]}")
        return self.default_model


class ConfigError(ValueError):
    """A configuration problem, with a message naming the field."""


# KERNOS_* variables that are not configuration: the CLI's and SDK's (token, addresses, log level), the kernel
# cache's folder, the demo's, and those the kernel sets for its own workers and tool jail
NOT_CONFIG = {"KERNOS_TOKEN", "KERNOS_ADDRESS", "KERNOS_HTTP", "KERNOS_LOG_LEVEL", "KERNOS_CACHE_DIR",
              "KERNOS_LIMITS", "KERNOS_RESULT_FD", "KERNOS_WORKER_PARENT", "KERNOS_WORKER_NICE", "KERNOS_DEMO_LINGER_S",
              "KERNOS_DEMO_DATA_DIR"}


def _env_overrides(env: dict[str, str]) -> dict:
    out: dict = {}
    for key, raw in env.items():
        if not key.startswith("KERNOS_") or key in NOT_CONFIG:
            continue
        path = key[len("KERNOS_") :].lower().split("__")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None, **overrides) -> KernelConfig:
    """Read the TOML file (if any), apply `KERNOS_*` environment overrides, then keyword overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    data = _merge(data, _env_overrides(dict(os.environ) if env is None else env))
    data = _merge(data, {k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = KernelConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            field = ".".join(str(x) for x in err["loc"]) or "(root)"
            lines.append(f"{field}: {err['msg']}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    cfg.default_model_name()  # validates the cross-field reference
    return cfg

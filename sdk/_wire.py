"""Building requests and channel settings, shared by the sync and asyncio clients."""

from __future__ import annotations

import json
import os

from kernos.proto.v1 import llm_pb2, memory_pb2

from .types import Message, Messages

DEFAULT_ADDRESS = "127.0.0.1:7070"
# Calls that change nothing: gRPC itself retries them when the kernel is unavailable for a moment (a restart, a
# cluster node that died: the next address of a multi-address target). Writes and generations are not retried
# (running one twice could run its effects twice): they raise Unavailable, and the caller decides.
IDEMPOTENT = {"Kernel": ["Heartbeat", "ListAgents", "Stats"], "LLM": ["ListModels"],
              "Storage": ["Read", "Stat", "List", "History", "Search"],
              "Memory": ["Search", "Get", "ListContexts", "ListBlocks"], "Tools": ["List", "ListPending"],
              "Tuner": ["GetJob", "ListJobs", "ListAdapters"],
              "Access": ["ListGrants", "ListGroups", "GetCapabilities", "Audit"]}
RETRY_POLICY = {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2.5,
                "retryableStatusCodes": ["UNAVAILABLE"]}
SERVICE_CONFIG = {"methodConfig": [{"name": [{"service": f"kernos.v1.{svc}", "method": m} for svc, ms in
                                             IDEMPOTENT.items() for m in ms], "retryPolicy": RETRY_POLICY}]}
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
]


def resolve_address(address: str | None) -> str:
    """The gRPC target for `address`. Several kernels of a cluster, "host1:7070,host2:7070": each name is resolved
    (IPv4) and the channel takes the first that answers, and the next when that one dies."""
    address = address or os.environ.get("KERNOS_ADDRESS") or DEFAULT_ADDRESS
    if "," not in address:
        return address
    import socket

    parts = []
    for part in address.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a kernel address is host:port, got {part.strip()!r} in {address!r}")
        ip = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
        parts.append(f"{ip}:{port}")
    return "ipv4:" + ",".join(parts)


def tls_credentials(ca: str | None, cert: str | None, key: str | None):
    """Channel credentials for a TLS kernel (None: plaintext). cert + key: a client certificate for mTLS."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ValueError("tls_cert and tls_key go together")
    from pathlib import Path

    import grpc

    read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
    return grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert))


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def read_token_file(path) -> str | None:
    """The token saved in `path` (None if there is none yet)."""
    from pathlib import Path

    try:
        return Path(os.path.expanduser(str(path))).read_text().strip() or None
    except FileNotFoundError:
        return None


def save_token_file(path, token: str) -> None:
    """Save an agent's token for its next run: readable by this user only, replaced atomically."""
    from pathlib import Path

    p = Path(os.path.expanduser(str(path)))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, p)


def _messages(messages: Messages) -> list[llm_pb2.ChatMessage]:
    if isinstance(messages, str):
        return [llm_pb2.ChatMessage(role="user", content=messages)]
    out = []
    for m in messages:
        m = Message.coerce(m)
        out.append(llm_pb2.ChatMessage(
            role=m.role, content=m.content, tool_call_id=m.tool_call_id or "", name=m.name or "",
            tool_calls=[llm_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in m.tool_calls]))
    return out


def generate_request(
    messages: Messages | None = None,
    prompt: str | None = None,
    *,
    model: str | None = None,
    adapter: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    max_tokens: int | None = None,
    stop: list[str] | str | None = None,
    seed: int | None = None,
    priority: int = 0,
    context_id: str | None = None,
    tools: list | None = None,
    tool_choice=None,
    parallel_tool_calls: bool | None = None,
    response_format=None,
    kernel_tools: list[str] | None = None,
    tool_execution: str = "",
    max_tool_rounds: int = 0,
    n: int = 1,
    logprobs: bool = False,
    top_logprobs: int = 0,
    first_tool_choice=None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    repetition_penalty: float | None = None,
    logit_bias: dict[int, float] | None = None,
    min_p: float = 0.0,
    stop_token_ids: list[int] | None = None,
    min_tokens: int = 0,
    ignore_eos: bool = False,
    prompt_logprobs: bool = False,
    prompt_ids: list[int] | None = None,
    program_id: str = "",
) -> llm_pb2.GenerateRequest:
    sampling = llm_pb2.SamplingParams(
        top_k=top_k, stop=[stop] if isinstance(stop, str) else list(stop or []), frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, logit_bias={int(k): float(v) for k, v in (logit_bias or {}).items()},
        min_p=min_p, stop_token_ids=list(stop_token_ids or []), min_tokens=min_tokens, ignore_eos=ignore_eos)
    if repetition_penalty is not None:
        sampling.repetition_penalty = repetition_penalty
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if seed is not None:
        sampling.seed = seed
    from .functions import response_format_message, tool_choice_name, tool_definition

    req = llm_pb2.GenerateRequest(
        messages=_messages(messages) if messages is not None else [],
        prompt=prompt or "",
        model=model or "",
        adapter=adapter or "",
        sampling=sampling,
        priority=priority,
        context_id=context_id or "",
        tools=[tool_definition(t) for t in tools or ()],
        tool_choice=tool_choice_name(tool_choice),
        first_tool_choice=tool_choice_name(first_tool_choice),
        kernel_tools=list(kernel_tools or []),
        tool_execution=tool_execution,
        max_tool_rounds=max_tool_rounds,
        program_id=program_id,
        n=n,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs,
        prompt_ids=list(prompt_ids or []),
    )
    if parallel_tool_calls is not None:
        req.parallel_tool_calls = parallel_tool_calls
    fmt = response_format_message(response_format)
    if fmt is not None:
        req.response_format.CopyFrom(fmt)
    return req


def memory_items(texts, metadata=None, ids=None) -> list[memory_pb2.MemoryItem]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    metadata = metadata if isinstance(metadata, list) else [metadata or {}] * len(texts)
    ids = ids or [""] * len(texts)
    return [memory_pb2.MemoryItem(id=i, text=t, metadata=m) for t, m, i in zip(texts, metadata, ids)]


def edit_block_request(context_id: str, block_id: str, content: str | None, pinned: bool | None):
    req = memory_pb2.EditBlockRequest(context_id=context_id, block_id=block_id)
    if content is not None:
        req.content = content
    if pinned is not None:
        req.pinned = pinned
    return req


def feedback_request(request_id: str, reward, success, note: str, preferred: str):
    from kernos.proto.v1 import tuner_pb2

    req = tuner_pb2.FeedbackRequest(request_id=request_id, note=note, preferred=preferred)
    if reward is not None:
        req.reward = reward
    if success is not None:
        req.success = success
    return req


def build_dataset_request(
    name: str,
    kind: str,
    min_reward,
    eval_fraction: float,
    samples: int,
    reward_regex: str,
    temperature: float,
    model: str,
    max_tokens: int,
    items,
    distractors: int,
    oracle_fraction,
    seed: int,
    reward: str = "",
    adapter: str = "",
):
    from kernos.proto.v1 import tuner_pb2

    req = tuner_pb2.BuildDatasetRequest(
        name=name,
        kind=kind,
        eval_fraction=eval_fraction,
        samples=samples,
        reward_regex=reward_regex,
        temperature=temperature,
        model=model,
        max_tokens=max_tokens,
        distractors=distractors,
        seed=seed,
        reward=reward,
        adapter=adapter,
        items=[tuner_pb2.RagItem(**i) for i in items or []],
    )
    if min_reward is not None:
        req.min_reward = min_reward
    if oracle_fraction is not None:
        req.oracle_fraction = oracle_fraction
    return req


def finetune_request(
    name: str, dataset: str, model: str, config: dict | None, set_default: bool, min_improvement: float,
    method: str = "", start_from: str = "",
):
    import json

    from kernos.proto.v1 import tuner_pb2

    return tuner_pb2.FinetuneRequest(
        name=name,
        dataset=dataset,
        model=model,
        config_json=json.dumps(config or {}),
        set_default=set_default,
        min_improvement=min_improvement,
        method=method,
        start_from=start_from,
    )


def to_dict(message) -> dict:
    """A raw reply message (e.g. `session.kernel.stats()`) as a plain dict, with the ABI's field names."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)

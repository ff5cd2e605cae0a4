"""Request validation and prompt building: the one place a generation request is checked. Its model and adapter
are decided by access control (the adapter may be the agent's default one), its output spec (tools, a JSON
schema) is built and compiled to a grammar off the event loop, its prompt is formatted and counted against the
limits; out comes the engine's `GenRequest`."""
from __future__ import annotations

import asyncio
import json
import math
import uuid

from kernos.abi.errors import exhausted, invalid, not_found

from ...llm.core import LLMCore, ServedModel
from ...llm.structured import output_spec
from ...llm.types import GenRequest, Shaping
from ..generation import Generation

ROLES = {"system", "user", "assistant", "tool"}
MAX_STOP_LEN = 256
MAX_PROGRAM_ID = 128


class Requests:
    def __init__(self, llm: LLMCore, limits, adapters, access):
        self.llm = llm
        self.limits = limits
        self.adapters = adapters
        self.access = access

    def prepare(self, g: Generation, principal) -> tuple[ServedModel, GenRequest]:
        lim = self.limits
        model = self.llm.get(g.model)
        if model is None:
            raise not_found(f"unknown model '{g.model}'; served models: {sorted(self.llm.models)}")
        if g.size > lim.request_limit(model.context_length):
            raise exhausted(f"request is {g.size} bytes; the limit is {lim.request_limit(model.context_length)} "
                            f"(limits.max_request_bytes{'' if lim.max_request_bytes else ', from the context length'})")
        if g.adapter and g.adapter not in model.adapters:
            raise not_found(f"model '{model.name}' has no adapter '{g.adapter}'; loaded: {model.adapters}")
        default = self.adapters.default(principal.agent_id, model.name)     # a continual canary's share included
        adapter = self.access.authorize_model(
            principal, model.name, g.adapter or None, default if default in model.adapters else None
        )
        if sum(map(bool, (g.messages, g.prompt, g.prompt_ids))) > 1:
            raise invalid("give one of messages (chat), prompt (raw text) or prompt_ids (raw token ids), not both")
        if not (g.messages or g.prompt or g.prompt_ids):
            raise invalid("empty request: give messages (chat), prompt (raw text) or prompt_ids")
        check_messages(g.messages)
        output = output_spec(g.tools, tool_choice(g), g.parallel_tool_calls, g.response_format, g.schema_json,
                             lim.max_schema_bytes, g.strict, lim.max_schema_repeats)
        if output is not None and output.tools and not g.messages:
            raise invalid("tools need the chat form (messages), not a raw prompt")
        if g.prompt and not g.prompt.strip():
            raise invalid("prompt is empty")
        max_tokens = g.max_tokens if g.max_tokens is not None else lim.default_max_tokens
        if max_tokens < 0 or (max_tokens == 0 and not g.prompt_logprobs):
            raise invalid(f"sampling.max_tokens must be > 0 (0 only to score the prompt: prompt_logprobs), "
                          f"got {max_tokens}")
        if g.prompt_logprobs:
            check_scoring(g, model, output, max_tokens)
        if max_tokens > lim.max_tokens_cap:
            raise invalid(f"sampling.max_tokens is {max_tokens}; the kernel's cap is {lim.max_tokens_cap}")
        temperature = g.temperature if g.temperature is not None else lim.default_temperature
        if not math.isfinite(temperature) or not 0 <= temperature <= 10:
            raise invalid(f"sampling.temperature must be in [0, 10], got {temperature}")
        top_p = g.top_p if g.top_p is not None else 1.0
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise invalid(f"sampling.top_p must be in (0, 1], got {top_p}")
        if g.top_k < 0:
            raise invalid(f"sampling.top_k must be >= 0 (0: off), got {g.top_k}")
        if len(g.stop) > lim.max_stop_strings:
            raise invalid(f"{len(g.stop)} stop strings; the limit is {lim.max_stop_strings}")
        if any(not x or len(x) > MAX_STOP_LEN for x in g.stop):
            raise invalid(f"stop strings must be 1 to {MAX_STOP_LEN} characters")
        if not 1 <= g.n <= lim.max_n:
            raise invalid(f"n must be 1 to {lim.max_n} (limits.max_n), got {g.n}")
        if g.n > 1 and (g.context_id or g.tool_execution == "kernel"):
            raise invalid("n > 1 takes neither a context_id nor tool_execution 'kernel'")
        if not 0 <= g.top_logprobs <= 20:
            raise invalid(f"top_logprobs must be 0 to 20, got {g.top_logprobs}")
        if g.top_logprobs and not (g.logprobs or g.prompt_logprobs):
            raise invalid("top_logprobs needs logprobs (or prompt_logprobs) = true")
        check_shaping(g.shaping, model, max_tokens, lim)
        if g.messages and not model.chat:
            raise invalid(f"model '{model.name}' has no chat template: send a raw prompt")
        check_token_ids(g.prompt_ids, "prompt_ids", model)
        check_program_id(g.program_id)
        try:
            ids = (list(g.prompt_ids) if g.prompt_ids else
                   model.encode_chat(g.messages, output) if g.messages else model.encode_prompt(g.prompt))
        except Exception as e:  # a template that rejects the conversation (e.g. role order)
            raise invalid(f"cannot format the messages with the model's chat template: {e}") from None
        if not ids:
            raise invalid("the prompt encodes to no tokens")
        if lim.max_prompt_tokens is not None and len(ids) > lim.max_prompt_tokens:
            raise exhausted(
                f"prompt is {len(ids)} tokens; the limit is {lim.max_prompt_tokens} (limits.max_prompt_tokens)"
            )
        room = model.context_length - len(ids)
        if g.max_tokens is None and 0 < room < max_tokens:
            max_tokens = room           # an unset max_tokens: what the window leaves, up to the default
        if len(ids) + max_tokens > model.context_length:
            ask = (f"max_tokens ({max_tokens})" if g.max_tokens is not None else "a reply")
            raise invalid(
                f"prompt ({len(ids)} tokens) + {ask} exceeds the context length of '{model.name}' "
                f"({model.context_length} tokens: its max_model_len, or what its positions allow)"
            )
        return model, GenRequest(
            request_id=uuid.uuid4().hex,
            agent_id=principal.agent_id,
            prompt_ids=ids,
            max_tokens=max_tokens,
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(g.top_k),
            stop=list(g.stop),
            seed=g.seed,
            adapter=adapter,
            priority=int(g.priority),
            output=output,
            logprobs=bool(g.logprobs),
            top_logprobs=int(g.top_logprobs),
            shaping=g.shaping,
            prompt_logprobs=g.prompt_logprobs,
            program_id=g.program_id,
        )

    async def compile(self, model: ServedModel, req: GenRequest) -> None:
        """Give a structured request its own compiled grammar (off the event loop, within a time limit)."""
        if req.output is None:
            return
        limit = self.limits.grammar_compile_s
        try:
            req.matcher = await asyncio.wait_for(asyncio.to_thread(model.matcher, req.output), limit)
        except asyncio.TimeoutError:
            raise invalid(f"the requested output did not compile to a grammar within {limit:g} s "
                          "(limits.grammar_compile_s): simplify the schema") from None
        except (ValueError, RuntimeError) as e:   # llguidance's own errors on a schema it cannot take
            raise invalid(f"the requested output cannot be compiled to a grammar: {str(e)[:400]}") from None


def check_scoring(g: Generation, model: ServedModel, output, max_tokens: int) -> None:
    if not model.engine.scores:
        raise invalid(f"model '{model.name}' ({model.architecture}) cannot score a prompt (prompt_logprobs)")
    if g.n != 1:
        raise invalid("prompt_logprobs takes n = 1")
    if max_tokens == 0 and (output is not None or g.tool_execution == "kernel" or g.context_id):
        raise invalid("max_tokens 0 only scores the prompt: it takes no tools, response format or context")


MAX_BIASED_TOKENS = 1024
MAX_STOP_TOKEN_IDS = 64


def check_shaping(x: Shaping, model: ServedModel, max_tokens: int, lim) -> None:
    """The sampling fields beyond temperature / top-p / top-k: in range, and applied by the model's engine (a
    field it cannot apply is refused by name, never ignored)."""
    unsupported = [f for f in x.fields_set() if f not in model.engine.shaping]
    if unsupported:
        raise invalid(f"model '{model.name}' ({model.architecture}) does not support sampling.{unsupported[0]}")
    for name in ("frequency_penalty", "presence_penalty"):
        v = getattr(x, name)
        if not math.isfinite(v) or not -2 <= v <= 2:
            raise invalid(f"sampling.{name} must be in [-2, 2], got {v}")
    if not math.isfinite(x.repetition_penalty) or not 0 < x.repetition_penalty <= 10:
        raise invalid(f"sampling.repetition_penalty must be in (0, 10], got {x.repetition_penalty}")
    if not math.isfinite(x.min_p) or not 0 <= x.min_p <= 1:
        raise invalid(f"sampling.min_p must be in [0, 1], got {x.min_p}")
    if len(x.logit_bias) > MAX_BIASED_TOKENS:
        raise invalid(f"sampling.logit_bias names {len(x.logit_bias)} tokens; the limit is {MAX_BIASED_TOKENS}")
    check_token_ids(x.logit_bias, "sampling.logit_bias", model)
    for t, b in x.logit_bias.items():
        if not math.isfinite(b) or not -100 <= b <= 100:
            raise invalid(f"sampling.logit_bias[{t}] must be in [-100, 100], got {b}")
    if len(x.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise invalid(f"sampling.stop_token_ids: {len(x.stop_token_ids)} ids; the limit is {MAX_STOP_TOKEN_IDS}")
    check_token_ids(x.stop_token_ids, "sampling.stop_token_ids", model)
    if not 0 <= x.min_tokens <= max_tokens:
        raise invalid(f"sampling.min_tokens must be 0 to max_tokens ({max_tokens}), got {x.min_tokens}")


def check_program_id(program_id: str) -> None:
    if len(program_id) > MAX_PROGRAM_ID or not program_id.isprintable():
        raise invalid(f"program_id must be up to {MAX_PROGRAM_ID} printable characters")


def check_token_ids(ids, name: str, model: ServedModel) -> None:
    """Every token id in `ids` is one of the model's (its vocabulary's rows, where it has one)."""
    vocab = model.vocab_size or (1 << 32)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise invalid(f"{name}: token id {bad} is not in the vocabulary of '{model.name}' (0 to {vocab - 1})")


def tool_choice(g: Generation) -> str:
    """`first_tool_choice` while no tool result follows the last user message, else `tool_choice`."""
    if g.first_tool_choice:
        last_user = max((i for i, m in enumerate(g.messages) if m["role"] == "user"), default=-1)
        if not any(m["role"] == "tool" for m in g.messages[last_user + 1:]):
            return g.first_tool_choice
    return g.tool_choice


def check_messages(messages: list[dict]) -> None:
    """Roles, tool calls and the results that answer them; INVALID_ARGUMENT naming the field."""
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise invalid(f"messages[{i}].role must be one of {sorted(ROLES)}, got '{m['role'][:32]}'")
        for j, c in enumerate(m.get("tool_calls") or ()):
            if m["role"] != "assistant":
                raise invalid(f"messages[{i}].tool_calls: only an assistant message carries tool calls")
            if not c.get("id") or not c.get("name"):
                raise invalid(f"messages[{i}].tool_calls[{j}] needs an id and a name")
            try:
                args = json.loads(c.get("arguments") or "{}")
            except ValueError:
                args = None
            if not isinstance(args, dict):
                raise invalid(f"messages[{i}].tool_calls[{j}].arguments must be a JSON object (as a string)")
            call_ids.add(c["id"])
        if m["role"] == "tool" and m.get("tool_call_id") not in call_ids:
            raise invalid(f"messages[{i}].tool_call_id '{(m.get('tool_call_id') or '')[:64]}' answers no earlier "
                          "tool call of an assistant message")
    if messages and not any(m["content"].strip() or m.get("tool_calls") for m in messages):
        raise invalid("every message is empty")

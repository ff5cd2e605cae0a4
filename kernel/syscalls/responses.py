"""The Responses use case (`/v1/responses`): a response is one generation whose conversation is the agent's own
stored chain. `previous_response_id` names the response it continues: the chain's input and output items, oldest
first, then the new input become the generation's messages (the same prompt a client re-sending the whole
conversation would make, so a chain still warm in the engine's resident cache continues from its KV). Stored
responses are their agent's own (another agent's id is NOT_FOUND) and durable (`storage/responses.py`).

Items are the Responses API's: messages (a role and text content), `function_call` and `function_call_output`;
anything else is refused by its index and type, never dropped."""
from __future__ import annotations

import json
from dataclasses import replace

from kernos.abi.errors import StatusError, invalid, not_found
from kernos.storage.responses import ResponseStore

from .generation import Generation

MAX_CHAIN = 10_000           # responses walked back through previous_response_id
TEXT_PARTS = ("input_text", "output_text", "text")


class Responses:
    def __init__(self, store: ResponseStore, generate):
        self.store = store
        self.generate = generate

    # -- a new response ----------------------------------------------------------------------------------------
    def conversation(self, principal, previous_id: str, items: list[dict], instructions: str) -> list[dict]:
        """The messages of a response: `instructions` (a system message), the chain that `previous_id` ends,
        then `items`."""
        chain, rid = [], previous_id
        while rid and len(chain) < MAX_CHAIN:
            got = self.store.get(principal.agent_id, rid)
            if got is None:
                if rid == previous_id:
                    raise not_found(f"no response '{rid[:64]}' (previous_response_id) of this agent")
                break                              # an earlier response was deleted: the chain starts after it
            response, given = got
            chain.append(given + [i for i in response.get("output", []) if i.get("type") != "reasoning"])
            rid = response.get("previous_response_id") or ""
        history = [i for part in reversed(chain) for i in part]
        messages = to_messages(history + items, start=-len(history))
        return ([{"role": "system", "content": instructions}] if instructions else []) + messages

    async def run(self, principal, g: Generation, truncate: bool):
        """The generation's events; with `truncate` ("auto"), a conversation too long for the model loses its
        oldest turns (after any system message) until it fits, as the Responses API's truncation does."""
        while True:
            events = self.generate.run(principal, g)
            try:
                first = await events.__anext__()
            except StatusError as e:
                shorter = _drop_oldest_turn(g.messages) if truncate and _too_long(e) else None
                if shorter is None:
                    raise
                g = replace(g, messages=shorter)
                continue
            yield first
            async for ev in events:
                yield ev
            return

    def save(self, principal, response: dict, input_items: list[dict]) -> None:
        self.store.put(principal.agent_id, response, input_items)

    # -- stored responses ----------------------------------------------------------------------------------
    def get(self, principal, response_id: str) -> tuple[dict, list[dict]]:
        got = self.store.get(principal.agent_id, response_id)
        if got is None:
            raise not_found(f"no response '{response_id[:64]}' of this agent")
        return got

    def delete(self, principal, response_id: str) -> None:
        if not self.store.delete(principal.agent_id, response_id):
            raise not_found(f"no response '{response_id[:64]}' of this agent")


def _too_long(e: StatusError) -> bool:
    return "context length" in e.message or "max_prompt_tokens" in e.message


def _drop_oldest_turn(messages: list[dict]) -> list[dict] | None:
    """`messages` less their oldest turn (from the first non-system message to the next user message), or None
    when only the last turn is left."""
    head = 1 if messages and messages[0]["role"] == "system" else 0
    nxt = next((i for i in range(head + 1, len(messages)) if messages[i]["role"] == "user"), None)
    return None if nxt is None else messages[:head] + messages[nxt:]


def _text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string or a list of parts")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS and kind != "refusal":
            raise invalid(f"{where}.content[{j}].type '{str(kind)[:32]}' is not supported (text parts only)")
        out.append(part.get("text", part.get("refusal", "")) or "")
    return "".join(out)


def to_messages(items: list[dict], start: int = 0) -> list[dict]:
    """Responses items as chat messages: consecutive function calls join one assistant message (the text before
    them its content), each output a tool message. `start`: the index the first item is reported as (negative
    for items of the stored chain)."""
    out: list[dict] = []
    for n, item in enumerate(items, start=start):
        where = f"input[{n}]" if n >= 0 else "the stored chain"
        if not isinstance(item, dict):
            raise invalid(f"{where} must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise invalid(f"{where}.role must be user, system, developer or assistant, got '{str(role)[:32]}'")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            if not item.get("call_id") or not item.get("name"):
                raise invalid(f"{where}: a function_call needs a call_id and a name")
            args = item.get("arguments", "{}")
            if not isinstance(args, str):
                args = json.dumps(args)
            call = {"id": str(item["call_id"]), "name": str(item["name"]), "arguments": args}
            if out and out[-1]["role"] == "assistant":         # the same turn: its text, then its calls
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            out.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")),
                        "content": output if isinstance(output, str) else _text(output, where)})
        else:
            raise invalid(f"{where}.type '{str(kind)[:32]}' is not supported (message, function_call, "
                          "function_call_output)")
    return out

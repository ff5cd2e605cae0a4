"""Native LangChain classes over the Kernos SDK (needs `langchain-core`; the SDK itself never imports it):

- `KernosChatModel`, a chat model: invoke, stream, batch, `bind_tools`, `with_structured_output`, and Kernos's own
  `context_id`, `priority`, `adapter` (fields, or per call through `.bind(...)`). Usage metadata and the
  request id come back on every message.
- `KernosVectorStore`, an agent's long-term memory namespace as a vector store (add, search with scores and
  metadata filters, get by ids, delete), and its retriever through `as_retriever()`.

Both talk to the kernel through a `kernos.sdk` session, so the agent's token, quotas, grants and traces apply as
for any syscall.

    s = kernos.sdk.connect(agent="my-agent")
    llm = KernosChatModel(session=s, max_tokens=128)
    store = KernosVectorStore(session=s)
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_core.vectorstores import VectorStore
from pydantic import ConfigDict, Field

# -- the chat model -------------------------------------------------------------------------------------------
CALL_KEYS = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "context_id", "priority", "adapter",
             "model", "max_tokens", "temperature", "top_p", "seed", "stop", "first_tool_choice")


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(p if isinstance(p, str) else p.get("text", "") for p in content
                   if isinstance(p, str) or p.get("type") in ("text", None))


def to_kernos(messages: Sequence[BaseMessage]) -> list[dict]:
    """LangChain messages as the LLM syscall's."""
    out = []
    for m in messages:
        if isinstance(m, SystemMessage):
            out.append({"role": "system", "content": _text(m.content)})
        elif isinstance(m, HumanMessage):
            out.append({"role": "user", "content": _text(m.content)})
        elif isinstance(m, AIMessage):
            out.append({"role": "assistant", "content": _text(m.content),
                        "tool_calls": [{"id": c.get("id") or f"call_{i}", "name": c["name"],
                                        "arguments": json.dumps(c.get("args") or {})}
                                       for i, c in enumerate(m.tool_calls)]})
        elif isinstance(m, ToolMessage):
            out.append({"role": "tool", "content": _text(m.content), "tool_call_id": m.tool_call_id,
                        "name": m.name or None})
        else:
            out.append({"role": {"human": "user", "ai": "assistant"}.get(m.type, m.type), "content": _text(m.content)})
    return out


class KernosChatModel(BaseChatModel):
    """A chat model served by a Kernos kernel, through an agent's SDK session."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    session: Any = Field(exclude=True)          # a kernos.sdk session (the agent)
    model: str | None = None                    # None: the kernel's default model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    context_id: str | None = None               # a kernel-held working context
    priority: int = 0
    adapter: str | None = None
    timeout: float | None = None
    max_retries: int = 2                        # retries of a call the kernel refused for now (quota, draining)

    @property
    def _llm_type(self) -> str:
        return "kernos"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "adapter": self.adapter, "max_tokens": self.max_tokens,
                "temperature": self.temperature}

    def _params(self, stop: list[str] | None, kwargs: dict) -> dict:
        p = {"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature,
             "top_p": self.top_p, "seed": self.seed, "stop": stop or self.stop, "context_id": self.context_id,
             "priority": self.priority, "adapter": self.adapter}
        unknown = set(kwargs) - set(CALL_KEYS) - {"ls_structured_output_format"}
        if unknown:
            raise TypeError(f"KernosChatModel does not take {sorted(unknown)}")
        p.update({k: v for k, v in kwargs.items() if k in CALL_KEYS})
        return {k: v for k, v in p.items() if v is not None}

    def bind_tools(self, tools: Sequence[dict | type | BaseTool | Any], *, tool_choice: str | dict | bool | None = None,
                   **kwargs):
        """Tools (functions, pydantic models, LangChain tools, OpenAI dicts) for the model to call. tool_choice:
        "auto", "none", "required" / "any" / True (some tool), or a tool's name."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice in ("any", True):
            tool_choice = "required"
        elif tool_choice is False:
            tool_choice = None
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=formatted, **kwargs)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        c = self._retrying(lambda: self.session.llm.chat(to_kernos(messages), timeout=self.timeout,
                                                          **self._params(stop, kwargs)))
        message = AIMessage(
            content=c.text,
            tool_calls=[{"id": t.id, "name": t.name, "args": t.args, "type": "tool_call"} for t in c.tool_calls],
            usage_metadata=_usage(c), response_metadata=_metadata(c), id=c.request_id)
        return ChatResult(generations=[ChatGeneration(message=message,
                                                      generation_info={"finish_reason": c.finish_reason})])

    def _retrying(self, call):
        import time

        from kernos.sdk import ResourceExhausted, Unavailable

        for attempt in range(self.max_retries + 1):
            try:
                return call()
            except (ResourceExhausted, Unavailable) as e:
                if attempt == self.max_retries:
                    raise
                time.sleep(min(10.0, getattr(e, "retry_after_s", None) or 0.5 * 2 ** attempt))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        stream = self.session.llm.stream(to_kernos(messages), timeout=self.timeout, **self._params(stop, kwargs))
        for chunk in stream:
            if chunk.done:
                c = chunk.completion
                yield ChatGenerationChunk(
                    message=AIMessageChunk(content="", usage_metadata=_usage(c), response_metadata=_metadata(c),
                                           id=c.request_id, chunk_position="last"),
                    generation_info={"finish_reason": c.finish_reason})
                return
            calls = [{"index": d.index, "id": d.id or None, "name": d.name or None, "args": d.arguments,
                      "type": "tool_call_chunk"} for d in chunk.tool_calls]
            if not chunk.text and not calls:
                continue
            piece = ChatGenerationChunk(message=AIMessageChunk(content=chunk.text, tool_call_chunks=calls,
                                                               id=chunk.request_id))
            if run_manager and chunk.text:
                run_manager.on_llm_new_token(chunk.text, chunk=piece)
            yield piece


def _usage(c) -> UsageMetadata:
    return UsageMetadata(input_tokens=c.prompt_tokens, output_tokens=c.completion_tokens,
                         total_tokens=c.prompt_tokens + c.completion_tokens)


def _metadata(c) -> dict:
    return {"model_name": c.model, "adapter": c.adapter, "finish_reason": c.finish_reason,
            "request_id": c.request_id, "queue_wait_ms": c.queue_wait_ms,
            "time_to_first_token_ms": c.time_to_first_token_ms, "model_provider": "kernos"}


# -- the vector store ---------------------------------------------------------------------------------------------
JSON_KEYS = "lc_json_keys"      # metadata keys whose values were not strings (stored as JSON)


def _store_meta(meta: dict | None) -> dict[str, str]:
    out, encoded = {}, []
    for k, v in (meta or {}).items():
        if isinstance(v, str):
            out[str(k)] = v
        else:
            out[str(k)] = json.dumps(v)
            encoded.append(str(k))
    if encoded:
        out[JSON_KEYS] = json.dumps(encoded)
    return out


def _load_meta(meta: dict[str, str]) -> dict:
    meta = dict(meta)
    encoded = json.loads(meta.pop(JSON_KEYS, "[]"))
    return {k: (json.loads(v) if k in encoded else v) for k, v in meta.items()}


def _where(filter: dict | None) -> dict[str, str] | None:
    if not filter:
        return None
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in filter.items()}


class KernosVectorStore(VectorStore):
    """An agent's long-term memory (or a namespace it was granted) as a LangChain vector store. The kernel
    embeds the texts itself (all-MiniLM-L6-v2); scores are cosine distances, smaller is closer."""

    def __init__(self, session, namespace: str = ""):
        self.session = session
        self.namespace = namespace

    @property
    def embeddings(self) -> Embeddings | None:
        return None                       # the kernel embeds

    def add_texts(self, texts: Iterable[str], metadatas: list[dict] | None = None, *, ids: list[str] | None = None,
                  **kwargs: Any) -> list[str]:
        texts = list(texts)
        if not texts:
            return []
        metas = [_store_meta(m) for m in (metadatas or [{}] * len(texts))]
        ids = [i or "" for i in ids] if ids else None
        existing = [i for i in ids or [] if i]
        if existing:                      # LangChain's add_* upsert: an id that exists is replaced
            self.session.memory.delete(existing, namespace=self.namespace)
        return self.session.memory.add(texts, metas, ids=ids, namespace=self.namespace)

    def add_documents(self, documents: list[Document], **kwargs: Any) -> list[str]:
        ids = kwargs.pop("ids", None) or [d.id for d in documents]
        if not any(ids):
            ids = None
        return self.add_texts([d.page_content for d in documents], [d.metadata for d in documents], ids=ids, **kwargs)

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        if not ids:
            return None
        self.session.memory.delete(list(ids), namespace=self.namespace)
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        if not ids:
            return []
        from kernos.sdk import NotFound

        try:
            items = self.session.memory.get(list(ids), namespace=self.namespace)
        except NotFound:                  # some are missing: LangChain returns the ones that exist
            items = []
            for i in dict.fromkeys(ids):
                try:
                    items += self.session.memory.get([i], namespace=self.namespace)
                except NotFound:
                    pass
        found = {m.id: m for m in items}
        return [Document(id=i, page_content=found[i].text, metadata=_load_meta(found[i].metadata))
                for i in dict.fromkeys(ids) if i in found]

    def similarity_search_with_score(self, query: str, k: int = 4, filter: dict | None = None,
                                     **kwargs: Any) -> list[tuple[Document, float]]:
        hits = self.session.memory.search(query, k=k, where=_where(filter), namespace=self.namespace)
        return [(Document(id=h.id, page_content=h.text, metadata=_load_meta(h.metadata)), h.distance) for h in hits]

    def similarity_search(self, query: str, k: int = 4, filter: dict | None = None, **kwargs: Any) -> list[Document]:
        return [d for d, _ in self.similarity_search_with_score(query, k, filter, **kwargs)]

    def _select_relevance_score_fn(self):
        return lambda distance: 1.0 - distance / 2.0      # cosine distance (0..2) to a relevance score (1..0)

    @classmethod
    def from_texts(cls, texts: list[str], embedding: Embeddings | None = None, metadatas: list[dict] | None = None,
                   *, session=None, namespace: str = "", ids: list[str] | None = None, **kwargs: Any):
        if session is None:
            raise TypeError("KernosVectorStore.from_texts needs session= (a kernos.sdk session)")
        store = cls(session, namespace)
        store.add_texts(texts, metadatas, ids=ids)
        return store

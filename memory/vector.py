"""Long-term vector memory: chromadb, embedded (`PersistentClient` under the data dir) or a Chroma server
(`HttpClient`), one collection per namespace (an agent's own by default), embeddings computed here by
`Embedder` and passed explicitly (Chroma's default embedding function would download a model)."""

from __future__ import annotations

import functools
import hashlib
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kernos.abi.errors import StatusError

MAX_TEXT = 32 * 1024
MAX_ID = 128
RESERVED = "kernos_created"


class MemoryError_(StatusError):
    pass


def _store_input_errors() -> tuple[type, ...]:
    from chromadb import errors

    return tuple(getattr(errors, n) for n in ("InvalidArgumentError", "DuplicateIDError") if hasattr(errors, n))


def _rejects_bad_input(fn):
    """The vector store's own input validation (chromadb's errors, ValueError) becomes INVALID_ARGUMENT."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StatusError:
            raise
        except (ValueError, *_store_input_errors()) as e:
            raise MemoryError_("INVALID_ARGUMENT", f"rejected by the vector store: {e}") from None
    return wrapped


@dataclass
class Record:
    id: str
    text: str
    metadata: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    distance: float = 0.0


def collection_name(namespace: str) -> str:
    # Chroma names allow [a-zA-Z0-9._-], 3-512 chars, alphanumeric ends; agent names allow more shapes.
    return "ns-" + hashlib.sha256(namespace.encode()).hexdigest()[:40]


def _where(filters: dict[str, str]) -> dict | None:
    if not filters:
        return None
    clauses = [{k: {"$eq": v}} for k, v in sorted(filters.items())]
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


class VectorMemory:
    def __init__(
        self, path: Path | None = None, embedder=None, http: tuple[str, int] | None = None, max_entries: int = 0
    ):
        import chromadb
        from chromadb.config import Settings

        settings = Settings(anonymized_telemetry=False)
        if http is not None:
            self.client = chromadb.HttpClient(host=http[0], port=http[1], settings=settings)
        else:
            path.mkdir(parents=True, exist_ok=True)
            self.client = chromadb.PersistentClient(path=str(path), settings=settings)
        if embedder is None:
            from .embed import Embedder

            embedder = Embedder()
        self.embed = embedder
        self.max_entries = max_entries
        self._collections: dict[str, object] = {}
        self._lock = threading.Lock()
        self._max_batch: int | None = None

    def _batch_size(self) -> int:
        """The largest batch Chroma takes (a server asks its own; asked once)."""
        if self._max_batch is None:
            n = self.client.get_max_batch_size()
            self._max_batch = n if n > 0 else 1000      # -1: the server did not say
        return self._max_batch

    def _coll(self, namespace: str):
        with self._lock:
            coll = self._collections.get(namespace)
            if coll is None:
                coll = self.client.get_or_create_collection(
                    collection_name(namespace),
                    embedding_function=None,
                    configuration={"hnsw": {"space": "cosine"}},
                    metadata={"kernos_namespace": namespace},
                )
                self._collections[namespace] = coll
            return coll

    @staticmethod
    def _check_text(text: str) -> None:
        if not text or not text.strip():
            raise MemoryError_("INVALID_ARGUMENT", "memory text is empty")
        if len(text.encode()) > MAX_TEXT:
            raise MemoryError_("INVALID_ARGUMENT", f"memory text is over {MAX_TEXT} bytes")

    @staticmethod
    def _check_ids(ids: list[str]) -> None:
        if not ids:
            raise MemoryError_("INVALID_ARGUMENT", "give at least one id")
        if len(ids) > 1000 or any(not i or len(i) > MAX_ID for i in ids):
            raise MemoryError_("INVALID_ARGUMENT", f"1 to 1000 ids, each 1 to {MAX_ID} characters")

    @staticmethod
    def _check_meta(meta: dict[str, str]) -> None:
        if RESERVED in meta:
            raise MemoryError_("INVALID_ARGUMENT", f"metadata key '{RESERVED}' is reserved")
        if len(meta) > 32 or any(len(k) > 128 or len(v) > 1024 for k, v in meta.items()):
            raise MemoryError_("INVALID_ARGUMENT", "metadata: at most 32 keys, keys <= 128 and values <= 1024 chars")

    @_rejects_bad_input
    def add(
        self,
        namespace: str,
        texts: list[str],
        metadatas: list[dict[str, str]] | None = None,
        ids: list[str] | None = None,
    ) -> list[str]:
        if not texts:
            raise MemoryError_("INVALID_ARGUMENT", "nothing to add")
        metadatas = metadatas or [{} for _ in texts]
        ids = [i or uuid.uuid4().hex for i in (ids or [""] * len(texts))]
        for t, m, i in zip(texts, metadatas, ids):
            self._check_text(t)
            self._check_meta(m)
            if len(i) > MAX_ID:
                raise MemoryError_("INVALID_ARGUMENT", f"memory ids are at most {MAX_ID} characters")
        if len(set(ids)) != len(ids):
            raise MemoryError_("INVALID_ARGUMENT", "duplicate ids in one add")
        coll = self._coll(namespace)
        if coll.get(ids=ids, include=[])["ids"]:
            raise MemoryError_("ALREADY_EXISTS", "an entry with one of these ids exists; use update")
        if self.max_entries and coll.count() + len(texts) > self.max_entries:
            raise MemoryError_("RESOURCE_EXHAUSTED", f"memory quota: {coll.count()} of {self.max_entries} entries used")
        now = time.time()
        embeddings = self.embed(texts)
        metas = [dict(m, **{RESERVED: now}) for m in metadatas]
        step = self._batch_size()   # Chroma refuses larger batches (a 3.8 MB indexed file: 500)
        for i in range(0, len(texts), step):
            coll.add(ids=ids[i:i + step], embeddings=embeddings[i:i + step], documents=texts[i:i + step],
                     metadatas=metas[i:i + step])
        return ids

    @_rejects_bad_input
    def search(self, namespace: str, query: str, k: int = 5, where: dict[str, str] | None = None) -> list[Record]:
        self._check_text(query)
        self._check_meta(where or {})
        if not 1 <= k <= 100:
            raise MemoryError_("INVALID_ARGUMENT", "k must be between 1 and 100")
        res = self._coll(namespace).query(
            query_embeddings=self.embed([query]),
            n_results=k,
            where=_where(where or {}),
            include=["documents", "metadatas", "distances"],
        )
        return [
            self._record(i, d, m, dist)
            for i, d, m, dist in zip(res["ids"][0], res["documents"][0], res["metadatas"][0], res["distances"][0])
        ]

    @_rejects_bad_input
    def get(self, namespace: str, ids: list[str]) -> list[Record]:
        self._check_ids(ids)
        res = self._coll(namespace).get(ids=list(dict.fromkeys(ids)), include=["documents", "metadatas"])
        found = {i: self._record(i, d, m) for i, d, m in zip(res["ids"], res["documents"], res["metadatas"])}
        missing = [i for i in ids if i not in found]
        if missing:
            raise MemoryError_("NOT_FOUND", f"no memory entries {missing[:5]}")
        return [found[i] for i in ids]

    @_rejects_bad_input
    def documents(self, namespace: str, limit: int = 5000) -> list[Record]:
        """Up to `limit` entries of a namespace, in storage order (distractor pools, exports)."""
        res = self._coll(namespace).get(limit=limit, include=["documents", "metadatas"])
        return [self._record(i, d, m) for i, d, m in zip(res["ids"], res["documents"], res["metadatas"])]

    @_rejects_bad_input
    def update(
        self, namespace: str, id_: str, text: str | None = None, metadata: dict[str, str] | None = None
    ) -> Record:
        self._check_ids([id_])
        [old] = self.get(namespace, [id_])
        new_text = text if text else old.text
        self._check_text(new_text)
        meta = dict(metadata) if metadata is not None else dict(old.metadata)
        self._check_meta(meta)
        # Chroma re-embeds any document passed without embeddings, so always pass them.
        self._coll(namespace).update(
            ids=[id_],
            documents=[new_text],
            embeddings=self.embed([new_text]),
            metadatas=[dict(meta, **{RESERVED: old.created})],
        )
        return Record(id_, new_text, meta, old.created)

    @_rejects_bad_input
    def delete(self, namespace: str, ids: list[str]) -> int:
        self._check_ids(ids)
        coll = self._coll(namespace)
        present = coll.get(ids=list(dict.fromkeys(ids)), include=[])["ids"]
        if present:
            coll.delete(ids=present)
        return len(present)

    @_rejects_bad_input
    def delete_where(self, namespace: str, where: dict[str, str]) -> int:
        coll = self._coll(namespace)
        present = coll.get(where=_where(where), include=[])["ids"]
        step = self._batch_size()
        for i in range(0, len(present), step):
            coll.delete(ids=present[i:i + step])
        return len(present)

    def count(self, namespace: str) -> int:
        return self._coll(namespace).count()

    @staticmethod
    def _record(i, doc, meta, distance=0.0) -> Record:
        meta = dict(meta or {})
        created = float(meta.pop(RESERVED, 0.0))
        return Record(i, doc, {k: str(v) for k, v in meta.items()}, created, float(distance))

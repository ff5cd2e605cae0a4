"""`kernos migrate`: a single machine's data dir into a cluster's backends, so its agents, tokens, grants, files,
contexts, traces and memories carry over when it grows into a cluster.

Each SQLite store becomes its PostgreSQL schema (its tables made from the same schema text the store runs, every
row copied; identity counters moved past the copied ids), file contents go to the object store, and long-term
memory goes to the Chroma server when `memory.chroma_url` is set. Rows whose key is already there are left
alone, so running it again (after an interruption) finishes the job without duplicating anything. Run it with
the single kernel stopped."""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from kernos.storage.db import Databases, connect

# The stores that a cluster shares: their SQLite files under the data dir (the schema name follows the file name).
STORES = ("kernel.db", "access.db", "audit.db", "traces.db", "contexts.db", "responses.db", "files/files.db",
          "bridge.db", "tools.db")


@dataclass
class Report:
    rows: dict[str, int] = field(default_factory=dict)      # "schema.table" -> rows copied
    blobs: int = 0
    blob_bytes: int = 0
    memories: dict[str, int] = field(default_factory=dict)  # collection -> entries copied


def _tables(src: sqlite3.Connection) -> list[tuple[str, str]]:
    return [(name, sql) for name, sql in src.execute(
        "SELECT name, sql FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid")]


def _if_missing(sql: str) -> str:
    """SQLite keeps `CREATE TABLE t` for what was `CREATE TABLE IF NOT EXISTS t`: a store may have made it already."""
    for kind in ("TABLE", "INDEX", "UNIQUE INDEX"):
        head = f"CREATE {kind} "
        if sql.startswith(head) and not sql.startswith(head + "IF NOT EXISTS"):
            return head + "IF NOT EXISTS " + sql[len(head):]
    return sql


def copy_store(src_path: Path, dbs: Databases, relpath: str, report: Report, progress=print) -> None:
    src = sqlite3.connect(f"file:{src_path}?mode=ro", uri=True)
    dst = connect(dbs(relpath))
    try:
        tables = _tables(src)
        indexes = [_if_missing(sql) for (sql,) in src.execute(
            "SELECT sql FROM sqlite_master WHERE type='index' AND sql IS NOT NULL")]
        dst.executescript(";\n".join(_if_missing(sql) for _, sql in tables) + ";")
        if indexes:
            dst.executescript(";\n".join(indexes) + ";")
        for table, _ in tables:
            cols = [r[1] for r in src.execute(f"PRAGMA table_info({table})")]
            copied = 0
            cur = src.execute(f"SELECT {', '.join(cols)} FROM {table}")
            while rows := cur.fetchmany(1000):
                with dst:
                    dst.execute("BEGIN")
                    dst.executemany(f"INSERT INTO {table}({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                                    "ON CONFLICT DO NOTHING", rows)
                copied += len(rows)
            seq = dst.execute("SELECT pg_get_serial_sequence(?, 'id')", (table,)).fetchone()[0] \
                if "id" in cols and dst.dialect == "postgres" else None
            if seq:                              # the next id the store makes follows the copied ones
                dst.execute(f"SELECT setval(?, GREATEST((SELECT COALESCE(MAX(id), 0) FROM {table}), 1))", (seq,))
            report.rows[f"{relpath}:{table}"] = copied
            progress(f"  {relpath} {table}: {copied} rows")
    finally:
        src.close()
        dst.close()


def copy_blobs(root: Path, blobs, report: Report, progress=print) -> None:
    for path in sorted(root.glob("*/*")):
        if path.name.startswith(".") or not path.is_file():
            continue                              # a temp file a crash left: never acknowledged
        data = path.read_bytes()
        blobs.put(path.name, data)
        report.blobs += 1
        report.blob_bytes += len(data)
        if report.blobs % 500 == 0:
            progress(f"  blobs: {report.blobs} ({report.blob_bytes / 2**20:.1f} MiB)")


def copy_memory(chroma_dir: Path, host: str, port: int, report: Report, progress=print) -> None:
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)
    src = chromadb.PersistentClient(path=str(chroma_dir), settings=settings)
    dst = chromadb.HttpClient(host=host, port=port, settings=settings)
    for coll in src.list_collections():
        c = src.get_collection(coll.name if hasattr(coll, "name") else coll)
        target = dst.get_or_create_collection(c.name, embedding_function=None, metadata=c.metadata,
                                              configuration={"hnsw": {"space": "cosine"}})
        got = c.get(include=["embeddings", "documents", "metadatas"])
        for i in range(0, len(got["ids"]), 1000):
            part = slice(i, i + 1000)
            target.upsert(ids=got["ids"][part], embeddings=got["embeddings"][part],
                          documents=got["documents"][part], metadatas=got["metadatas"][part])
        report.memories[c.name] = len(got["ids"])
        progress(f"  memory {c.name}: {len(got['ids'])} entries")


def migrate(data_dir: Path, config, progress=print) -> Report:
    """Copy `data_dir`'s shared state into the backends `config` ([cluster], memory.chroma_url) names."""
    c = config.cluster
    if not c.database:
        raise ValueError("the config names no cluster database ([cluster] database)")
    report = Report()
    dbs = Databases(data_dir, c.database)
    for relpath in STORES:
        path = data_dir / relpath
        if path.exists():
            copy_store(path, dbs, relpath, report, progress)
    if c.objects and (data_dir / "files" / "blobs").is_dir():
        copy_blobs(data_dir / "files" / "blobs", c.blobs("files"), report, progress)
    url = config.memory.chroma_url
    if url and (data_dir / "chroma").is_dir():
        host, _, port = url.split("://", 1)[-1].rstrip("/").rpartition(":")
        copy_memory(data_dir / "chroma", host, int(port), report, progress)
    return report

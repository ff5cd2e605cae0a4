"""The trace log: one record per syscall (agent, kind, request, response, status, timings), the raw
material for the fine-tuner.

Records are written by a background thread in batched transactions so that tracing stays off the
syscall's critical path; `close()` drains the queue. SQLite in WAL mode keeps the file consistent
if the kernel dies: at worst the records of the last moment before a crash are missing, never torn.
"""

from __future__ import annotations

import json
import queue
import threading
import time

from kernos.abi.trace import TraceRecord

from .db import Where, connect

_SCHEMA = """
CREATE TABLE IF NOT EXISTS traces (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    agent_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL,
    timings TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS traces_agent ON traces(agent_id, ts);
CREATE TABLE IF NOT EXISTS outcomes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    agent_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    reward REAL,
    success INTEGER,
    note TEXT NOT NULL,
    preferred TEXT           -- a better reply given as feedback (with the generated one: a pair)
);
CREATE INDEX IF NOT EXISTS outcomes_request ON outcomes(agent_id, request_id);
"""


FAILED_RECORD_BYTES = 4096     # what a failed call keeps of its request and response: failures do not train


def _json(value: dict, status: str) -> str:
    text = json.dumps(value)
    if status != "OK" and len(text) > FAILED_RECORD_BYTES:    # 200 failing requests once added 43 MiB in 5 s
        return json.dumps({"truncated": True, "bytes": len(text), "head": text[:FAILED_RECORD_BYTES]})
    return text


class TraceLog:
    """`max_age_s` and `max_per_agent` (0: none) bound what the log keeps: older records, and an agent's records
    beyond its newest `max_per_agent`, are deleted by the writer as it goes."""

    def __init__(self, path: Where, max_age_s: float = 0, max_per_agent: int = 0):
        self.path = path
        self.max_age_s = max_age_s
        self.max_per_agent = max_per_agent
        self._pruned_at = 0.0
        self._written: dict[str, int] = {}         # records per agent since its last retention check
        self._db = connect(path, synchronous="NORMAL")
        self._db.executescript(_SCHEMA)
        if "preferred" not in self._db.columns("outcomes"):
            self._db.execute("ALTER TABLE outcomes ADD COLUMN preferred TEXT")  # data dirs of an older kernel
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._writer, name="trace-writer", daemon=True)
        self._thread.start()

    def record(self, rec: TraceRecord) -> None:
        if self._closed:
            return
        rec.ts = rec.ts or time.time()
        self._q.put(rec)

    def _writer(self) -> None:
        while True:
            batch = [self._q.get()]
            while len(batch) < 512:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            stop = any(r is None for r in batch)
            rows = [
                (
                    r.ts,
                    r.agent_id,
                    r.kind,
                    r.status,
                    _json(r.request, r.status),
                    _json(r.response, r.status),
                    json.dumps(r.timings),
                )
                for r in batch
                if r is not None
            ]
            if rows:
                with self._db:
                    self._db.execute("BEGIN")
                    self._db.executemany(
                        "INSERT INTO traces(ts, agent_id, kind, status, request, response, timings) "
                        "VALUES (?,?,?,?,?,?,?)",
                        rows,
                    )
                written: dict[str, int] = {}
                for r in rows:
                    written[r[1]] = written.get(r[1], 0) + 1
                self._retain(written)
            if stop:
                return

    def _retain(self, agents: dict[str, int]) -> None:
        """Retention, on the writer's thread: each agent just written keeps its newest `max_per_agent` records;
        once a minute, records older than `max_age_s` go."""
        with self._db:
            if self.max_per_agent:
                for agent in agents:          # checked every 256th record of an agent: the scan walks its index
                    self._written[agent] = self._written.get(agent, 0) + agents[agent]
                    if self._written[agent] < 256:
                        continue
                    self._written.pop(agent)
                    self._db.execute(
                        "DELETE FROM traces WHERE agent_id=? AND ts < (SELECT ts FROM traces WHERE agent_id=? "
                        "ORDER BY ts DESC LIMIT 1 OFFSET ?)", (agent, agent, self.max_per_agent - 1))
            now = time.time()
            if self.max_age_s and now - self._pruned_at > 60:
                self._pruned_at = now
                self._db.execute("DELETE FROM traces WHERE ts < ?", (now - self.max_age_s,))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._q.put(None)
        self._thread.join(timeout=30)
        self._db.close()

    def add_outcome(
        self,
        agent_id: str,
        request_id: str,
        reward: float | None,
        success: bool | None,
        note: str = "",
        preferred: str | None = None,
    ) -> int:
        """Record an outcome (durably, on its own connection); returns how many that generation now has."""
        db = connect(self.path, synchronous="FULL")
        try:
            with db:
                db.execute("BEGIN")
                db.execute(
                    "INSERT INTO outcomes(ts, agent_id, request_id, reward, success, note, preferred) "
                    "VALUES (?,?,?,?,?,?,?)",
                    (
                        time.time(),
                        agent_id,
                        request_id,
                        reward,
                        None if success is None else int(success),
                        note[:1000],
                        preferred or None,
                    ),
                )
            return db.execute(
                "SELECT COUNT(*) FROM outcomes WHERE agent_id=? AND request_id=?", (agent_id, request_id)
            ).fetchone()[0]
        finally:
            db.close()

    def outcomes(self, agent_id: str) -> dict[str, list[dict]]:
        db = connect(self.path, synchronous="NORMAL")
        try:
            rows = db.execute(
                "SELECT request_id, reward, success, note, preferred FROM outcomes WHERE agent_id=? ORDER BY id",
                (agent_id,),
            ).fetchall()
        finally:
            db.close()
        out: dict[str, list[dict]] = {}
        for rid, reward, success, note, preferred in rows:
            out.setdefault(rid, []).append(
                {
                    "reward": reward,
                    "success": None if success is None else bool(success),
                    "note": note,
                    "preferred": preferred,
                }
            )
        return out

    def has_generation(self, agent_id: str, request_id: str) -> bool:
        db = connect(self.path, synchronous="NORMAL")
        try:
            return (
                db.execute(
                    "SELECT 1 FROM traces WHERE agent_id=? AND kind='llm.generate' AND status='OK' AND "
                    "response LIKE ? LIMIT 1",
                    (agent_id, f'%"request_id": "{request_id}"%'),
                ).fetchone()
                is not None
            )
        finally:
            db.close()

    def scan(self, agent_id: str, kind: str, status: str = "OK", page: int = 256):
        """An agent's records of `kind` and `status`, oldest first, read a page at a time (building a data set
        from every trace of an agent held them all at once: +522 MiB after 1,400 long ones)."""
        db = connect(self.path, synchronous="NORMAL")
        try:
            last = 0
            while True:
                rows = db.execute(
                    "SELECT id, ts, agent_id, kind, status, request, response, timings FROM traces WHERE agent_id=? "
                    "AND kind=? AND status=? AND id>? ORDER BY id LIMIT ?", (agent_id, kind, status, last, page)
                ).fetchall()
                for i, ts, a, k, st, rq, rs, t in rows:
                    last = i
                    yield TraceRecord(a, k, st, json.loads(rq), json.loads(rs), json.loads(t), ts)
                if len(rows) < page:
                    return
        finally:
            db.close()

    def query(self, agent_id: str | None = None, kind: str | None = None, limit: int = 1000) -> list[TraceRecord]:
        """Read records back, newest last. Uses its own connection: safe while the writer runs."""
        db = connect(self.path, synchronous="NORMAL")
        try:
            sql, args = "SELECT ts, agent_id, kind, status, request, response, timings FROM traces", []
            where = []
            if agent_id is not None:
                where.append("agent_id = ?")
                args.append(agent_id)
            if kind is not None:
                where.append("kind = ?")
                args.append(kind)
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY id DESC LIMIT ?"
            args.append(limit)
            rows = db.execute(sql, args).fetchall()
        finally:
            db.close()
        return [
            TraceRecord(
                agent_id=a,
                kind=k,
                status=s,
                request=json.loads(rq),
                response=json.loads(rs),
                timings=json.loads(t),
                ts=ts,
            )
            for ts, a, k, s, rq, rs, t in reversed(rows)
        ]

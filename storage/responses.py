"""Stored responses of the Responses API (`/v1/responses`): each is its owner's, durable (SQLite, full sync)
before it is acknowledged, and names the response it continues (`previous_response_id`), so that a chain is the
agent's conversation, surviving restarts."""
from __future__ import annotations

import json
import threading
import time

from .db import Where, connect, upsert

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    previous_id TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    input_items TEXT NOT NULL,          -- the items this response was given (JSON list)
    response TEXT NOT NULL              -- the response object as returned (JSON)
);
CREATE INDEX IF NOT EXISTS responses_owner ON responses(owner);
"""


class ResponseStore:
    def __init__(self, path: Where):
        self._db = connect(path, synchronous="FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def put(self, owner: str, response: dict, input_items: list[dict]) -> None:
        with self._lock:
            self._db.execute(
                upsert("responses", ("id", "owner", "previous_id", "created", "input_items", "response"), ("id",)),
                (response["id"], owner, response.get("previous_response_id") or "", time.time(),
                 json.dumps(input_items), json.dumps(response)))

    def get(self, owner: str, response_id: str) -> tuple[dict, list[dict]] | None:
        """(the response, its input items), or None: no such response of this owner (another's is not told)."""
        r = self._db.execute("SELECT response, input_items FROM responses WHERE id=? AND owner=?",
                             (response_id, owner)).fetchone()
        return (json.loads(r[0]), json.loads(r[1])) if r else None

    def delete(self, owner: str, response_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM responses WHERE id=? AND owner=?",
                                    (response_id, owner)).rowcount > 0

    def close(self) -> None:
        self._db.close()

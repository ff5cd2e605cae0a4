"""SQLite with the settings every kernel database uses: WAL journal, full sync for acknowledged writes."""
from __future__ import annotations

import sqlite3
from pathlib import Path


def connect(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("PRAGMA busy_timeout=30000")
    return db

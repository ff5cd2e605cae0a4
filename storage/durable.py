"""fsync helpers: what "acknowledged only when durable" is made of."""
from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then every directory, deepest first."""
    dirs = [Path(path)]
    for f in Path(path).rglob("*"):
        if f.is_dir():
            dirs.append(f)
        else:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in sorted(dirs, key=lambda d: -len(d.parts)):
        fsync_dir(d)

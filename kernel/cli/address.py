"""Where a running kernel is: --address, $KERNOS_ADDRESS, the data dir's kernel.addr, or the default."""
from __future__ import annotations

import os
from pathlib import Path


def address(args) -> str:
    if getattr(args, "address", None):
        return args.address
    if os.environ.get("KERNOS_ADDRESS"):
        return os.environ["KERNOS_ADDRESS"]
    addr_file = Path(os.path.expanduser(args.data_dir or "~/.kernos")) / "kernel.addr"
    if addr_file.exists():
        return addr_file.read_text().strip()
    return "127.0.0.1:7070"

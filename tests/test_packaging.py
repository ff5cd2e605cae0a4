"""House rules that are checkable: the SDK stays thin, generated code is fresh, the scheduler is pure."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(','.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.strip().split(","))


def test_sdk_import_pulls_in_no_heavy_modules():
    mods = _imports_after("import kernos.sdk, kernos.sdk.aio")
    assert not {"torch", "transformers", "chromadb", "peft"} & mods


def test_scheduler_imports_no_torch():
    assert "torch" not in _imports_after("import kernos.scheduler")


def test_generated_grpc_modules_are_up_to_date():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    for cmd in ("serve", "demo", "status", "top", "agents"):
        assert cmd in out.stdout

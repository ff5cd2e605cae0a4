"""A sandboxed Python runner for tools: a fresh interpreter (`python -I`) in a subprocess with CPU-time,
memory, file-size and open-file limits, a wall-clock timeout, its own temporary directory as cwd and
HOME, a scrubbed environment, and no network (a new network namespace via `unshare -rn`, where even
loopback is down). The code sees `args` (the call's JSON arguments) and sets `result` (JSON-able)."""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache

_PRELUDE = "import json, sys\nargs = json.loads(sys.stdin.read() or 'null')\nresult = None\n"
_EPILOGUE = "\nprint('\\n__KERNOS_RESULT__' + json.dumps(result))\n"


@dataclass
class SandboxResult:
    ok: bool
    result: object = None
    error: str = ""
    stdout: str = ""


@lru_cache(maxsize=1)
def network_isolation() -> list[str]:
    """The command prefix that removes the network, if this machine allows it (else no isolation)."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode == 0:
        return [unshare, "-rn"]
    return []


def run_python(code: str, args, cpu_s: float = 5, memory_mb: int = 256, wall_s: float = 10,
               max_output: int = 64 * 1024) -> SandboxResult:
    tmp = tempfile.mkdtemp(prefix="kernos-sandbox-")

    def limits():
        resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_s) or 1, int(cpu_s) or 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        os.setsid()

    cmd = network_isolation() + [sys.executable, "-I", "-c", _PRELUDE + code + _EPILOGUE]
    try:
        proc = subprocess.run(cmd, input=json.dumps(args), capture_output=True, text=True, timeout=wall_s, cwd=tmp,
                              env={"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"},
                              preexec_fn=limits)
    except subprocess.TimeoutExpired:
        return SandboxResult(False, error=f"wall-clock limit of {wall_s:g} s exceeded")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = proc.stdout[-max_output:]
    if proc.returncode != 0:
        if proc.returncode in (-9, -24, 137, 152):  # SIGKILL / SIGXCPU from the CPU limit
            return SandboxResult(False, error=f"CPU-time limit of {cpu_s:g} s exceeded", stdout=out)
        last = (proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]
        if "MemoryError" in proc.stderr:
            last = f"memory limit of {memory_mb} MB exceeded ({last})"
        return SandboxResult(False, error=last[:2000], stdout=out)
    head, sep, tail = proc.stdout.rpartition("\n__KERNOS_RESULT__")
    if not sep:
        return SandboxResult(False, error="the code did not finish normally", stdout=out)
    return SandboxResult(True, result=json.loads(tail), stdout=head[-max_output:])

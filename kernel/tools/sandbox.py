"""Running a tool's Python: in the jail (`jail.py`), or, only where the operator set
`tools.unsafe_no_jail = true` on a machine without one, in a plain subprocess with the same limits and no
network but the kernel's view of the filesystem.

The job (code and arguments) goes in, and stdout, stderr and the result come out, through anonymous
in-memory files (memfd) rather than pipes: output is bounded by the file-size limit, nothing can block on
a full pipe, and the result has its own channel, which printing cannot forge. The code sees `args` and
sets `result` (JSON-able)."""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache

from .jail import PRELUDE, Jail, Limits


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


def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(name)
    if data:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read(fd: int, limit: int) -> str:
    size = os.lseek(fd, 0, os.SEEK_END)
    os.lseek(fd, max(0, size - limit), os.SEEK_SET)
    return os.read(fd, limit).decode("utf-8", "replace")


def _command(jail: Jail | None, limits: Limits, result_fd: int) -> tuple[list[str], dict]:
    env = {"KERNOS_LIMITS": json.dumps({"cpu_s": max(1, int(limits.cpu_s)), "memory_mb": limits.memory_mb,
                                        "file_mb": limits.file_mb, "open_files": limits.open_files,
                                        "processes": limits.processes}),
           "KERNOS_RESULT_FD": str(result_fd)}
    if jail is not None:
        argv = jail.argv()
        for k, v in env.items():
            argv += ["--setenv", k, v]
        return argv + ["--", jail.python, "-I", "-c", PRELUDE], {"env": {"PATH": "/usr/bin:/bin"}}
    # Unsafe: no jail. Still no network, a scrubbed environment and the same limits (set by the prelude).
    return network_isolation() + [sys.executable, "-I", "-c", PRELUDE], {
        "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **env}}


def run_python(code: str, args, limits: Limits, jail: Jail | None, on_start=None,
               max_output: int = 64 * 1024) -> SandboxResult:
    """Run `code` with `args`; `on_start(proc)` gets the process (so a draining kernel can kill it)."""
    job = _memfd("kernos-job", json.dumps({"code": code, "args": args}).encode())
    out, err, res = _memfd("kernos-stdout"), _memfd("kernos-stderr"), _memfd("kernos-result")
    try:
        argv, extra = _command(jail, limits, res)
        cwd = None
        if jail is None:
            import tempfile
            cwd = tempfile.mkdtemp(prefix="kernos-sandbox-")
            extra["env"].update(HOME=cwd, TMPDIR=cwd)
        try:
            proc = subprocess.Popen(argv, stdin=job, stdout=out, stderr=err, pass_fds=(res,), cwd=cwd,
                                    start_new_session=True, **extra)
            if on_start is not None:
                on_start(proc)
            try:
                code_ = _wait(proc, limits.wall_s)
            except subprocess.TimeoutExpired:
                kill(proc)
                return SandboxResult(False, error=f"wall-clock limit of {limits.wall_s:g} s exceeded",
                                     stdout=_read(out, max_output))
            finally:
                kill(proc)              # whatever it left behind (the jail's PID namespace already did)
        finally:
            if cwd is not None:
                shutil.rmtree(cwd, ignore_errors=True)
        stdout, stderr = _read(out, max_output), _read(err, 16 * 1024)
        if code_ != 0:
            if code_ in (-signal.SIGKILL, -signal.SIGXCPU, 128 + signal.SIGKILL, 128 + signal.SIGXCPU):
                return SandboxResult(False, error=f"CPU-time limit of {limits.cpu_s:g} s exceeded", stdout=stdout)
            last = (stderr.strip().splitlines() or [f"exit code {code_}"])[-1]
            if "MemoryError" in stderr:
                last = f"memory limit of {limits.memory_mb} MB exceeded ({last})"
            return SandboxResult(False, error=last[:2000], stdout=stdout)
        raw = _read(res, 16 << 20)
        if not raw:
            return SandboxResult(False, error="the code did not finish normally (no result)", stdout=stdout)
        return SandboxResult(True, result=json.loads(raw), stdout=stdout)
    finally:
        for fd in (job, out, err, res):
            os.close(fd)


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    """The exit code; woken by the process's pidfd at exit (Popen.wait(timeout) polls with sleeps that grow
    to 50 ms, which cost about 8 ms a call here)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return proc.wait(timeout=timeout)
    try:
        if not select.select([fd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        return proc.wait()
    finally:
        os.close(fd)


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def self_test(jail: Jail) -> str | None:
    """None when the jail holds; else what is wrong."""
    if not jail.bwrap:
        return "bubblewrap (bwrap) is not installed"
    if not os.path.exists(jail.python):
        return f"no interpreter for the jail at {jail.python}"
    probe = (
        "import os, socket\n"
        "seen = sorted(os.listdir('/'))\n"
        "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=1); net = True\n"
        "except OSError:\n    net = False\n"
        "import resource\n"
        "result = {'root': seen, 'net': net, 'uid': os.getuid(), 'pid': os.getpid(),\n"
        "          'passwd': os.path.exists('/etc/passwd'), 'cwd': os.getcwd(),\n"
        "          'nproc': resource.getrlimit(resource.RLIMIT_NPROC)[0], 'env': sorted(os.environ)}\n")
    out = run_python(probe, {}, Limits(cpu_s=5, memory_mb=256, wall_s=20, processes=8), jail)
    if not out.ok:
        return f"the probe failed in the jail: {out.error}"
    r = out.result
    problems = []
    if r["net"]:
        problems.append("it reached the network")
    if r["passwd"] or any(d in r["root"] for d in ("etc", "home", "root", "tmp", "var")):
        problems.append(f"it sees the host filesystem: {r['root']}")
    if r["pid"] > 3:
        problems.append("it has no PID namespace of its own")
    if r["nproc"] != 8:
        problems.append("the process limit did not apply")
    if r["cwd"] != "/work":
        problems.append(f"its working dir is {r['cwd']}")
    return "; ".join(problems) or None

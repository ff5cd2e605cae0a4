"""The jail tool code runs in: bubblewrap (Debian's `bwrap`), one fresh set of namespaces per call.

What a jailed call sees and may do:
- its own mount namespace: `/usr` (and the `/bin`, `/lib`, `/lib64` links into it) read-only, and `/work`,
  an empty size-limited tmpfs, as its only writable place (cwd and HOME). No `/etc`, no `/root`, no
  `/home`, nothing of the kernel's data dir or of other agents' files, no host `/tmp`;
- no network (its own network namespace: not even loopback), its own IPC and UTS namespaces;
- its own PID namespace: when the call's interpreter exits (or the kernel kills the jail at its wall
  limit), every process it started dies with it; `--die-with-parent` ties the jail to the kernel;
- an unprivileged identity: no capabilities, and on a kernel running as root, the host uid `nobody`, so
  that the per-call process limit binds (the kernel exempts root's processes from RLIMIT_NPROC);
- CPU time, address space, file size, open files and process count limits, set by the jail's own
  prelude before the tool's code runs (and not raisable by it);
- the result goes back over a pipe the tool's output cannot forge (not stdout).

The kernel checks at start that all of this holds (`sandbox.self_test`); without a working jail it refuses to
run code unless the operator sets `tools.unsafe_no_jail = true`.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass

log = logging.getLogger("kernos.tools")

NOBODY = 65534
WORK_MB = 64          # the size of a call's writable /work tmpfs
PRELUDE = r'''
import json, os, resource, sys
_cfg = json.loads(os.environ.pop("KERNOS_LIMITS"))
_fd = int(os.environ.pop("KERNOS_RESULT_FD"))
for _name, _value in (("RLIMIT_CPU", _cfg["cpu_s"]), ("RLIMIT_AS", _cfg["memory_mb"] << 20),
                      ("RLIMIT_FSIZE", _cfg["file_mb"] << 20), ("RLIMIT_NOFILE", _cfg["open_files"]),
                      ("RLIMIT_NPROC", _cfg["processes"])):
    resource.setrlimit(getattr(resource, _name), (_value, _value))
_job = json.loads(sys.stdin.read())
_ns = {"__name__": "__tool__", "args": _job["args"], "result": None}
exec(compile(_job["code"], "<tool>", "exec"), _ns)
with os.fdopen(_fd, "w") as _out:
    _out.write(json.dumps(_ns["result"]))
'''


@dataclass
class Limits:
    cpu_s: float = 5
    memory_mb: int = 256
    wall_s: float = 10
    processes: int = 32
    file_mb: int = 16
    open_files: int = 64


class Jail:
    def __init__(self, python: str = ""):
        self.bwrap = shutil.which("bwrap")
        # Dropped after exec, by setpriv in a fresh single-threaded process: setuid in the child of a fork
        # of the (multi-threaded) kernel crashed about one call in three (SIGSEGV), measured here.
        self.setpriv = shutil.which("setpriv")
        self.drop_to_nobody = os.geteuid() == 0 and self.setpriv is not None
        self.python = python or self._default_python()

    def _default_python(self) -> str:
        # The jail sees /usr only: an interpreter outside it (a pyenv build under /root, say) is not there,
        # and `nobody` could not read it anyway. Tools get the standard library of /usr's Python.
        base = os.path.realpath(sys.executable)
        if base.startswith("/usr/") and not self.drop_to_nobody:
            return base
        return "/usr/bin/python3"

    def argv(self) -> list[str]:
        """bubblewrap's command line, up to (not including) the interpreter."""
        if not self.bwrap:
            raise FileNotFoundError("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
        lib = [a for d in ("lib", "lib64", "bin", "sbin") if os.path.islink(f"/{d}")
               for a in ("--symlink", os.readlink(f"/{d}"), f"/{d}")]
        lib += [a for d in ("lib", "lib64", "bin") if os.path.isdir(f"/{d}") and not os.path.islink(f"/{d}")
                for a in ("--ro-bind", f"/{d}", f"/{d}")]
        drop = ([self.setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
                if self.drop_to_nobody else [])
        return [*drop, self.bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                "--ro-bind", "/usr", "/usr", *lib, "--proc", "/proc", "--dev", "/dev",
                "--size", str(WORK_MB << 20), "--tmpfs", "/work", "--remount-ro", "/", "--chdir", "/work", "--clearenv",
                "--setenv", "HOME", "/work", "--setenv", "TMPDIR", "/work", "--setenv", "LANG", "C.UTF-8",
                "--setenv", "PATH", "/usr/bin:/bin"]


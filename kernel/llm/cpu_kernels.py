"""bf16 kernels for decoding on one CPU thread with AVX512-BF16 (`cpu_kernels.c`): linears for small batches
(shared with helper threads on idle cores), attention of a query position per row (a decode step's rows or a
prompt chunk's positions), and a layer's elementwise work (residual add + RMSNorm, rotary + cache write,
SiLU x up).

Decoding a small model reads every weight once per step for a handful of rows, so its linears are bound by
how fast the weights stream from memory. On one thread oneDNN's packed bf16 linear streams about 9-11 GB/s
at batch 1-8 on the machine this was measured on (a Zen 4 VM whose plain reads reach 22 GB/s); this kernel,
whose packed tiles feed every row of the batch from one load, reaches 15-24 GB/s there. Each output sums
its products in the same order whatever the batch, so a row's result does not depend on the rows beside it.
The attention reads each row's own cache columns only (no padding), in fp32, in one call per layer instead
of a dozen tensor operations.

The kernel is plain C compiled once with the system's C compiler into a per-user cache (a second or so, no
torch headers) and called through ctypes, which releases the GIL. Where there is no compiler, no
AVX512-BF16, or more than one compute thread (oneDNN spreads a linear over threads; this kernel does not),
`available()` is false and linears stay on oneDNN (`engine.cpu_kernels = "off"` asks for that too).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("kernos.llm")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-shared", "-fPIC"]
AMX_FLAGS = ["-mamx-tile", "-mamx-bf16", "-DKERNOS_AMX"]     # where the compiler knows AMX (gcc 11+, clang 12+)
_P, _I = ctypes.c_void_p, ctypes.c_int


def cache_dir() -> Path:
    """Where compiled kernels are kept: $KERNOS_CACHE_DIR, else $XDG_CACHE_HOME/kernos or ~/.cache/kernos."""
    if os.environ.get("KERNOS_CACHE_DIR"):
        return Path(os.environ["KERNOS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kernos"


def _build(target: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise OSError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, *AMX_FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                             timeout=120)
        if res.returncode:               # an older compiler: the kernels without AMX
            res = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
        if res.returncode:
            raise OSError(f"{cc} failed: {res.stderr.strip()[-500:]}")
        os.replace(tmp, target)          # atomic: a concurrent kernel loads a whole library or builds its own
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@lru_cache(maxsize=1)
def library():
    """The compiled kernel, or None (with the reason logged) where it cannot be built or run here."""

    if "avx512_bf16" not in cpu_flags():
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS + AMX_FLAGS).encode()).hexdigest()[:16]
    name = f"cpu_kernels-{digest}.so"
    lib, errors = None, []
    # the per-user cache first; a private temporary folder where it is not writable (a sandboxed service)
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"kernos-{os.getuid()}"):
        try:
            if not (folder / name).exists():
                _build(folder / name)
            lib = ctypes.CDLL(str(folder / name))
            break
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{folder}: {e}")
    if lib is None:
        log.warning("the own bf16 CPU kernels are unavailable, oneDNN serves: %s", "; ".join(errors))
        return None
    lib.kernos_linear_bf16.argtypes = [_P, _I, _I, _P, _I, _P, _P]
    lib.kernos_linear_bf16.restype = None
    lib.kernos_pack_bf16.argtypes = [_P, _I, _I, _P]
    lib.kernos_pack_bf16.restype = None
    lib.kernos_tile_outputs.restype = _I
    lib.kernos_attention_bf16.argtypes = [_P, _P, _P, ctypes.c_long, ctypes.c_long, _I, _I, _I, _I, _P, _P,
                                          ctypes.c_float, _P, _P, ctypes.c_long]
    lib.kernos_attention_bf16.restype = None
    lib.kernos_add_rmsnorm_bf16.argtypes = [_P, _P, _P, _I, _I, ctypes.c_float, _P]
    lib.kernos_rope_append_bf16.argtypes = [_P, _I, _I, _I, _I, _P, _P, _P, _P, _P, ctypes.c_long, ctypes.c_long, _I,
                                            _I]
    lib.kernos_silu_mul_bf16.argtypes = [_P, _I, _I, _P]
    for f in (lib.kernos_add_rmsnorm_bf16, lib.kernos_rope_append_bf16, lib.kernos_silu_mul_bf16):
        f.restype = None
    lib.kernos_start_helpers.argtypes = [_I]
    lib.kernos_start_helpers.restype = _I
    lib.kernos_amx_enable.argtypes = [_I]
    lib.kernos_amx_enable.restype = _I
    return lib


def use_amx(on: bool) -> bool:
    """Compute linears whose input size is a multiple of 32 on AMX (where the CPU has it and the OS grants its
    tile state) or not; returns whether AMX is on. A process's weights must all be used one way (a row's result
    depends on it), so this is set when models load, before any runs: `engine.cpu_kernels` ("auto": AMX)."""
    lib = library()
    if lib is None:
        return False
    got = bool(lib.kernos_amx_enable(int(on and "amx_bf16" in cpu_flags())))
    if got != _amx_state[0]:
        log.info("own CPU kernels: AMX %s", "on" if got else "off" if not on else "not granted by the OS: off")
        _amx_state[0] = got
    return got


_amx_state = [False]


def amx_enabled() -> bool:
    return _amx_state[0]


def start_helpers(count: int) -> int:
    """Start `count` helper threads (once per process) that take tiles of large linears on otherwise idle
    cores; returns how many run. They spin briefly between the calls of a step (yielding to any other thread
    that wants the core) and sleep otherwise. Results are the same with or without them."""
    lib = library()
    _helpers[0] = lib.kernos_start_helpers(max(0, count)) if lib is not None else 0
    return _helpers[0]


_helpers = [0]      # helper threads running (each needs its own attention scratch)


def available(in_features: int) -> bool:
    return in_features % 2 == 0 and torch.get_num_threads() == 1 and library() is not None


class PackedWeight:
    """A [N, K] bf16 weight (and optional bias, kept in fp32) in the kernel's tiled layout."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None):
        if weight is None:            # filled in by `fuse`
            return
        lib = library()
        n, k = weight.shape
        tile = lib.kernos_tile_outputs()
        w = weight.detach().contiguous()
        self.packed = torch.empty(((n + tile - 1) // tile) * tile * k, dtype=torch.bfloat16)
        lib.kernos_pack_bf16(w.data_ptr(), n, k, self.packed.data_ptr())
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.out_features, self.in_features = n, k

    @classmethod
    def fuse(cls, linears: list) -> PackedWeight:
        """One weight computing the outputs of `linears` (nn.Linear layers packed with PackedWeight) side by
        side: one call instead of several, e.g. q, k and v. Where each part is a whole number of tiles (every
        real model's projections), the parts become views into the fused weight, which costs no memory;
        otherwise the fused weight is packed anew beside them. Every output is computed exactly as by its part."""
        parts = [m._kernos_packed for m in linears]
        tile = library().kernos_tile_outputs()
        if len({p.in_features for p in parts}) != 1:
            raise ValueError("fused linears must share their input size")
        bias = None
        if any(m.bias is not None for m in linears):
            bias = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                              for m in linears])
        if any(p.out_features % tile for p in parts):
            return cls(torch.cat([m.weight.detach() for m in linears]), bias)
        fused = cls(None, None)
        fused.in_features, fused.out_features = parts[0].in_features, sum(p.out_features for p in parts)
        fused.packed = torch.cat([p.packed for p in parts])
        fused.bias = None if bias is None else bias.float().contiguous()
        offset = 0
        for p in parts:
            p.packed = fused.packed[offset:offset + p.packed.numel()]
            offset += p.packed.numel()
        return fused

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        rows = x.numel() // self.in_features
        y = torch.empty(*x.shape[:-1], self.out_features, dtype=torch.bfloat16)
        library().kernos_linear_bf16(x.data_ptr(), rows, self.in_features, self.packed.data_ptr(),
                                     self.out_features, None if self.bias is None else self.bias.data_ptr(),
                                     y.data_ptr())
        return y


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
              scale: float, one_sequence: bool = False) -> torch.Tensor:
    """A query position per row: q [M, H, D] bf16 (contiguous); keys and values [B, KV, L, D] bf16 with
    unit-stride columns (views into cache buffers are fine). Row m attends to columns start[m] .. end[m] - 1
    (int32) of cache row m, or of cache row 0 with `one_sequence` (a prompt chunk's positions). [M, H, D] bf16."""
    m, h, d = q.shape
    out = torch.empty_like(q)
    per = 2 * (h // keys.shape[1]) * (keys.shape[2] + 2)
    scratch = torch.empty(per * (_helpers[0] + 1), dtype=torch.float32)      # one for each thread that may work
    library().kernos_attention_bf16(q.data_ptr(), keys.data_ptr(), values.data_ptr(),
                                    0 if one_sequence else keys.stride(0), keys.stride(1), m, h, keys.shape[1], d,
                                    start.data_ptr(), end.data_ptr(), scale, out.data_ptr(), scratch.data_ptr(), per)
    return out


def add_rmsnorm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h += delta in place (when given); returns RMSNorm(h) * weight. h [M, H] bf16, contiguous."""
    out = torch.empty_like(h)
    m, n = h.shape
    library().kernos_add_rmsnorm_bf16(h.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                                      m, n, eps, out.data_ptr())
    return out


def rope_append(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, column: int, one_sequence: bool = False) -> torch.Tensor:
    """Rotary on q and k of a fused projection qkv [M, (heads + 2 kv_heads) * D]; row m's k and v written into
    column `column` of cache row m of the buffers keys/values [B, kv_heads, capacity, D], or with
    `one_sequence` into column `column + m` of cache row 0 (a prompt chunk). Returns q [M, heads, D]."""
    m, d = qkv.shape[0], cos.shape[-1]
    q = torch.empty(m, heads, d, dtype=torch.bfloat16)
    library().kernos_rope_append_bf16(qkv.data_ptr(), m, heads, kv_heads, d, cos.data_ptr(), sin.data_ptr(),
                                      q.data_ptr(), keys.data_ptr(), values.data_ptr(),
                                      0 if one_sequence else keys.stride(0), keys.stride(1), column,
                                      1 if one_sequence else 0)
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [M, 2 I] -> silu(gate) * up [M, I], bf16."""
    m, width = gate_up.shape
    out = torch.empty(m, width // 2, dtype=torch.bfloat16)
    library().kernos_silu_mul_bf16(gate_up.data_ptr(), m, width // 2, out.data_ptr())
    return out

"""The LUT forward on the CPU as one compiled pass (ops/kernels/csrc/lut_cpu.c), built on first use.

Why C and not torch ops: quantize-then-gather in torch is five passes over memory (multiply,
round, clamp, convert, gather) where the native activation is one, so it ran 2-3x slower than
`F.gelu` on two cores. The C loop does all of it per element in SIMD registers (AVX2/AVX-512
gathers from the 2^Q-entry table) and splits large tensors over torch's threads with OpenMP.

Why built at first use rather than at install time: a setuptools build would need torch in an
isolated build environment, which pulls an unpinned (CUDA) torch from the network. The source
is compiled once per machine with the system's C compiler (`$CC`, else `cc`) into a cache
folder (`$GQA_LUT_CACHE`, else `~/.cache/gqa_lut`), keyed by the source, the flags and the
processor, and written atomically, so parallel processes never load a half-written library.
Without a compiler, or with `GQA_LUT_CPU_KERNEL=0`, `load()` returns None and the torch ops
compute the same bits (`status()` says why).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from ops.kernels.reference import dense, walkable

SOURCE = Path(__file__).resolve().parent / "csrc" / "lut_cpu.c"
FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-fopenmp"]
NATIVE = ["-march=native"]  # the gathers need AVX2 or AVX-512; the bits do not depend on it

_P, _N, _F, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int32
# the library's functions (ops/kernels/csrc/lut_cpu.c): (return type, argument types); pointers, then
# the element count, then scalars, the thread count last
SIGNATURES = {
    "lut_f32": (None, [_P, _P, _P, _N, _F, _I, _I, _I]),
    "lut_bf16": (None, [_P, _P, _P, _N, _F, _I, _I, _I]),
    "lut_channels_f32": (None, [_P, _P, _P, _P, _P, _N, _N, _I, _I, _I]),
    "softmax_exp_f32": (None, [_P, _P, _P, _N, _N, _P, _F, _I, _I, _F, _F, _F, _I, _I]),
    "lut_mask_f32": (None, [_P, _P, _N, _F, _I, _I, _I]),
    "lut_mask_bf16": (None, [_P, _P, _N, _F, _I, _I, _I]),
    "lut_range_reduced_f32": (None, [_P, _P, _P, _N, _F, _I, _I, _I, _I]),
    "tqt_forward_f32": (None, [_P, _P, _N, _F, _F, _I, _I, _I]),
    "tqt_backward_f32": (ctypes.c_double, [_P, _P, _P, _N, _F, _F, _I, _I, _I]),
    "group_stats_f32": (ctypes.c_int, [_P, _P, _P, _N, _N, _N, _N, _I, _I]),
}

_state: dict[str, object] = {}
_BUILD_LOCK = threading.Lock()


def cache_dir() -> Path:
    root = os.environ.get("GQA_LUT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "gqa_lut")
    return Path(root)


def _cpu_signature() -> str:
    """What -march=native depends on: the processor's name and its flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def _compile(cc: str, src: Path, out: Path, flags: list[str]) -> Optional[str]:
    """Compile to a temporary file beside `out`, then rename: None, or the compiler's complaint."""
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(src)], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            return (proc.stderr.strip().splitlines() or ["exit status %d" % proc.returncode])[0]
        os.replace(tmp, out)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> tuple[Optional[ctypes.CDLL], str]:
    if os.environ.get("GQA_LUT_CPU_KERNEL", "1") == "0":
        return None, "switched off by GQA_LUT_CPU_KERNEL=0"
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        return None, f"no C compiler {cc!r} on PATH (set CC): the torch ops are used"
    source = SOURCE.read_bytes()
    errors = []
    for flags in (FLAGS + NATIVE, FLAGS):
        key = hashlib.sha256(source + " ".join([cc] + flags).encode() + _cpu_signature().encode()).hexdigest()[:16]
        lib = cache_dir() / f"lut_cpu-{key}.so"
        if not lib.exists():
            try:
                lib.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                return None, f"cache folder {str(lib.parent)!r} cannot be made ({exc.strerror}): set GQA_LUT_CACHE"
            err = _compile(cc, SOURCE, lib, flags)
            if err is not None:
                errors.append(err)
                continue
        try:
            dll = ctypes.CDLL(str(lib))
        except OSError as exc:
            errors.append(str(exc))
            continue
        for name, (restype, argtypes) in SIGNATURES.items():
            fn = getattr(dll, name)
            fn.restype, fn.argtypes = restype, argtypes
        return dll, f"compiled {lib.name} ({' '.join(flags)})"
    return None, f"{cc} could not build {SOURCE.name}: {errors[-1]}"


def load() -> Optional[ctypes.CDLL]:
    """The compiled kernel, built on the first call of this process (None where it cannot be);
    threads that ask at once wait for one build."""
    if "dll" not in _state:
        with _BUILD_LOCK:
            if "dll" not in _state:
                dll, why = _build()
                _state["status"] = why
                _state["dll"] = dll  # last: a reader that sees "dll" sees its status too
    return _state["dll"]  # type: ignore[return-value]


def status() -> str:
    """How the CPU forward runs here: the compiled library, or why the torch ops are used."""
    load()
    return str(_state["status"])


def _map(x: torch.Tensor, call) -> torch.Tensor:
    """y in x's layout, filled by call(x pointer, y pointer, element count) from the library."""
    xc = dense(x)
    y = torch.empty_like(xc)
    if xc.numel():
        call(xc.data_ptr(), y.data_ptr(), xc.numel())
    return y


def _bf16_rows(table_real: torch.Tensor) -> torch.Tensor:
    """The table's entries rounded to bfloat16 by torch (as the torch path rounds them), each
    zero-extended to 32 bits for the SIMD gather; kept on the table tensor itself (a cache keyed
    by address could hand a freed table's rows to a new one), rebuilt when it is written to."""
    got = getattr(table_real, "_gqa_bf16", None)
    if got is None or got[0] != table_real._version:
        rows = table_real.to(torch.bfloat16).view(torch.int16).to(torch.int32).bitwise_and(0xFFFF)
        got = (table_real._version, rows)
        table_real._gqa_bf16 = got
    return got[1]


def lookup_cpu(x: torch.Tensor, table_real: torch.Tensor, index: int, d: int, qmin: int, qmax: int
               ) -> Optional[torch.Tensor]:
    """table_real[index][code(x)] in x's dtype for a float32 or bfloat16 CPU tensor, or None
    where the kernel cannot run (no compiler, another dtype): the caller then uses torch ops."""
    if x.dtype not in (torch.float32, torch.bfloat16) or table_real.dtype != torch.float32:
        return None
    dll = load()
    if dll is None:
        return None
    rows = table_real if x.dtype == torch.float32 else _bf16_rows(table_real)
    table = rows[index].contiguous()
    fn = dll.lut_f32 if x.dtype == torch.float32 else dll.lut_bf16
    return _map(x, lambda xp, yp, n: fn(xp, yp, table.data_ptr(), n, 2.0 ** d, qmin, qmax, torch.get_num_threads()))


def lookup_channels_cpu(x: torch.Tensor, table_real: torch.Tensor, channel_index: torch.Tensor, d: torch.Tensor,
                        qmin: int, qmax: int) -> Optional[torch.Tensor]:
    """The per-feature-scale lookup (ops.kernels.reference.lookup_channels) for a contiguous
    float32 CPU tensor in one pass, or None where the kernel cannot run."""
    if x.dtype != torch.float32 or table_real.dtype != torch.float32 or not x.is_contiguous() or x.dim() == 0:
        return None
    dll = load()
    if dll is None:
        return None
    c = x.shape[-1]
    table = table_real.contiguous()
    offset = (channel_index * table.shape[1]).to(torch.int32).contiguous()
    scale = torch.exp2(d.to(torch.float32)).contiguous()
    y = torch.empty_like(x)
    if x.numel():
        dll.lut_channels_f32(x.data_ptr(), y.data_ptr(), table.data_ptr(), offset.data_ptr(), scale.data_ptr(),
                             x.numel() // c, c, qmin, qmax, torch.get_num_threads())
    return y


def softmax_exp_cpu(x: torch.Tensor, table_real: torch.Tensor, index: int, d: int, qmin: int, qmax: int,
                    zmin: float, inv_ln2: float, ln2: float, nmax: int) -> Optional[torch.Tensor]:
    """Softmax's range-reduced exp numerators over the last dim of a contiguous float32 CPU
    tensor in one pass per row (ops/nn/softmax.py's torch ops, bit for bit), or None."""
    if x.dtype != torch.float32 or table_real.dtype != torch.float32 or not x.is_contiguous() or x.dim() == 0:
        return None
    dll = load()
    if dll is None:
        return None
    table = table_real[index].contiguous()
    e = torch.empty_like(x)
    if x.numel():
        cols = x.shape[-1]
        top = x.amax(-1).contiguous()  # torch's reduction: NaN where a row has one, as the torch ops
        dll.softmax_exp_f32(x.data_ptr(), e.data_ptr(), top.data_ptr(), x.numel() // cols, cols, table.data_ptr(),
                            2.0 ** d, qmin, qmax, zmin, inv_ln2, ln2, nmax, torch.get_num_threads())
    return e


def mask_outside_(grad: torch.Tensor, x: torch.Tensor, d: int, qmin: int, qmax: int) -> Optional[torch.Tensor]:
    """grad set to 0 in place where x * 2^d is outside [qmin - 1/2, qmax + 1/2] (or NaN), the
    straight-through mask, in one pass; None where the kernel cannot run (then torch ops do)."""
    if x.dtype not in (torch.float32, torch.bfloat16) or grad.dtype != x.dtype or grad.shape != x.shape:
        return None
    if not (walkable(x) and grad.stride() == x.stride()):
        return None
    dll = load()
    if dll is None:
        return None
    if x.numel():
        fn = dll.lut_mask_f32 if x.dtype == torch.float32 else dll.lut_mask_bf16
        fn(grad.data_ptr(), x.data_ptr(), x.numel(), 2.0 ** d, qmin, qmax, torch.get_num_threads())
    return grad


def range_reduced_cpu(v: torch.Tensor, table_real: torch.Tensor, index: int, d: int, qmin: int, qmax: int,
                      rsqrt: bool) -> Optional[torch.Tensor]:
    """RangeReducedLUT's forward for a float32 CPU tensor in one pass (the same bits as its
    torch ops), or None where the kernel cannot run."""
    if v.dtype != torch.float32 or table_real.dtype != torch.float32:
        return None
    dll = load()
    if dll is None:
        return None
    table = table_real[index].contiguous()
    return _map(v, lambda vp, yp, n: dll.lut_range_reduced_f32(vp, yp, table.data_ptr(), n, 2.0 ** d, qmin, qmax,
                                                               int(rsqrt), torch.get_num_threads()))


def _plain_f32(*ts: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and not t.is_cuda for t in ts)


def tqt_forward_cpu(x: torch.Tensor, d: int, qmin: int, qmax: int) -> Optional[torch.Tensor]:
    """TQT fake quantization of a float32 CPU tensor at scale 2^-d in one pass, or None."""
    if not _plain_f32(x):
        return None
    dll = load()
    if dll is None:
        return None
    return _map(x, lambda xp, yp, n: dll.tqt_forward_f32(xp, yp, n, 2.0 ** d, 2.0 ** -d, qmin, qmax,
                                                         torch.get_num_threads()))


def tqt_backward_cpu(grad: torch.Tensor, x: torch.Tensor, d: int, qmin: int, qmax: int
                     ) -> Optional[tuple[torch.Tensor, float]]:
    """(the input's straight-through gradient, sum of grad * 2^-d * (q - v or q)) in one pass, or None."""
    if not _plain_f32(grad, x) or grad.shape != x.shape:
        return None
    dll = load()
    if dll is None:
        return None
    xc, gc = dense(x), grad
    if gc.stride() != xc.stride():  # one layout for both
        xc, gc = x.contiguous(), grad.contiguous()
    gx = torch.empty_like(xc)
    acc = dll.tqt_backward_f32(gc.data_ptr(), xc.data_ptr(), gx.data_ptr(), xc.numel(), 2.0 ** d, 2.0 ** -d, qmin,
                               qmax, torch.get_num_threads()) if xc.numel() else 0.0
    return gx, acc


def group_stats_cpu(x: torch.Tensor, groups: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(mean, biased variance) of each (sample, group) of a float32 CPU tensor (N, C, *spatial),
    contiguous or channels-last, each (N, groups, 1) in float32 (computed in double, two passes),
    or None where the kernel cannot run (no compiler, another dtype or layout): the caller then
    uses torch ops. Why: torch reaches a channels-last group only through a copy and then makes
    four more passes; on a MobileNet-size activation that was 3x the whole float GroupNorm."""
    if not _plain_f32(x) or x.dim() < 3 or x.shape[1] % groups or not walkable(x):
        return None
    last = 0 if x.is_contiguous() else 1  # else walkable means channels-last
    dll = load()
    if dll is None:
        return None
    n, c = x.shape[:2]
    s = x.numel() // max(n * c, 1)
    mean = torch.empty(n, groups, 1)
    var = torch.empty(n, groups, 1)
    if x.numel() == 0 or dll.group_stats_f32(x.data_ptr(), mean.data_ptr(), var.data_ptr(), n, c, s, groups, last,
                                             torch.get_num_threads()) != 0:
        return None
    return mean, var

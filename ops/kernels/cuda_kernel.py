"""The LUT op and the fake quantizers on CUDA as C++ operators with C++ autograd nodes
(ops/kernels/csrc/lut_cuda.cu), built on first use.

Why: in eager mode a table or quantizer call on a mid-sized tensor is bound by its host side,
not the GPU. Through the Python autograd.Function and Triton's launcher a LUT forward cost ~30
us of host time and a forward+backward ~200-280 us, against ~7 and ~70 us for `F.gelu`
(bench/lut_host_cost.py), so at 2^24 bfloat16 elements (~20 us of GPU time) the table ran
1.3-2.5x native, and the fake quantizers doubled an eager W8A8 training step. Each operator here
is one pybind11 call from Python; its autograd node saves the input and runs the backward
kernel without returning to Python.

Built like the CPU kernel (ops/kernels/cpu_kernel.py), at first use rather than at install time, with
`torch.utils.cpp_extension.load` (nvcc and ninja, for the GPU in the machine) into the cache
folder, keyed by the source, torch's version and the GPU's compute capability. The first call
on a machine waits for the compiler (about a minute); later processes load the cached library.
Without nvcc, with a failed build or with `GQA_LUT_CUDA_KERNEL=0`, `extension()` returns None and the
Triton kernels (ops/kernels/triton_lut.py, ops/kernels/triton_quant.py) run, with the same forward bits;
`status()` says which.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch

from ops.kernels.cpu_kernel import cache_dir
from ops.kernels.derivatives import DERIVATIVE_NUMBERS

SOURCE = Path(__file__).resolve().parent / "csrc" / "lut_cuda.cu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the operators take (float64 keeps torch's path)
# no fast math: erff/expf/tanhf as libdevice has them, like Triton's; the derivatives' numbers
# from ops/registry.py as defines (GQA_D_GELU...), so the kernel's switch cannot drift from them
CUDA_FLAGS = ["-O3"] + [f"-DGQA_D_{name.upper() or 'SLOPE'}={number}" for name, number in DERIVATIVE_NUMBERS.items()]

_state: dict[str, object] = {}


def _nvcc() -> Optional[str]:
    from torch.utils.cpp_extension import CUDA_HOME
    found = shutil.which("nvcc")
    if found:
        return found
    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").is_file():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return None


def _build() -> tuple[Optional[ModuleType], str]:
    if os.environ.get("GQA_LUT_CUDA_KERNEL", "1") == "0":
        return None, "switched off by GQA_LUT_CUDA_KERNEL=0: the Triton kernels run"
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return None, "no CUDA device: the Triton kernels or the CPU path run"
    if _nvcc() is None:
        return None, "no nvcc (set CUDA_HOME): the Triton kernels run"
    major, minor = torch.cuda.get_device_capability()
    key = hashlib.sha256(SOURCE.read_bytes() + f"{torch.__version__} sm_{major}{minor} {CUDA_FLAGS}".encode()
                         ).hexdigest()[:16]
    folder = cache_dir() / f"lut_cuda-{key}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return None, f"cache folder {str(folder)!r} cannot be made ({exc.strerror}): set GQA_LUT_CACHE"
    from torch.utils import cpp_extension
    if not any(folder.glob("*.so")):
        print(f"gqa-lut: compiling the CUDA LUT operator once for this machine (about a minute) into {folder}",
              file=sys.stderr)
    try:
        ext = cpp_extension.load(name="gqa_lut_cuda", sources=[str(SOURCE)], extra_cuda_cflags=CUDA_FLAGS,
                                 build_directory=str(folder), is_python_module=True, verbose=False)
    except Exception as exc:  # a compiler or linker failure: the Triton kernels still work
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        return None, f"nvcc could not build {SOURCE.name} ({first}): the Triton kernels run"
    return ext, f"C++ operator gqa_lut_cuda::lut from {folder}"


def extension() -> Optional[ModuleType]:
    """The built extension (its pybind11 functions `lut`, `tqt`, `weight_fake_quant`), built on
    the first call of this process, or None where it cannot be."""
    if "ext" not in _state:
        _state["ext"], _state["status"] = _build()
        _state["op"] = getattr(_state["ext"], "lut", None)
    return _state["ext"]  # type: ignore[return-value]


def op() -> Optional[Callable[..., torch.Tensor]]:
    """lut(x, table, slopes, breakpoints, index, d, qmin, qmax, kind): the operator's eager entry
    (a pybind11 function; the same computation is torch.ops.gqa_lut_cuda.lut), or None."""
    if "op" not in _state:
        extension()
    return _state["op"]  # type: ignore[return-value]


def status() -> str:
    """How the CUDA LUT op runs here: the C++ operator, or why the Triton kernels do."""
    extension()
    return str(_state["status"])


@contextmanager
def switched_off():
    """Eager CUDA calls through the Triton kernels for a while, as without the operator (for
    benchmarks that compare the two in one process)."""
    extension()
    saved = _state["ext"], _state["op"]  # asked on every call: this takes effect at once
    _state["ext"] = _state["op"] = None
    try:
        yield
    finally:
        _state["ext"], _state["op"] = saved

"""The LUT forward as one Triton kernel on CUDA: load, quantize, gather, store in one pass.

Same arithmetic as the CPU path, so the results are bit-identical: x * 2^d in float32 (exact),
NaN -> 0, round half to even (rint), clamp to the Q-bit range, then a gather from the
expanded table (2^Q exact float32 reals per scale, 1 KiB at Q = 8, so it stays in L1). The
scale index and d are read from device memory, so a learned scale never forces a host sync.

Measured alternative (bench/NOTES-gpu.md): evaluating section 3 in registers (N-1 unrolled
compares selecting K and B, then an int32 multiply-add) avoids the gather but is bound by the
int32 issue rate and ran 1.6x slower than this kernel on the H100 for 16 segments.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    try:
        from triton.language.extra import libdevice
    except ImportError:  # older Triton
        from triton.language.extra.cuda import libdevice
    AVAILABLE = True
except Exception:  # no Triton (CPU-only installs): the torch path is used
    AVAILABLE = False

BLOCK = 4096

if AVAILABLE:
    @triton.jit
    def _lut_fwd(x_ptr, y_ptr, table_ptr, index_ptr, d_ptr, n, QMIN: tl.constexpr, QMAX: tl.constexpr,
                 BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        row = tl.load(index_ptr).to(tl.int64) * (QMAX - QMIN + 1)
        scale = tl.exp2(tl.load(d_ptr).to(tl.float32))
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = x * scale
        v = tl.where(v == v, v, 0.0)
        v = tl.minimum(tl.maximum(libdevice.rint(v), QMIN), QMAX)
        idx = (v - QMIN).to(tl.int32)
        y = tl.load(table_ptr + row + idx, mask=mask, other=0.0)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def usable(x: torch.Tensor) -> bool:
    return AVAILABLE and x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16)


def lookup_triton(x: torch.Tensor, table_real: torch.Tensor, scale_index: torch.Tensor, d: torch.Tensor,
                  qmin: int, qmax: int) -> torch.Tensor:
    xc = x.contiguous()
    y = torch.empty_like(xc)
    n = xc.numel()
    if n:
        _lut_fwd[(triton.cdiv(n, BLOCK),)](xc, y, table_real, scale_index.reshape(1), d.reshape(1), n,
                                           QMIN=qmin, QMAX=qmax, BLOCK=BLOCK, num_warps=8)
    return y

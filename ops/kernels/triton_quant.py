"""The fake quantizers of ops/nn/fake_quant.py as Triton kernels: one pass each way, no host sync.

TQT forward: d from the learned log2 threshold (read from device memory in the kernel), then
x * 2^d, round half to even, clamp, times 2^-d: the same float32 arithmetic as the torch path,
so the values are bit-identical (multiplying by 2^d is exact and equals dividing by 2^-d).
TQT backward: the input's straight-through gradient and, in the same pass, each block's share
of the threshold's gradient (summed after: a different order of additions than torch.sum, so
the threshold's gradient equals the CPU path's within float32 rounding).
Weight fake-quant: one program per output channel, max |w| and then the rounded values, with
IEEE division (div_rn), so the result is bit-identical to the torch path.
"""
from __future__ import annotations

import math

import torch

from ops.kernels.triton_lut import AVAILABLE

if AVAILABLE:
    import triton
    import triton.language as tl
    from ops.kernels.triton_lut import libdevice

BLOCK = 4096
LN2 = math.log(2.0)

if AVAILABLE:
    @triton.jit
    def _scale_of(log2t_ptr, BITS: tl.constexpr, DMIN: tl.constexpr, DMAX: tl.constexpr):
        d = (BITS - 1) - libdevice.ceil(tl.load(log2t_ptr).to(tl.float32))
        return tl.minimum(tl.maximum(d, DMIN), DMAX)

    @triton.jit
    def _tqt_fwd(x_ptr, y_ptr, log2t_ptr, d_ptr, n, BITS: tl.constexpr, DMIN: tl.constexpr, DMAX: tl.constexpr,
                 BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        d = _scale_of(log2t_ptr, BITS, DMIN, DMAX)
        if pid == 0:
            tl.store(d_ptr, d)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(x == x, x, 0.0) * tl.exp2(d)
        q = tl.minimum(tl.maximum(libdevice.rint(v), -(2 ** (BITS - 1))), 2 ** (BITS - 1) - 1)
        tl.store(y_ptr + offs, (q * tl.exp2(-d)).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _tqt_bwd(g_ptr, x_ptr, gx_ptr, d_ptr, part_ptr, n, BITS: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        d = tl.load(d_ptr).to(tl.float32)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        v = tl.where(x == x, x, 0.0) * tl.exp2(d)
        qmin, qmax = -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1
        q = tl.minimum(tl.maximum(libdevice.rint(v), qmin), qmax)
        inside = (v >= qmin) & (v <= qmax)
        tl.store(gx_ptr + offs, tl.where(inside, g, 0.0).to(gx_ptr.dtype.element_ty), mask=mask)
        share = g.to(tl.float32) * tl.exp2(-d) * 0.6931471805599453 * tl.where(inside, q - v, q)
        tl.store(part_ptr + pid, tl.sum(tl.where(mask, share, 0.0), axis=0))

    @triton.jit
    def _weight_fq(w_ptr, y_ptr, K, QMAX: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * K
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            cols = k + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + row + cols, mask=cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(w))
        scale = libdevice.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), QMAX * 1.0)
        for k in range(0, K, BLOCK_K):
            cols = k + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + row + cols, mask=cols < K, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(libdevice.rint(libdevice.div_rn(w, scale)), -QMAX - 1.0), QMAX * 1.0)
            tl.store(y_ptr + row + cols, (q * scale).to(y_ptr.dtype.element_ty), mask=cols < K)


def usable(x: torch.Tensor) -> bool:
    return AVAILABLE and x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16)


def tqt_forward(x: torch.Tensor, log2_t: torch.Tensor, bits: int, dmin: int, dmax: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    xc = x.contiguous()
    y = torch.empty_like(xc)
    d = torch.empty((), dtype=torch.float32, device=x.device)
    n = xc.numel()
    _tqt_fwd[(max(1, triton.cdiv(n, BLOCK)),)](xc, y, log2_t.reshape(1), d.reshape(1), n, BITS=bits, DMIN=dmin,
                                               DMAX=dmax, BLOCK=BLOCK, num_warps=8)
    return y, d


def tqt_backward(grad: torch.Tensor, x: torch.Tensor, d: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    xc, gc = x.contiguous(), grad.contiguous()
    gx = torch.empty_like(gc)
    n = xc.numel()
    blocks = max(1, triton.cdiv(n, BLOCK))
    part = torch.empty(blocks, dtype=torch.float32, device=x.device)
    _tqt_bwd[(blocks,)](gc, xc, gx, d.reshape(1), part, n, BITS=bits, BLOCK=BLOCK, num_warps=8)
    return gx, part.sum()


def weight_fake_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    wc = w.contiguous()
    y = torch.empty_like(wc)
    rows = wc.shape[0]
    k = wc.numel() // max(rows, 1)
    if wc.numel():
        _weight_fq[(rows,)](wc, y, k, QMAX=2 ** (bits - 1) - 1, BLOCK_K=min(1024, triton.next_power_of_2(k)),
                            num_warps=4)
    return y

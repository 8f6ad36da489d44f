"""LayerNorm and row-wise GroupNorm with the rsqrt table, one Triton kernel each way, on CUDA.

Why: the norms' torch ops (mean, centre, square, mean, the range-reduced rsqrt table, the
affine) and their autograd backward are ~20 kernels per norm, each a pass over the
activations; in the RetNet gpu preset's all-LUT training step they were most of the 2.7 ms of
GPU time the tables added over W8A8 (H100, torch profiler), which held a CUDA-graph step at
1.46-1.51x float (1.08x with these kernels, bench/qat_speed.py). Here each direction is one pass: a program reads its rows once, keeps them
in registers, and writes the output (forward) or the input's gradient plus per-program
partial sums of the weight's and bias's gradients (backward; torch sums those partials).

What it computes is ops.nn.layer_norm / group_norm's arithmetic: statistics in float32
(mean, then the mean of the centred squares), v = var + eps through the range-reduced rsqrt
table (the same helpers as ops/kernels/triton_lut.py's RangeReducedLUT kernels, so r is the table's
value for the v computed here), y = (x - mean) * r * weight + bias. The row sums run in
another order than torch's reductions, so v and y can differ from the torch path in the last
bits (and r by one table step where v sits on a code boundary), as torch's own CUDA and CPU
norms differ. The backward is the straight-through gradient autograd takes through those ops:
the table's derivative at v (its function's, or the active segment's slope), exact elsewhere.

Shapes: rows of G groups x K contiguous values. LayerNorm: G = 1, K = the normalized size.
GroupNorm of a 2-D (N, C) input (the RetNet's per-head norm): one row per sample, G groups
of K = C / G channels, the weight indexed by channel. Other inputs take the torch ops.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from gqa_lut.quantization import int_range
from ops.kernels import triton_lut
from ops.kernels.derivatives import DERIVATIVE_NUMBERS

MAX_TILE = 8192  # values of one row held in registers; longer rows take the torch ops
ENABLED = True  # False: the torch ops run on CUDA too (tests compare the two)

if triton_lut.AVAILABLE:
    import triton
    import triton.language as tl

    from ops.kernels.triton_lut import _derivative, _reduce, _reduced_lookup, _times_pow2

    @triton.jit
    def _tile(G: tl.constexpr, K: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr):
        """One row as a (BG, BK) tile of G groups x K values: which lanes hold values, and the
        column (the weight's index) of each."""
        g = tl.arange(0, BG)[:, None]
        k = tl.arange(0, BK)[None, :]
        return (g < G) & (k < K), g * K + k

    @triton.jit
    def _stats(x, mask, K: tl.constexpr):
        mean = tl.sum(x, axis=1) / K
        c = tl.where(mask, x - mean[:, None], 0.0)
        return c, tl.sum(c * c, axis=1) / K

    @triton.jit
    def _rsqrt_table(v, table_ptr, index_ptr, d_ptr, QMIN: tl.constexpr, QMAX: tl.constexpr):
        return _reduced_lookup(v, table_ptr, index_ptr, d_ptr, QMIN, QMAX, True)  # NaN propagates, as in RangeReducedLUT

    @triton.jit
    def _norm_fwd(x_ptr, y_ptr, w_ptr, b_ptr, M, eps, table_ptr, index_ptr, d_ptr, QMIN: tl.constexpr,
                  QMAX: tl.constexpr, G: tl.constexpr, K: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr,
                  ROWS, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
        pid = tl.program_id(0)
        inside, col = _tile(G, K, BG, BK)
        if HAS_W:
            w = tl.load(w_ptr + col, mask=inside, other=0.0).to(tl.float32)
        if HAS_B:
            b = tl.load(b_ptr + col, mask=inside, other=0.0).to(tl.float32)
        for i in range(ROWS):
            row = pid * ROWS + i
            mask = inside & (row < M)
            base = row.to(tl.int64) * (G * K)
            x = tl.load(x_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
            c, var = _stats(x, mask, K)
            r = _rsqrt_table(var + eps, table_ptr, index_ptr, d_ptr, QMIN, QMAX)
            y = c * r[:, None]
            if HAS_W:
                y = y * w
            if HAS_B:
                y = y + b
            tl.store(y_ptr + base + col, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_bwd(dy_ptr, x_ptr, dx_ptr, w_ptr, dw_ptr, db_ptr, M, eps, table_ptr, index_ptr, d_ptr, bp_ptr,
                  slope_ptr, QMIN: tl.constexpr, QMAX: tl.constexpr, KIND: tl.constexpr, NBP: tl.constexpr,
                  G: tl.constexpr, K: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr, ROWS,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr):
        pid = tl.program_id(0)
        inside, col = _tile(G, K, BG, BK)
        if HAS_W:
            w = tl.load(w_ptr + col, mask=inside, other=0.0).to(tl.float32)
        scale = tl.exp2(tl.load(d_ptr).to(tl.float32))
        dw = tl.zeros([BG, BK], dtype=tl.float32)
        db = tl.zeros([BG, BK], dtype=tl.float32)
        for i in range(ROWS):
            row = pid * ROWS + i
            mask = inside & (row < M)
            base = row.to(tl.int64) * (G * K)
            x = tl.load(x_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
            c, var = _stats(x, mask, K)
            v = var + eps
            r = _rsqrt_table(v, table_ptr, index_ptr, d_ptr, QMIN, QMAX)
            xhat = c * r[:, None]
            if HAS_W:
                dxhat = dy * w
                dw += dy * xhat
            else:
                dxhat = dy
            if HAS_B:
                db += dy
            # r = table(m) 2^-k with v = m 4^k: ops.kernels.triton_lut._range_reduced_bwd's gradient
            dr = tl.sum(dxhat * c, axis=1)
            m, kk, valid = _reduce(v, True)
            ms = m * scale
            ok = (ms >= QMIN - 0.5) & (ms <= QMAX + 0.5)
            der = _derivative(m, ms, index_ptr, bp_ptr, slope_ptr, QMIN, QMAX, KIND, NBP, BG)
            dv = _times_pow2(tl.where(ok, _times_pow2(dr, -kk) * der, 0.0), -2 * kk)
            dv = tl.where(valid, dv, 0.0)
            dc = tl.where(mask, dxhat * r[:, None] + (dv * (2.0 / K))[:, None] * c, 0.0)
            dx = dc - (tl.sum(dc, axis=1) / K)[:, None]
            tl.store(dx_ptr + base + col, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_W:
            tl.store(dw_ptr + pid * (G * K) + col, dw, mask=inside)
        if HAS_B:
            tl.store(db_ptr + pid * (G * K) + col, db, mask=inside)


@lru_cache(maxsize=None)
def _sms(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _plan(m: int, g: int, k: int, device: int) -> tuple[int, int, int, int]:
    """(programs, rows per program, BG, BK): about 8 programs per SM, each walking its rows."""
    bg, bk = triton.next_power_of_2(g), triton.next_power_of_2(k)
    rows = max(1, triton.cdiv(m, 8 * _sms(device)))
    return triton.cdiv(m, rows), rows, bg, bk


def _warps(bg: int, bk: int) -> int:
    return 4 if bg * bk <= 1024 else 8


def usable(x: torch.Tensor, groups: int, size: int) -> bool:
    return (ENABLED and triton_lut.usable(x) and size % groups == 0 and triton.next_power_of_2(groups) * triton.next_power_of_2(size // groups)
            <= MAX_TILE)


class _FusedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, size, groups, eps, rsqrt):
        lut = rsqrt.lut
        x2 = x.contiguous()
        m = x2.numel() // size
        k = size // groups
        qmin, qmax = int_range(lut.table.input_bits)
        y = torch.empty_like(x2)
        plan = _plan(m, groups, k, x2.device.index)
        p, rows, bg, bk = plan
        if m:
            _norm_fwd[(p,)](x2, y, weight if weight is not None else x2, bias if bias is not None else x2, m, eps,
                            lut.table_real, lut.scale_index.reshape(1), lut.d_current.reshape(1), QMIN=qmin,
                            QMAX=qmax, G=groups, K=k, BG=bg, BK=bk, ROWS=rows, HAS_W=weight is not None,
                            HAS_B=bias is not None, num_warps=_warps(bg, bk))
        ctx.save_for_backward(x2, weight, bias, lut.table_real, lut.scale_index, lut.d_current,
                              lut.breakpoints.to(torch.int32).contiguous(), lut.slopes_real.float().contiguous())
        ctx.args = (groups, k, m, float(eps), qmin, qmax, DERIVATIVE_NUMBERS["" if lut.grad == "slope" else "rsqrt"], plan)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, table, index, d, bp, slopes = ctx.saved_tensors
        groups, k, m, eps, qmin, qmax, kind, (p, rows, bg, bk) = ctx.args
        dy = dy.to(x2.dtype).contiguous()
        dx = torch.empty_like(x2)
        dw = torch.empty(p, groups * k, device=x2.device, dtype=torch.float32) if weight is not None else None
        db = torch.empty(p, groups * k, device=x2.device, dtype=torch.float32) if bias is not None else None
        if m:
            _norm_bwd[(p,)](dy, x2, dx, weight if weight is not None else x2, dw if dw is not None else dx,
                            db if db is not None else dx, m, eps, table, index.reshape(1), d.reshape(1), bp, slopes,
                            QMIN=qmin, QMAX=qmax, KIND=kind, NBP=bp.shape[-1], G=groups, K=k, BG=bg, BK=bk,
                            ROWS=rows, HAS_W=weight is not None, HAS_B=bias is not None, num_warps=_warps(bg, bk))
        # the programs' partial sums (none for an empty input: zeros)
        gw = dw.sum(0).reshape(weight.shape).to(weight.dtype) if weight is not None else None
        gb = db.sum(0).reshape(bias.shape).to(bias.dtype) if bias is not None else None
        return dx, gw, gb, None, None, None, None


def layer_norm(x: torch.Tensor, size: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float, rsqrt) -> torch.Tensor:
    """LayerNorm over the last `size` values of x (contiguous output, as torch's)."""
    return _FusedNorm.apply(x, _flat(weight, size), _flat(bias, size), size, 1, eps, rsqrt).reshape(x.shape)


def group_norm_2d(x: torch.Tensor, groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                  eps: float, rsqrt) -> torch.Tensor:
    """GroupNorm of a 2-D (N, C) input: rows of `groups` groups of C / groups channels."""
    c = x.shape[1]
    return _FusedNorm.apply(x, _flat(weight, c), _flat(bias, c), c, groups, eps, rsqrt)


def _flat(t: Optional[torch.Tensor], size: int) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if t.numel() != size:
        raise ValueError(f"norm parameter of {t.numel()} values for rows of {size}")
    return t.reshape(size) if t.is_contiguous() else t.contiguous().reshape(size)

"""The LUT forward and its straight-through backward as one Triton kernel each, on CUDA.

Forward: load, quantize, gather, store in one pass.

Same arithmetic as the CPU path, so the results are bit-identical: x * 2^d in float32 (exact),
NaN -> 0, round half to even (rint), clamp to the Q-bit range, then a gather from the
expanded table (2^Q exact float32 reals per scale, 1 KiB at Q = 8, so it stays in L1). The
scale index and d are read from device memory, so a learned scale never forces a host sync.

Measured alternative (bench/NOTES-gpu.md): evaluating section 3 in registers (N-1 unrolled
compares selecting K and B, then an int32 multiply-add) avoids the gather but is bound by the
int32 issue rate and ran 1.6x slower than this kernel on the H100 for 16 segments.

Backward: reads the incoming gradient and the saved input, writes the input's gradient (the
same two reads and one write as a native activation's backward). Inside the representable
range the gradient is the exact function's derivative at x, computed in registers (one
constexpr branch per function of ops.torch_lut.CLOSED_FORM), or the active segment's slope
(the code's segment counted against the breakpoints in registers); 0 outside it. The formulas
are CLOSED_FORM's; libdevice's erf/exp/tanh may differ from the CPU's in the last bit, so
gradients equal the CPU path's within float32 rounding, not bit for bit.
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

# the derivatives the backward kernel knows, by CLOSED_FORM name; "" is the segment's slope
KINDS = {"": 0, "gelu": 1, "gelu_tanh": 2, "swish": 3, "hswish": 4, "hsigmoid": 5, "sigmoid": 6, "tanh": 7,
         "softplus": 8, "exp": 9, "decay": 10, "rsqrt": 11, "reciprocal": 12}

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


    @triton.jit
    def _lut_bwd(g_ptr, x_ptr, gx_ptr, index_ptr, d_ptr, bp_ptr, slope_ptr, n, QMIN: tl.constexpr,
                 QMAX: tl.constexpr, KIND: tl.constexpr, NBP: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        scale = tl.exp2(tl.load(d_ptr).to(tl.float32))
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xs = x * scale
        inside = (xs >= QMIN - 0.5) & (xs <= QMAX + 0.5)  # False for NaN and +-inf
        xi = tl.where(inside, x, 0.0)
        if KIND == 0:
            code = tl.where(xs == xs, xs, 0.0)
            code = tl.minimum(tl.maximum(libdevice.rint(code), QMIN), QMAX).to(tl.int32)
            row = tl.load(index_ptr).to(tl.int64) * NBP
            seg = tl.zeros([BLOCK], dtype=tl.int32)
            for j in tl.static_range(NBP):
                seg += (tl.load(bp_ptr + row + j) < code).to(tl.int32)
            der = tl.load(slope_ptr + seg)
        elif KIND == 1:
            der = 0.5 * (1.0 + libdevice.erf(xi * 0.7071067811865476)) \
                + xi * libdevice.exp(-0.5 * xi * xi) * 0.3989422804014327
        elif KIND == 2:
            t = libdevice.tanh(0.7978845608028654 * (xi + 0.044715 * xi * xi * xi))
            der = 0.5 * (1.0 + t) + 0.5 * xi * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * xi * xi)
        elif KIND == 3:
            sg = 1.0 / (1.0 + libdevice.exp(-xi))
            der = sg * (1.0 + xi * (1.0 - sg))
        elif KIND == 4:
            der = tl.where(xi <= -3.0, 0.0, tl.where(xi >= 3.0, 1.0, (2.0 * xi + 3.0) / 6.0))
        elif KIND == 5:
            der = tl.where((xi > -3.0) & (xi < 3.0), 1.0 / 6.0, 0.0)
        elif KIND == 6:
            sg = 1.0 / (1.0 + libdevice.exp(-xi))
            der = sg * (1.0 - sg)
        elif KIND == 7:
            th = libdevice.tanh(xi)
            der = 1.0 - th * th
        elif KIND == 8:
            der = 1.0 / (1.0 + libdevice.exp(-xi))
        elif KIND == 9:
            der = libdevice.exp(xi)
        elif KIND == 10:
            der = -libdevice.exp(-xi)
        elif KIND == 11:
            der = -0.5 * libdevice.rsqrt(xi) / xi
        else:
            der = -1.0 / (xi * xi)
        gx = tl.where(inside, g * der, 0.0)
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _pow2(e):
        """2^e as float32 for integer e in [-126, 127], built from its bits (exact, no exp2)."""
        return ((e + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _reduce(v, RSQRT: tl.constexpr):
        """RangeReducedLUT's reduction: (m, k, valid) with v' = m * 2^(2k or k), m in [1, 4) or
        [1, 2), v' = v with NaN -> 1, +inf -> max, anything below the smallest normal -> it."""
        valid = (v == v) & (v != float("inf")) & (v != float("-inf"))  # nan_to_num passes grad here
        vf = tl.where(v == v, v, 1.0)
        vf = tl.where(vf == float("inf"), 3.4028234663852886e38, vf)
        tiny = 1.1754943508222875e-38
        valid = valid & (vf >= tiny)  # clamp_min passes grad here
        vf = tl.maximum(vf, tiny)
        bits = vf.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 127  # vf = 1.x * 2^e (vf is normal)
        if RSQRT:
            k = e >> 1  # floor(e / 2)
            ebits = e - 2 * k
        else:
            k = e
            ebits = e - k
        m = ((bits & 0x007FFFFF) | ((ebits + 127) << 23)).to(tl.float32, bitcast=True)
        return m, k, valid

    @triton.jit
    def _range_reduced_fwd(v_ptr, y_ptr, table_ptr, index_ptr, d_ptr, n, QMIN: tl.constexpr, QMAX: tl.constexpr,
                           RSQRT: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        v = tl.load(v_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        m, k, valid = _reduce(v, RSQRT)
        row = tl.load(index_ptr).to(tl.int64) * (QMAX - QMIN + 1)
        c = tl.minimum(tl.maximum(libdevice.rint(m * tl.exp2(tl.load(d_ptr).to(tl.float32))), QMIN), QMAX)
        t = tl.load(table_ptr + row + (c - QMIN).to(tl.int32), mask=mask, other=0.0)
        half = (-k) >> 1  # 2^-k in two normal factors: one rounding, as t * 2^-k in float32
        y = (t * _pow2(half)) * _pow2(-k - half)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _range_reduced_bwd(g_ptr, v_ptr, gv_ptr, index_ptr, d_ptr, bp_ptr, slope_ptr, n, QMIN: tl.constexpr,
                           QMAX: tl.constexpr, RSQRT: tl.constexpr, SLOPE: tl.constexpr, NBP: tl.constexpr,
                           BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        v = tl.load(v_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m, k, valid = _reduce(v, RSQRT)
        ms = m * tl.exp2(tl.load(d_ptr).to(tl.float32))
        inside = (ms >= QMIN - 0.5) & (ms <= QMAX + 0.5)
        if SLOPE:
            c = tl.minimum(tl.maximum(libdevice.rint(ms), QMIN), QMAX).to(tl.int32)
            row = tl.load(index_ptr).to(tl.int64) * NBP
            seg = tl.zeros([BLOCK], dtype=tl.int32)
            for j in tl.static_range(NBP):
                seg += (tl.load(bp_ptr + row + j) < c).to(tl.int32)
            der = tl.load(slope_ptr + seg)
        elif RSQRT:
            der = -0.5 * libdevice.rsqrt(m) / m
        else:
            der = -1.0 / (m * m)
        half = (-k) >> 1
        g1 = (g * _pow2(half)) * _pow2(-k - half)  # the output's 2^-k
        g2 = tl.where(inside, g1 * der, 0.0)
        if RSQRT:  # m = v * 2^-2k
            kk = -2 * k
        else:
            kk = -k
        half2 = kk >> 1
        gv = tl.where(valid, (g2 * _pow2(half2)) * _pow2(kk - half2), 0.0)
        tl.store(gv_ptr + offs, gv.to(gv_ptr.dtype.element_ty), mask=mask)


def usable(x: torch.Tensor) -> bool:
    return AVAILABLE and x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16)


def lookup_triton(x: torch.Tensor, table_real: torch.Tensor, scale_index: torch.Tensor, d: torch.Tensor,
                  qmin: int, qmax: int) -> torch.Tensor:
    from ops.cpu_kernel import dense  # keeps a channels-last input's layout (no torch import cost: loaded)
    xc = dense(x)
    y = torch.empty_like(xc)
    n = xc.numel()
    if n:
        _lut_fwd[(triton.cdiv(n, BLOCK),)](xc, y, table_real, scale_index.reshape(1), d.reshape(1), n,
                                           QMIN=qmin, QMAX=qmax, BLOCK=BLOCK, num_warps=8)
    return y


def backward_usable(x: torch.Tensor, derivative: str) -> bool:
    """The kernel serves float32/16 and bfloat16 on CUDA for the named derivatives (float64
    and a user's function take the torch path)."""
    return usable(x) and derivative in KINDS


def lookup_backward_triton(grad: torch.Tensor, x: torch.Tensor, slopes_real: torch.Tensor, breakpoints: torch.Tensor,
                           scale_index: torch.Tensor, d: torch.Tensor, qmin: int, qmax: int,
                           derivative: str) -> torch.Tensor:
    xc, gc = x.contiguous(), grad.to(x.dtype).contiguous()
    gx = torch.empty_like(xc)
    n = xc.numel()
    if n:
        bp = breakpoints.to(torch.int32).contiguous()
        _lut_bwd[(triton.cdiv(n, BLOCK),)](gc, xc, gx, scale_index.reshape(1), d.reshape(1), bp,
                                           slopes_real.float().contiguous(), n, QMIN=qmin, QMAX=qmax,
                                           KIND=KINDS[derivative], NBP=bp.shape[-1], BLOCK=BLOCK, num_warps=8)
    return gx


def range_reduced_forward(v: torch.Tensor, table_real: torch.Tensor, scale_index: torch.Tensor, d: torch.Tensor,
                          qmin: int, qmax: int, rsqrt: bool) -> torch.Tensor:
    """RangeReducedLUT's forward in one pass (reduction by the float's exponent bits, table,
    exact 2^-k): the same bits as its torch ops."""
    vc = v.contiguous()
    y = torch.empty_like(vc)
    n = vc.numel()
    if n:
        _range_reduced_fwd[(triton.cdiv(n, BLOCK),)](vc, y, table_real, scale_index.reshape(1), d.reshape(1), n,
                                                     QMIN=qmin, QMAX=qmax, RSQRT=rsqrt, BLOCK=BLOCK, num_warps=8)
    return y


def range_reduced_backward(grad: torch.Tensor, v: torch.Tensor, slopes_real: torch.Tensor, breakpoints: torch.Tensor,
                           scale_index: torch.Tensor, d: torch.Tensor, qmin: int, qmax: int, rsqrt: bool,
                           slope: bool) -> torch.Tensor:
    vc, gc = v.contiguous(), grad.to(v.dtype).contiguous()
    gv = torch.empty_like(vc)
    n = vc.numel()
    if n:
        bp = breakpoints.to(torch.int32).contiguous()
        _range_reduced_bwd[(triton.cdiv(n, BLOCK),)](gc, vc, gv, scale_index.reshape(1), d.reshape(1), bp,
                                                     slopes_real.float().contiguous(), n, QMIN=qmin, QMAX=qmax,
                                                     RSQRT=rsqrt, SLOPE=slope, NBP=bp.shape[-1], BLOCK=BLOCK,
                                                     num_warps=8)
    return gv

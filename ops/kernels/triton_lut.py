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
constexpr branch per function of ops.kernels.derivatives.CLOSED_FORM), or the active segment's slope
(the code's segment counted against the breakpoints in registers); 0 outside it. The formulas
are CLOSED_FORM's; libdevice's erf/exp/tanh may differ from the CPU's in the last bit, so
gradients equal the CPU path's within float32 rounding, not bit for bit.
"""
from __future__ import annotations

import torch

from ops.kernels.derivatives import DERIVATIVE_NUMBERS  # the derivatives the backward kernel knows (and their numbers)
from ops.kernels.reference import dense  # keeps a channels-last input's layout

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
    # the derivatives' numbers, from ops/registry.py (tests/test_architecture.py reads them back)
    D_SLOPE = tl.constexpr(DERIVATIVE_NUMBERS[""])
    D_GELU = tl.constexpr(DERIVATIVE_NUMBERS["gelu"])
    D_GELU_TANH = tl.constexpr(DERIVATIVE_NUMBERS["gelu_tanh"])
    D_SWISH = tl.constexpr(DERIVATIVE_NUMBERS["swish"])
    D_HSWISH = tl.constexpr(DERIVATIVE_NUMBERS["hswish"])
    D_HSIGMOID = tl.constexpr(DERIVATIVE_NUMBERS["hsigmoid"])
    D_SIGMOID = tl.constexpr(DERIVATIVE_NUMBERS["sigmoid"])
    D_TANH = tl.constexpr(DERIVATIVE_NUMBERS["tanh"])
    D_SOFTPLUS = tl.constexpr(DERIVATIVE_NUMBERS["softplus"])
    D_EXP = tl.constexpr(DERIVATIVE_NUMBERS["exp"])
    D_DECAY = tl.constexpr(DERIVATIVE_NUMBERS["decay"])
    D_RSQRT = tl.constexpr(DERIVATIVE_NUMBERS["rsqrt"])
    D_RECIPROCAL = tl.constexpr(DERIVATIVE_NUMBERS["reciprocal"])

    # every kernel: input pointers, the output pointer, the element count, then the rest
    @triton.jit
    def _lut_fwd(x_ptr, y_ptr, n, table_ptr, index_ptr, d_ptr, QMIN: tl.constexpr, QMAX: tl.constexpr,
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
    def _derivative(xi, xs, index_ptr, bp_ptr, slope_ptr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                    KIND: tl.constexpr, NBP: tl.constexpr, BLOCK: tl.constexpr):
        """The straight-through gradient's factor at xi (xs = xi * 2^d): CLOSED_FORM's
        derivative numbered KIND (ops/registry.py), or (D_SLOPE) the slope of the code's segment, counted against
        the breakpoints of the table's current scale."""
        if KIND == D_SLOPE:
            code = tl.where(xs == xs, xs, 0.0)
            code = tl.minimum(tl.maximum(libdevice.rint(code), QMIN), QMAX).to(tl.int32)
            row = tl.load(index_ptr).to(tl.int64) * NBP
            seg = tl.zeros([BLOCK], dtype=tl.int32)
            for j in tl.static_range(NBP):
                seg += (tl.load(bp_ptr + row + j) < code).to(tl.int32)
            der = tl.load(slope_ptr + seg)
        elif KIND == D_GELU:
            der = 0.5 * (1.0 + libdevice.erf(xi * 0.7071067811865476)) \
                + xi * libdevice.exp(-0.5 * xi * xi) * 0.3989422804014327
        elif KIND == D_GELU_TANH:
            t = libdevice.tanh(0.7978845608028654 * (xi + 0.044715 * xi * xi * xi))
            der = 0.5 * (1.0 + t) + 0.5 * xi * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * xi * xi)
        elif KIND == D_SWISH:
            sg = 1.0 / (1.0 + libdevice.exp(-xi))
            der = sg * (1.0 + xi * (1.0 - sg))
        elif KIND == D_HSWISH:
            der = tl.where(xi <= -3.0, 0.0, tl.where(xi >= 3.0, 1.0, (2.0 * xi + 3.0) / 6.0))
        elif KIND == D_HSIGMOID:
            der = tl.where((xi > -3.0) & (xi < 3.0), 1.0 / 6.0, 0.0)
        elif KIND == D_SIGMOID:
            sg = 1.0 / (1.0 + libdevice.exp(-xi))
            der = sg * (1.0 - sg)
        elif KIND == D_TANH:
            th = libdevice.tanh(xi)
            der = 1.0 - th * th
        elif KIND == D_SOFTPLUS:
            der = 1.0 / (1.0 + libdevice.exp(-xi))
        elif KIND == D_EXP:
            der = libdevice.exp(xi)
        elif KIND == D_DECAY:
            der = -libdevice.exp(-xi)
        elif KIND == D_RSQRT:
            der = -0.5 * libdevice.rsqrt(xi) / xi
        elif KIND == D_RECIPROCAL:
            der = -1.0 / (xi * xi)
        else:
            tl.static_assert(False, "no derivative of that number: ops/registry.py lists them")
        return der

    @triton.jit
    def _lut_bwd(g_ptr, x_ptr, gx_ptr, n, index_ptr, d_ptr, bp_ptr, slope_ptr, QMIN: tl.constexpr,
                 QMAX: tl.constexpr, KIND: tl.constexpr, NBP: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        scale = tl.exp2(tl.load(d_ptr).to(tl.float32))
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xs = x * scale
        inside = (xs >= QMIN - 0.5) & (xs <= QMAX + 0.5)  # False for NaN and +-inf
        der = _derivative(tl.where(inside, x, 0.0), xs, index_ptr, bp_ptr, slope_ptr, QMIN, QMAX, KIND, NBP, BLOCK)
        gx = tl.where(inside, g * der, 0.0)
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _pow2(e):
        """2^e as float32 for integer e in [-126, 127], built from its bits (exact, no exp2)."""
        return ((e + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _times_pow2(x, e):
        """x * 2^e for integer e in [-252, 254], as two normal factors: one rounding, as a
        single multiplication by 2^e (even where 2^e itself is subnormal) rounds."""
        half = e >> 1
        return (x * _pow2(half)) * _pow2(e - half)

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
    def _reduced_lookup(v, table_ptr, index_ptr, d_ptr, QMIN: tl.constexpr, QMAX: tl.constexpr, RSQRT: tl.constexpr):
        """RangeReducedLUT's value at float32 v: the table at the reduced mantissa's code, times
        the exact 2^-k; NaN gives NaN (here, in the norms' and the attention's kernels)."""
        m, k, valid = _reduce(v, RSQRT)
        row = tl.load(index_ptr).to(tl.int64) * (QMAX - QMIN + 1)
        c = tl.minimum(tl.maximum(libdevice.rint(m * tl.exp2(tl.load(d_ptr).to(tl.float32))), QMIN), QMAX)
        t = tl.load(table_ptr + row + (c - QMIN).to(tl.int32))  # every code is a valid index
        return tl.where(v == v, _times_pow2(t, -k), v)

    @triton.jit
    def _range_reduced_fwd(v_ptr, y_ptr, n, table_ptr, index_ptr, d_ptr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                           RSQRT: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        v = tl.load(v_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        y = _reduced_lookup(v, table_ptr, index_ptr, d_ptr, QMIN, QMAX, RSQRT)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _range_reduced_bwd(g_ptr, v_ptr, gv_ptr, n, index_ptr, d_ptr, bp_ptr, slope_ptr, QMIN: tl.constexpr,
                           QMAX: tl.constexpr, RSQRT: tl.constexpr, KIND: tl.constexpr, NBP: tl.constexpr,
                           BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        v = tl.load(v_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m, k, valid = _reduce(v, RSQRT)
        ms = m * tl.exp2(tl.load(d_ptr).to(tl.float32))
        inside = (ms >= QMIN - 0.5) & (ms <= QMAX + 0.5)
        der = _derivative(m, ms, index_ptr, bp_ptr, slope_ptr, QMIN, QMAX, KIND, NBP, BLOCK)
        g2 = tl.where(inside, _times_pow2(g, -k) * der, 0.0)  # the output's 2^-k, then the table's slope
        if RSQRT:  # m = v * 2^-2k
            gv = _times_pow2(g2, -2 * k)
        else:
            gv = _times_pow2(g2, -k)
        tl.store(gv_ptr + offs, tl.where(valid, gv, 0.0).to(gv_ptr.dtype.element_ty), mask=mask)


def usable(x: torch.Tensor) -> bool:
    return AVAILABLE and x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _launch(kernel, inputs: tuple[torch.Tensor, ...], *params, **meta) -> torch.Tensor:
    """One elementwise kernel over `inputs` (all in one layout), writing a new tensor like the
    last of them."""
    out = torch.empty_like(inputs[-1])
    n = out.numel()
    if n:
        kernel[(triton.cdiv(n, BLOCK),)](*inputs, out, n, *params, BLOCK=BLOCK, num_warps=8, **meta)
    return out


def _backward_inputs(grad: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return grad.to(x.dtype).contiguous(), x.contiguous()


def lookup_triton(x: torch.Tensor, table_real: torch.Tensor, scale_index: torch.Tensor, d: torch.Tensor,
                  qmin: int, qmax: int) -> torch.Tensor:
    return _launch(_lut_fwd, (dense(x),), table_real, scale_index.reshape(1), d.reshape(1), QMIN=qmin, QMAX=qmax)


def backward_usable(x: torch.Tensor, derivative: str) -> bool:
    """The kernel serves float32/16 and bfloat16 on CUDA for the named derivatives (float64
    and a user's function take the torch path)."""
    return usable(x) and derivative in DERIVATIVE_NUMBERS


def lookup_backward_triton(grad: torch.Tensor, x: torch.Tensor, slopes_real: torch.Tensor, breakpoints: torch.Tensor,
                           scale_index: torch.Tensor, d: torch.Tensor, qmin: int, qmax: int,
                           derivative: str) -> torch.Tensor:
    bp = breakpoints.to(torch.int32).contiguous()
    return _launch(_lut_bwd, _backward_inputs(grad, x), scale_index.reshape(1), d.reshape(1), bp,
                   slopes_real.float().contiguous(), QMIN=qmin, QMAX=qmax, KIND=DERIVATIVE_NUMBERS[derivative], NBP=bp.shape[-1])


def range_reduced_forward(v: torch.Tensor, table_real: torch.Tensor, scale_index: torch.Tensor, d: torch.Tensor,
                          qmin: int, qmax: int, rsqrt: bool) -> torch.Tensor:
    """RangeReducedLUT's forward in one pass (reduction by the float's exponent bits, table,
    exact 2^-k): the same bits as its torch ops."""
    return _launch(_range_reduced_fwd, (dense(v),), table_real, scale_index.reshape(1), d.reshape(1), QMIN=qmin,
                   QMAX=qmax, RSQRT=rsqrt)


def range_reduced_backward(grad: torch.Tensor, v: torch.Tensor, slopes_real: torch.Tensor, breakpoints: torch.Tensor,
                           scale_index: torch.Tensor, d: torch.Tensor, qmin: int, qmax: int, rsqrt: bool,
                           slope: bool) -> torch.Tensor:
    bp = breakpoints.to(torch.int32).contiguous()
    kind = DERIVATIVE_NUMBERS["" if slope else ("rsqrt" if rsqrt else "reciprocal")]
    return _launch(_range_reduced_bwd, _backward_inputs(grad, v), scale_index.reshape(1), d.reshape(1), bp,
                   slopes_real.float().contiguous(), QMIN=qmin, QMAX=qmax, RSQRT=rsqrt, KIND=kind, NBP=bp.shape[-1])


class RangeReducedFunction(torch.autograd.Function):
    """RangeReducedLUT on CUDA as one kernel each way; the backward is the straight-through
    gradient autograd takes through the torch ops (the table's derivative at the mantissa,
    times the exact powers of two, 0 where nan_to_num or the clamp cut the input)."""

    @staticmethod
    def forward(ctx, v, table_real, slopes_real, breakpoints, scale_index, d, qmin, qmax, rsqrt, slope):
        ctx.save_for_backward(v, slopes_real, breakpoints, scale_index, d)
        ctx.args = (qmin, qmax, rsqrt, slope)
        return range_reduced_forward(v, table_real, scale_index, d, qmin, qmax, rsqrt)

    @staticmethod
    def backward(ctx, grad):
        v, slopes_real, breakpoints, scale_index, d = ctx.saved_tensors
        gv = range_reduced_backward(grad, v, slopes_real, breakpoints, scale_index, d, *ctx.args)
        return (gv,) + (None,) * 9

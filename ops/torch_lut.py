"""The integer table in PyTorch: section 3 of docs/lut-format.md on integer tensors, plus autograd.

Two evaluations, always equal (tested over every input code against the numpy reference):
- `lut_int`: the spec's formula, bucketize + integer multiply-add, in int32 when the
  table's largest accumulator fits (checked), else int64. This is what hardware computes.
- `expand`: the same integers precomputed for every Q-bit input code of every scale, stored
  as exact float32 reals, so the forward pass is quantize -> one gather. Exactly the same
  outputs, far fewer passes over memory; used by the modules (CPU and GPU) for Q <= 16.

Floating point only ever appears in quantizing the input (x * 2^d, round half to even,
clamp) and in the real value of the integer output (exact: |ACC| < 2^24 is checked), cast
last to the input's dtype.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from gqa_lut.evaluator import output_frac_bits, runtime_bits
from gqa_lut.quantization import int_range
from gqa_lut.table import Table
from ops import cuda_kernel


def acc_dtype(table: Table) -> torch.dtype:
    """int32 when every intermediate of the table fits it (gqa_lut.bounds), else int64."""
    return torch.int32 if runtime_bits(table) == 32 else torch.int64


def lut_int(codes: torch.Tensor, table: Table, d: int) -> torch.Tensor:
    """Spec section 3 on integer input codes (clamped to the Q-bit range first)."""
    dt = acc_dtype(table)
    dev = codes.device
    qmin, qmax = int_range(table.input_bits)
    X = codes.to(dt).clamp(qmin, qmax)
    bp = torch.as_tensor(table.breakpoints[d], dtype=dt, device=dev)
    i = torch.bucketize(X, bp, right=False)  # number of breakpoints < X: ties go left
    K = torch.as_tensor(table.slopes, dtype=dt, device=dev)[i]
    B = torch.as_tensor(table.intercepts, dtype=dt, device=dev)[i]
    if d >= 0:
        acc = K * X + B * (1 << d)
    else:
        acc = K * X * (1 << (-d)) + B
    if table.output is None:
        return acc
    t = table.frac_bits + max(d, 0) - table.output.frac_bits
    y = (acc + (1 << (t - 1))) >> t if t > 0 else acc << (-t)
    lo, hi = int_range(table.output.bits)
    return y.clamp(lo, hi)


def expand(table: Table, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(S, 2^Q) integer outputs for every code of every scale, and (S,) their fractional bits."""
    if table.input_bits > 16:
        raise ValueError(f"input_bits {table.input_bits}: expansion is for at most 16 bits")
    qmin, qmax = int_range(table.input_bits)
    codes = torch.arange(qmin, qmax + 1, device=device)
    rows = [lut_int(codes, table, d) for d in table.scales]
    dt = torch.int32 if all(int(r.abs().max()) < 2 ** 31 - 1 for r in rows) else torch.int64
    frac = torch.tensor([output_frac_bits(table, d) for d in table.scales], dtype=torch.int64, device=device)
    return torch.stack(rows).to(dt), frac


def tracing() -> bool:
    """A graph is being traced (torch.compile, torch.export, jit.trace): the hand-written
    kernels step aside for torch ops the tracer can record."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def call_path(*tensors: torch.Tensor) -> str:
    """How a table or quantizer call with these inputs runs: "plain" (no gradient to carry, or
    a jit trace: the function itself), "export" (torch.export: the custom op, one node) or
    "autograd" (eager training and torch.compile: the autograd.Function; the custom op's Python
    dispatch cost more than its kernels in a training step, bench/qat_speed.py)."""
    if torch.jit.is_tracing():
        return "plain"
    if exporting():
        return "export"
    if not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return "plain"
    return "autograd"


def exporting() -> bool:
    """True under torch.export only. torch.compiler.is_exporting() also says True under
    torch.compile up to torch 2.11 (pytorch#176347); the flag it should read is right in both."""
    return bool(getattr(torch.compiler, "_is_exporting_flag", False))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The precision inputs are quantized in: float64 stays float64 (one rounding, not two at
    ties), narrower floats go up to float32, where x * 2^d is exact."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def require_float(x: torch.Tensor, who: str) -> None:
    """docs/lut-format.md section 7: an integer tensor given to a module of real values is an error."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} expects a floating-point tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who} expects a floating-point tensor, got dtype {x.dtype}: quantized codes "
                        "go through ops.torch_lut.lut_int, real values must be float")


def quantize_codes(x: torch.Tensor, d: torch.Tensor, input_bits: int) -> torch.Tensor:
    """X = clamp(round(x * 2^d)) as int32 (round half to even, exact). NaN -> 0, +-inf saturate."""
    qmin, qmax = int_range(input_bits)
    dt = compute_dtype(x)
    t = torch.round(torch.nan_to_num(x.to(dt), nan=0.0) * torch.exp2(d.to(dt)))
    return t.clamp(qmin, qmax).to(torch.int32)


def dequantized(values: torch.Tensor, frac: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The expanded table as reals in `dtype`: each one the exact value X * 2^-frac rounded once
    (exact in float32 while |X| < 2^24, which every 8-bit table satisfies)."""
    return values.to(dtype) * torch.exp2(-frac.to(dtype))[:, None]


_WORKSPACE = threading.local()  # one scratch per thread: lookups run from data loaders and servers


def _workspace(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Reused float32/int32 scratch on the CPU, where fresh large tensors cost page faults that
    dominate this op's time (CUDA's caching allocator already reuses memory). Each thread has
    its own: a shared buffer gave concurrent callers each other's codes (wrong outputs and
    out-of-range indices). Only the gather's fresh output leaves this function's caller."""
    spaces = getattr(_WORKSPACE, "by_device", None)
    if spaces is None:
        spaces = _WORKSPACE.by_device = {}
    ws = spaces.get(device)
    if ws is None or ws[0].numel() < n:
        ws = (torch.empty(n, dtype=torch.float32, device=device), torch.empty(n, dtype=torch.int32, device=device))
        spaces[device] = ws
    return ws[0][:n], ws[1][:n]


def lookup(x: torch.Tensor, table_real: torch.Tensor, scale_index: torch.Tensor, d: torch.Tensor,
           input_bits: int) -> torch.Tensor:
    """Forward value of the table at real inputs x, in x's dtype: quantize, gather (exact).
    One pass over memory where it can be: a Triton kernel on CUDA (ops/triton_lut.py), a
    compiled C loop on the CPU for float32 and bfloat16 (ops/cpu_kernel.py); torch ops else."""
    qmin, qmax = int_range(input_bits)
    if x.is_cuda and not tracing():
        from ops import triton_lut
        if triton_lut.usable(x):
            return triton_lut.lookup_triton(x, table_real, scale_index, d, qmin, qmax)
    if x.device.type == "cpu" and not tracing():
        from ops import cpu_kernel
        y = cpu_kernel.lookup_cpu(x, table_real, int(scale_index), int(d), qmin, qmax)
        if y is not None:
            return y
    row = table_real.index_select(0, scale_index.reshape(1)).reshape(-1).to(x.dtype)  # no data-dependent shape
    if x.device.type == "cpu" and x.dtype != torch.float64 and not tracing():
        v, idx = _workspace(x.numel(), x.device)
        torch.mul(x.reshape(-1), torch.exp2(d.float()), out=v)
        v.round_().sub_(qmin).nan_to_num_(nan=float(-qmin)).clamp_(0, qmax - qmin)
        idx.copy_(v)
        return torch.index_select(row, 0, idx).reshape(x.shape)
    codes = quantize_codes(x, d, input_bits)
    return row[(codes - qmin).long()]


def _gelu_grad(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x * 0.7071067811865476)) + x * torch.exp(-0.5 * x * x) * 0.3989422804014327


def _gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    c = 0.7978845608028654
    t = torch.tanh(c * (x + 0.044715 * x ** 3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)


def _swish_grad(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _sigmoid_grad(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


def _step(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return ((x > lo) & (x < hi)).to(x.dtype)


# Closed-form derivatives for the "exact" backward: the backward op runs below autograd (no
# graph to differentiate there), and closed forms are what torch.compile can trace.
CLOSED_FORM: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": _gelu_grad,
    "gelu_tanh": _gelu_tanh_grad,
    "swish": _swish_grad,
    "hswish": lambda x: torch.where(x <= -3, 0.0, torch.where(x >= 3, 1.0, (2 * x + 3) / 6)).to(x.dtype),
    "hsigmoid": lambda x: _step(x, -3.0, 3.0) / 6,
    "sigmoid": _sigmoid_grad,
    "tanh": lambda x: 1 - torch.tanh(x) ** 2,
    "softplus": torch.sigmoid,
    "exp": torch.exp,
    "decay": lambda x: -torch.exp(-x),
    "rsqrt": lambda x: -0.5 * torch.rsqrt(x) / x,
    "reciprocal": lambda x: -1 / (x * x),
}


# The derivatives the GPU kernels compute in registers (ops/triton_lut.py, ops/csrc/lut_cuda.cu),
# by CLOSED_FORM name; "" is the active segment's slope
KINDS = {"": 0, "gelu": 1, "gelu_tanh": 2, "swish": 3, "hswish": 4, "hsigmoid": 5, "sigmoid": 6, "tanh": 7,
         "softplus": 8, "exp": 9, "decay": 10, "rsqrt": 11, "reciprocal": 12}


# On the CPU, the derivatives torch itself has as one vectorized backward kernel: grad * f'(x)
# in one pass where CLOSED_FORM's formula takes five to ten (same function, rounding may differ
# in the last bit). The straight-through mask follows in one more pass (ops/cpu_kernel.py).
NATIVE_BACKWARD: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gelu": lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="none"),
    "gelu_tanh": lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh"),
    "swish": lambda g, x: torch.ops.aten.silu_backward(g, x),
}


@torch.library.custom_op("gqa_lut::lookup", mutates_args=())
def lut_lookup(x: torch.Tensor, table_real: torch.Tensor, slopes_real: torch.Tensor, breakpoints: torch.Tensor,
               scale_index: torch.Tensor, d: torch.Tensor, input_bits: int, derivative: str) -> torch.Tensor:
    """The table's forward value as one opaque op: one node in torch.export, no graph break and
    the same bits under torch.compile, its own ONNX translation (ops/onnx_export.py).

    Backward is straight-through: `grad * g(x)` inside the representable input range and 0
    outside it (the input quantizer clamps there), where g is the exact function's derivative
    (`derivative` names it in CLOSED_FORM) or, for "", the slope of the active segment. A
    function without a closed form is differentiated by autograd in `lut_apply`. The result is
    always contiguous (the fake says so; the compiled graph checks it)."""
    return lookup(x, table_real, scale_index, d, input_bits).contiguous()


@lut_lookup.register_fake
def _lut_lookup_fake(x, table_real, slopes_real, breakpoints, scale_index, d, input_bits, derivative):
    return x.new_empty(x.shape)


def straight_through(grad: torch.Tensor, x: torch.Tensor, d: torch.Tensor, input_bits: int,
                     g_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`grad * g` inside the representable input range and 0 outside it (the input quantizer
    clamps there, so the output no longer moves); g_of(x inside the range else 0, x * 2^d)."""
    qmin, qmax = int_range(input_bits)
    dt = compute_dtype(x)
    xs = x.to(dt) * torch.exp2(d.to(dt))
    # NaN and +-inf compare False here: their output is the table's constant, gradient 0
    inside = (xs >= qmin - 0.5) & (xs <= qmax + 0.5)
    zero = torch.zeros((), dtype=dt, device=x.device)
    g = g_of(torch.where(inside, x.to(dt), zero), xs)
    return torch.where(inside, grad.to(dt) * g, zero).to(x.dtype)


def lookup_backward(grad: torch.Tensor, x: torch.Tensor, slopes_real: torch.Tensor, breakpoints: torch.Tensor,
                    scale_index: torch.Tensor, d: torch.Tensor, input_bits: int,
                    derivative: str | Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The straight-through gradient of `lookup` (see lut_lookup): one Triton kernel on CUDA in
    eager mode for a named derivative, torch ops otherwise (what compile traces and fuses)."""
    if x.is_cuda and isinstance(derivative, str) and grad.dtype == x.dtype and not tracing():
        from ops import triton_lut  # one kernel: the derivative in registers (ops/triton_lut.py)
        if triton_lut.backward_usable(x, derivative):
            qmin, qmax = int_range(input_bits)
            return triton_lut.lookup_backward_triton(grad, x, slopes_real, breakpoints, scale_index, d, qmin, qmax,
                                                     derivative)
    if x.device.type == "cpu" and isinstance(derivative, str) and derivative in NATIVE_BACKWARD and not tracing():
        from ops import cpu_kernel  # torch's own backward of the exact function, then the mask
        qmin, qmax = int_range(input_bits)
        xc = cpu_kernel.dense(x)
        gx = cpu_kernel.mask_outside_(NATIVE_BACKWARD[derivative](grad, xc), xc, int(d), qmin, qmax)
        if gx is not None:
            return gx
    if callable(derivative):
        return straight_through(grad, x, d, input_bits, lambda xi, xs: derivative(xi))
    if derivative:
        return straight_through(grad, x, d, input_bits, lambda xi, xs: CLOSED_FORM[derivative](xi))
    qmin, qmax = int_range(input_bits)
    bp = breakpoints.index_select(0, scale_index.reshape(1)).reshape(-1)

    def slope(xi: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        codes = torch.round(torch.nan_to_num(xs, nan=0.0)).clamp(qmin, qmax).to(bp.dtype)
        return slopes_real[torch.bucketize(codes, bp, right=False)].to(xs.dtype)

    return straight_through(grad, x, d, input_bits, slope)


@torch.library.custom_op("gqa_lut::lookup_backward", mutates_args=())
def lut_lookup_backward(grad: torch.Tensor, x: torch.Tensor, slopes_real: torch.Tensor, breakpoints: torch.Tensor,
                        scale_index: torch.Tensor, d: torch.Tensor, input_bits: int, derivative: str) -> torch.Tensor:
    return lookup_backward(grad, x, slopes_real, breakpoints, scale_index, d, input_bits, derivative).contiguous()


@lut_lookup_backward.register_fake
def _lut_lookup_backward_fake(grad, x, slopes_real, breakpoints, scale_index, d, input_bits, derivative):
    return x.new_empty(x.shape)


def _lookup_setup(ctx, inputs, output):
    x, _, slopes_real, breakpoints, scale_index, d, input_bits, derivative = inputs
    ctx.save_for_backward(x, slopes_real, breakpoints, scale_index, d)
    ctx.input_bits, ctx.derivative = input_bits, derivative


def _lookup_backward(ctx, grad):
    x, slopes_real, breakpoints, scale_index, d = ctx.saved_tensors
    gx = lut_lookup_backward(grad, x, slopes_real, breakpoints, scale_index, d, ctx.input_bits, ctx.derivative)
    return gx, None, None, None, None, None, None, None


lut_lookup.register_autograd(_lookup_backward, setup_context=_lookup_setup)


class _LUTFunction(torch.autograd.Function):
    """The same forward and straight-through backward as the custom op, without its dispatch:
    in eager training that dispatch (Python, twice per table per step) cost more than the
    kernels themselves, and under torch.compile the torch ops inside are traced and fused with
    their neighbours instead of staying one opaque call. Also the only path for a derivative
    given as a function (no closed form)."""

    @staticmethod
    def forward(ctx, x, table_real, slopes_real, breakpoints, scale_index, d, input_bits, derivative):
        ctx.save_for_backward(x, slopes_real, breakpoints, scale_index, d)
        ctx.input_bits, ctx.derivative = input_bits, derivative
        with torch._C.DisableTorchFunction():  # the call-site mode must not route the table's own math
            return lookup(x, table_real, scale_index, d, input_bits)

    @staticmethod
    def backward(ctx, grad):
        x, slopes_real, breakpoints, scale_index, d = ctx.saved_tensors
        # compile traces this while the call-site mode is on: exp/erf/tanh here are the
        # derivative's, not call sites
        with torch._C.DisableTorchFunction():
            gx = lookup_backward(grad, x, slopes_real, breakpoints, scale_index, d, ctx.input_bits, ctx.derivative)
        return gx, None, None, None, None, None, None, None


def lut_apply(x: torch.Tensor, table_real: torch.Tensor, slopes_real: torch.Tensor, breakpoints: torch.Tensor,
              scale_index: torch.Tensor, d: torch.Tensor, input_bits: int,
              derivative: str | Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The table's value with its straight-through backward, by the cheapest path that gives it:
    eager on CUDA, the C++ operator with its own autograd node where it is built
    (ops/cuda_kernel.py: a Python autograd.Function cost more host time than the kernels);
    eager with no gradient to carry, or a jit trace, calls `lookup` itself; eager training and
    torch.compile use the autograd function (`_LUTFunction`); torch.export (and the ONNX export
    built on it) gets the custom op, one node per table with its own ONNX translation."""
    if x.is_cuda and isinstance(derivative, str) and not tracing() and not exporting():
        fast = cuda_kernel.op()
        kind = KINDS.get(derivative)
        if fast is not None and kind is not None and x.dtype in cuda_kernel.DTYPES:
            return fast(x, table_real, slopes_real, breakpoints, scale_index, d, *int_range(input_bits), kind)
    path = call_path(x)
    if path == "plain":
        return lookup(x, table_real, scale_index, d, input_bits)
    if path == "export" and isinstance(derivative, str):
        return lut_lookup(x, table_real, slopes_real, breakpoints, scale_index, d, input_bits, derivative)
    return _LUTFunction.apply(x, table_real, slopes_real, breakpoints, scale_index, d, input_bits, derivative)


class derivative_of:
    """d fn / dx elementwise, by autograd on a detached copy (any torch-expressible op). A class,
    not a closure, so a model holding drop-ins can be pickled (torch.save(model))."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            (out,) = torch.autograd.grad(self.fn(xd).sum(), xd)
        return out

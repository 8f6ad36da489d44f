"""The integer table in torch ops: section 3 of docs/lut-format.md on integer tensors, the
reference every kernel (ops/kernels/*) is tested against and the path tracers record.

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
from ops.kernels.derivatives import CLOSED_FORM


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
                        "go through ops.kernels.reference.lut_int, real values must be float")


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


def lookup_torch(x: torch.Tensor, table_real: torch.Tensor, scale_index: torch.Tensor, d: torch.Tensor,
                 input_bits: int) -> torch.Tensor:
    """The table's forward value in torch ops: quantize, gather (exact). What every kernel is
    tested against, what tracers record, and the path where no kernel serves the call."""
    qmin, qmax = int_range(input_bits)
    row = table_real.index_select(0, scale_index.reshape(1)).reshape(-1).to(x.dtype)  # no data-dependent shape
    if x.device.type == "cpu" and x.dtype != torch.float64 and not tracing():
        v, idx = _workspace(x.numel(), x.device)
        torch.mul(x.reshape(-1), torch.exp2(d.float()), out=v)
        v.round_().sub_(qmin).nan_to_num_(nan=float(-qmin)).clamp_(0, qmax - qmin)
        idx.copy_(v)
        return torch.index_select(row, 0, idx).reshape(x.shape)
    codes = quantize_codes(x, d, input_bits)
    return row[(codes - qmin).long()]


def lookup_channels(x: torch.Tensor, table_real: torch.Tensor, channel_index: torch.Tensor, d: torch.Tensor,
                    input_bits: int) -> torch.Tensor:
    """`lookup_torch` with a scale per feature of the last dim: feature c's codes at its own d[c],
    read from its own row channel_index[c] of the expanded table (one gather from the flat
    table, so it is the same arithmetic as the per-tensor lookup, feature by feature)."""
    qmin, qmax = int_range(input_bits)
    flat_table = table_real.reshape(-1).to(x.dtype)
    offset = channel_index * table_real.shape[1]
    if x.device.type == "cpu" and x.dtype != torch.float64 and not tracing():
        v, idx = _workspace(x.numel(), x.device)  # the per-tensor CPU path's passes, plus the row offset
        v = v.view(x.shape)
        torch.mul(x, torch.exp2(d.float()), out=v)
        v.round_().sub_(qmin).nan_to_num_(nan=float(-qmin)).clamp_(0, qmax - qmin).add_(offset.float())
        idx.view(x.shape).copy_(v)
        return torch.index_select(flat_table, 0, idx).reshape(x.shape)
    dt = compute_dtype(x)
    codes = torch.round(torch.nan_to_num(x.to(dt), nan=0.0) * torch.exp2(d.to(dt))).clamp_(qmin, qmax)
    return flat_table[codes.sub_(qmin).to(torch.int64).add_(offset)]


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


def lookup_backward_torch(grad: torch.Tensor, x: torch.Tensor, slopes_real: torch.Tensor,
                          breakpoints: torch.Tensor, scale_index: torch.Tensor, d: torch.Tensor, input_bits: int,
                          derivative: str | Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The straight-through gradient of `lookup_torch` in torch ops (see ops.kernels.autograd):
    the exact function's derivative (a CLOSED_FORM name or a function) or, for "", the slope
    of the active segment."""
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




def walkable(x: torch.Tensor) -> bool:
    """Whether x's elements fill its memory in an order an elementwise pass can walk
    (contiguous, channels-last)."""
    return (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
            or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)))


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself where it is walkable, else a contiguous copy. The output is made with
    `torch.empty_like` of this, so it keeps the input's layout, as torch's elementwise ops do:
    a channels-last activation stays channels-last for the convolution after it."""
    return x if walkable(x) else x.contiguous()

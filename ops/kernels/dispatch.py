"""The one place that decides which backend runs a call (as fla's ops/backends do): Triton or
the C++ CUDA operators on CUDA, the compiled C loops on the CPU, torch ops (ops.kernels.reference)
everywhere else and whenever a graph is traced.

Every function here computes exactly what the torch reference computes (each kernel is tested
against it, bit for bit in the forward). Those returning Optional answer None where no kernel
serves the call: the caller then runs its own torch ops, which are the reference. The layers
above (ops.nn) ask this module and import no backend.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from gqa_lut.quantization import int_range
from ops.kernels import cpu_kernel, cuda_kernel, triton_attention, triton_lut, triton_norm, triton_quant
from ops.kernels.derivatives import DERIVATIVE_NUMBERS, NATIVE_BACKWARD
from ops.kernels import reference
from ops.kernels.reference import dense, exporting, lookup_backward_torch, lookup_torch, tracing

Tensor = torch.Tensor


def _eager(x: Tensor, device: str) -> bool:
    return x.device.type == device and not tracing()


# --- table lookups ------------------------------------------------------------------------------
def lookup(x: Tensor, table_real: Tensor, scale_index: Tensor, d: Tensor, input_bits: int) -> Tensor:
    """Forward value of the table at real inputs x, in x's dtype. One pass over memory where it
    can be: a Triton kernel on CUDA, a compiled C loop on the CPU for float32 and bfloat16."""
    qmin, qmax = int_range(input_bits)
    if _eager(x, "cuda") and triton_lut.usable(x):
        return triton_lut.lookup_triton(x, table_real, scale_index, d, qmin, qmax)
    if _eager(x, "cpu"):
        y = cpu_kernel.lookup_cpu(x, table_real, int(scale_index), int(d), qmin, qmax)
        if y is not None:
            return y
    return lookup_torch(x, table_real, scale_index, d, input_bits)


def lookup_channels(x: Tensor, table_real: Tensor, channel_index: Tensor, d: Tensor, input_bits: int) -> Tensor:
    """The lookup at a scale per feature of the last dim: compiled C on the CPU for float32,
    torch ops elsewhere (ops.kernels.reference.lookup_channels, which the C is tested against)."""
    if _eager(x, "cpu"):
        y = cpu_kernel.lookup_channels_cpu(x, table_real, channel_index, d, *int_range(input_bits))
        if y is not None:
            return y
    return reference.lookup_channels(x, table_real, channel_index, d, input_bits)


def softmax_numerators(x: Tensor, lut, zmin: float, inv_ln2: float, ln2: float, nmax: int) -> Optional[Tensor]:
    """LUTSoftmax's exp numerators over the last dim in one compiled pass (eager CPU float32,
    a fixed-scale exp table, no gradient to carry); None where its torch ops must run."""
    if not (_eager(x, "cpu") and lut.scale_mode == "fixed" and not lut.bypass and not lut.observing
            and not (torch.is_grad_enabled() and x.requires_grad)):
        return None
    qmin, qmax = int_range(lut.table.input_bits)
    return cpu_kernel.softmax_exp_cpu(x, lut.table_real, int(lut.scale_index), lut.scale, qmin, qmax, zmin, inv_ln2,
                                      ln2, nmax)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], softmax, scale: float, causal: bool,
              zmin: float, nmax: int) -> Optional[Tensor]:
    """Scaled dot-product attention with `softmax` (a LUTSoftmax) fused in Triton on CUDA
    (ops/kernels/triton_attention.py), where its kernels compute what the written-out path
    does: fixed-scale tables, not probing or observing, and for a gradient the tables' own
    derivatives (exp's and the reciprocal's, as the backward kernels have them). None elsewhere."""
    exp, rec = softmax.exp, softmax.reciprocal
    if not (_eager(q, "cuda") and not exporting() and triton_attention.usable(q, k, v, mask)):
        return None
    if exp.scale_mode != "fixed" or exp.bypass or exp.observing or exp._exact or exp._channels_differ:
        return None
    if not rec.fusable() or rec.lut._exact or rec.lut._channels_differ:
        return None
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grad and not (exp.grad == "exact" and exp.derivative == "exp" and rec.lut.grad == "exact"):
        return None
    return triton_attention.attention(q, k, v, mask, softmax, scale, causal, zmin, nmax)


def lookup_backward(grad: Tensor, x: Tensor, slopes_real: Tensor, breakpoints: Tensor, scale_index: Tensor,
                    d: Tensor, input_bits: int, derivative: str | Callable[[Tensor], Tensor]) -> Tensor:
    """The straight-through gradient of `lookup`: one Triton kernel on CUDA for a named
    derivative; on the CPU torch's own fused backward of the exact function, then the mask;
    torch ops otherwise (what compile traces and fuses)."""
    named = isinstance(derivative, str)
    qmin, qmax = int_range(input_bits)
    if named and grad.dtype == x.dtype and _eager(x, "cuda") and triton_lut.backward_usable(x, derivative):
        return triton_lut.lookup_backward_triton(grad, x, slopes_real, breakpoints, scale_index, d, qmin, qmax,
                                                 derivative)
    if named and derivative in NATIVE_BACKWARD and _eager(x, "cpu"):
        xc = dense(x)
        gx = cpu_kernel.mask_outside_(NATIVE_BACKWARD[derivative](grad, xc), xc, int(d), qmin, qmax)
        if gx is not None:
            return gx
    return lookup_backward_torch(grad, x, slopes_real, breakpoints, scale_index, d, input_bits, derivative)


def fused_lut(x: Tensor, table_real: Tensor, slopes_real: Tensor, breakpoints: Tensor, scale_index: Tensor,
              d: Tensor, qmin: int, qmax: int, derivative: str | Callable[[Tensor], Tensor]) -> Optional[Tensor]:
    """The table's value through the C++ CUDA operator with its own autograd node (forward and
    straight-through backward, the derivative by its number), where it is built and serves x;
    else None."""
    if not isinstance(derivative, str) or not _eager(x, "cuda") or exporting():
        return None
    kind = DERIVATIVE_NUMBERS.get(derivative)
    fast = cuda_kernel.op()
    if fast is None or kind is None or x.dtype not in cuda_kernel.DTYPES:
        return None
    return fast(x, table_real, slopes_real, breakpoints, scale_index, d, qmin, qmax, kind)


def range_reduced(v: Tensor, lut, rsqrt: bool) -> Optional[Tensor]:
    """RangeReducedLUT's forward (and on CUDA its backward) in one pass, for a `fusable` module's
    table `lut`: Triton on CUDA, compiled C on the CPU for float32 without autograd."""
    if tracing():
        return None
    qmin, qmax = int_range(lut.table.input_bits)
    grad = torch.is_grad_enabled() and v.requires_grad
    if not v.is_cuda:
        if grad:
            return None
        return cpu_kernel.range_reduced_cpu(v, lut.table_real, int(lut.scale_index), int(lut.d_current), qmin,
                                            qmax, rsqrt)
    if not triton_lut.usable(v):
        return None
    if grad:
        return triton_lut.RangeReducedFunction.apply(v, lut.table_real, lut.slopes_real, lut.breakpoints,
                                                     lut.scale_index, lut.d_current, qmin, qmax, rsqrt,
                                                     lut.grad == "slope")
    return triton_lut.range_reduced_forward(v, lut.table_real, lut.scale_index, lut.d_current, qmin, qmax, rsqrt)


# --- norms --------------------------------------------------------------------------------------
def _norm_serves(x: Tensor, groups: int, size: int, rsqrt) -> bool:
    return _eager(x, "cuda") and rsqrt.fusable() and triton_norm.usable(x, groups, size)


def layer_norm(x: Tensor, dims: tuple[int, ...], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               rsqrt) -> Optional[Tensor]:
    """LayerNorm over `dims` in one Triton pass each way on CUDA; None elsewhere."""
    if not x.is_cuda:
        return None
    size = math.prod(x.shape[d] for d in dims)
    if not _norm_serves(x, 1, size, rsqrt):
        return None
    return triton_norm.layer_norm(x, size, weight, bias, eps, rsqrt)


def group_norm_2d(x: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                  rsqrt) -> Optional[Tensor]:
    """GroupNorm of a 2-D (N, C) input (a RetNet's per-head norm) in one Triton pass on CUDA."""
    if x.dim() != 2 or not x.is_cuda or not _norm_serves(x, groups, x.shape[1], rsqrt):
        return None
    return triton_norm.group_norm_2d(x, groups, weight, bias, eps, rsqrt)


def group_stats(x: Tensor, groups: int) -> Optional[tuple[Tensor, Tensor]]:
    """(mean, var) per (sample, group) of an image batch in inference, one compiled pass per
    statistic in x's layout on the CPU (2-D inputs keep the torch ops: fast there, and their bits)."""
    if x.dim() <= 2 or tracing() or (torch.is_grad_enabled() and x.requires_grad):
        return None
    return cpu_kernel.group_stats_cpu(x, groups)


# --- fake quantizers ----------------------------------------------------------------------------
def _quant_cuda(x: Tensor) -> bool:
    return _eager(x, "cuda") and triton_quant.usable(x)


def tqt_forward(x: Tensor, log2_t: Tensor, bits: int, dmin: int, dmax: int,
                scale: Callable[[], Tensor]) -> Optional[tuple[Tensor, Tensor]]:
    """(x fake-quantized, d) in one pass: Triton on CUDA (d computed on the device), compiled C
    on the CPU for float32 (d from `scale()`)."""
    if _quant_cuda(x):
        return triton_quant.tqt_forward(x, log2_t, bits, dmin, dmax)
    if _eager(x, "cpu"):
        d = scale()
        y = cpu_kernel.tqt_forward_cpu(x, int(d), *int_range(bits))
        if y is not None:
            return y, d
    return None


def tqt_backward(grad: Tensor, x: Tensor, d: Tensor, bits: int) -> Optional[tuple[Tensor, Tensor]]:
    """(gradient of x, gradient of log2 t) in one pass: Triton on CUDA, compiled C on the CPU
    (its sum in double)."""
    if _quant_cuda(x) and grad.dtype == x.dtype:
        return triton_quant.tqt_backward(grad, x, d, bits)
    if _eager(x, "cpu"):
        got = cpu_kernel.tqt_backward_cpu(grad, x, int(d), *int_range(bits))
        if got is not None:
            return got[0], torch.tensor(got[1] * math.log(2.0), dtype=torch.float32)
    return None


def weight_fake_quant(w: Tensor, bits: int) -> Optional[Tensor]:
    """Per-output-channel weight fake quantization of a 2-D weight in one Triton pass on CUDA."""
    if w.dim() == 2 and _quant_cuda(w):
        return triton_quant.weight_fake_quant(w, bits)
    return None


def fused_quantizer(x: Tensor, name: str) -> Optional[Callable[..., object]]:
    """The C++ CUDA fake quantizer `name` ("tqt", "weight_fake_quant") with its own autograd
    node, where it is built and serves x (eager, not exporting); else None."""
    if not _eager(x, "cuda") or exporting() or x.dtype not in cuda_kernel.DTYPES:
        return None
    if name == "weight_fake_quant" and (x.dtype != torch.float32 or x.dim() != 2):
        return None
    ext = cuda_kernel.extension()
    return getattr(ext, name) if ext is not None else None

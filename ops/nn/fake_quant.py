"""Fake quantizers: TQT (learned power-of-two threshold) and per-channel weights.

On CUDA in eager mode each direction is one kernel instead of six to ten elementwise torch ops
with full-size temporaries saved for backward: the backward recomputes what it needs from the
saved input and the scale d. The kernels are C++ operators with their own autograd nodes
where ops/kernels/cuda_kernel.py builds them (a Python autograd.Function and a Triton launch cost more
host time than the kernels' GPU time in a training step), else Triton (ops/kernels/triton_quant.py). The torch ops here are the
reference: the CPU path, what torch.compile traces (and fuses with the neighbouring ops), and
what the kernels are tested against. Three ways in, picked per call as for the tables
(`ops.kernels.reference.call_path`); ops.kernels.dispatch picks the kernel: the plain function, an autograd.Function (eager training,
compile), a `torch.library.custom_op` (torch.export: one node per quantizer).
"""
from __future__ import annotations

import math

import torch

from gqa_lut.quantization import int_range
from ops.kernels import dispatch
from ops.kernels.reference import call_path, compute_dtype


def tqt_scale(log2_t: torch.Tensor, bits: int, dmin: int, dmax: int) -> torch.Tensor:
    """d = (bits - 1) - ceil(log2 t), clamped to [dmin, dmax]: the threshold's power of two."""
    return torch.clamp((bits - 1) - torch.ceil(log2_t.detach().float()), dmin, dmax)


def _tqt_forward(x: torch.Tensor, log2_t: torch.Tensor, bits: int, dmin: int, dmax: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x fake-quantized to `bits` at scale 2^-d, d). NaN -> 0; +-inf saturate."""
    fused = dispatch.tqt_forward(x, log2_t, bits, dmin, dmax, lambda: tqt_scale(log2_t, bits, dmin, dmax))
    if fused is not None:
        return fused
    qmin, qmax = int_range(bits)
    d = tqt_scale(log2_t, bits, dmin, dmax)
    s = torch.exp2(-d).to(compute_dtype(x))
    q = torch.round(torch.nan_to_num(x.to(s.dtype), nan=0.0) / s).clamp(qmin, qmax)
    return (q * s).to(x.dtype).contiguous(), d


@torch.library.custom_op("gqa_lut::tqt_quantize", mutates_args=())
def tqt_quantize_op(x: torch.Tensor, log2_t: torch.Tensor, bits: int, dmin: int, dmax: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    return _tqt_forward(x, log2_t, bits, dmin, dmax)


@tqt_quantize_op.register_fake
def _tqt_fake(x, log2_t, bits, dmin, dmax):
    return x.new_empty(x.shape), log2_t.new_empty((), dtype=torch.float32)


def _tqt_backward(grad: torch.Tensor, x: torch.Tensor, d: torch.Tensor, bits: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(straight-through gradient of x: grad inside the clip range, 0 outside; the gradient of
    log2 t: sum of grad * s * ln 2 * (q - v) inside and grad * s * ln 2 * q at the clip)."""
    fused = dispatch.tqt_backward(grad, x, d, bits)
    if fused is not None:
        return fused
    qmin, qmax = int_range(bits)
    s = torch.exp2(-d).to(compute_dtype(x))
    v = torch.nan_to_num(x.to(s.dtype), nan=0.0) / s
    q = torch.round(v).clamp(qmin, qmax)
    inside = (v >= qmin) & (v <= qmax)
    gx = (grad * inside).contiguous()
    g_log2t = (grad.float() * s * math.log(2.0) * torch.where(inside, q - v, q)).sum()
    return gx, g_log2t.float().reshape(())


@torch.library.custom_op("gqa_lut::tqt_quantize_backward", mutates_args=())
def tqt_backward_op(grad: torch.Tensor, x: torch.Tensor, d: torch.Tensor, bits: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    return _tqt_backward(grad, x, d, bits)


@tqt_backward_op.register_fake
def _tqt_backward_fake(grad, x, d, bits):
    return grad.new_empty(grad.shape), grad.new_empty((), dtype=torch.float32)


def _tqt_setup(ctx, inputs, output):
    x, log2_t, bits, _, _ = inputs
    ctx.save_for_backward(x, output[1])
    ctx.bits = bits
    ctx.log2_dtype = log2_t.dtype


def _tqt_autograd(ctx, grad, _grad_d):
    x, d = ctx.saved_tensors
    gx, g_log2t = tqt_backward_op(grad, x, d, ctx.bits)
    return gx, g_log2t.to(ctx.log2_dtype), None, None, None


tqt_quantize_op.register_autograd(_tqt_autograd, setup_context=_tqt_setup)


class _TQTFunction(torch.autograd.Function):
    """The custom op's forward and backward without its dispatch, for eager training (where
    the dispatch cost more than the kernels) and torch.compile (which then traces the torch
    ops and fuses them with their neighbours)."""

    @staticmethod
    def forward(ctx, x, log2_t, bits, dmin, dmax):
        y, d = _tqt_forward(x, log2_t, bits, dmin, dmax)
        ctx.save_for_backward(x, d)
        ctx.bits, ctx.log2_dtype = bits, log2_t.dtype
        ctx.mark_non_differentiable(d)
        return y, d

    @staticmethod
    def backward(ctx, grad, _grad_d):
        x, d = ctx.saved_tensors
        gx, g_log2t = _tqt_backward(grad, x, d, ctx.bits)
        return gx, g_log2t.to(ctx.log2_dtype), None, None, None


def tqt_quantize(x: torch.Tensor, log2_threshold: torch.Tensor, bits: int, dmin: int, dmax: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-quantize x to `bits` at scale 2^-d, d = (bits-1) - ceil(log2_threshold) clamped to
    [dmin, dmax] (TQT, Jain et al. 2020); returns (x_q, d). Gradients: straight-through for x,
    TQT's for the threshold."""
    fused = dispatch.fused_quantizer(x, "tqt")  # one C++ call with its own autograd node
    if fused is not None:
        return fused(x, log2_threshold, bits, dmin, dmax)
    path = call_path(x, log2_threshold)
    if path == "plain":
        return _tqt_forward(x, log2_threshold, bits, dmin, dmax)
    if path == "export":
        return tqt_quantize_op(x, log2_threshold, bits, dmin, dmax)
    return _TQTFunction.apply(x, log2_threshold, bits, dmin, dmax)


def _weight_fq(w: torch.Tensor, bits: int) -> torch.Tensor:
    fused = dispatch.weight_fake_quant(w, bits)
    if fused is not None:
        return fused
    qmax = 2 ** (bits - 1) - 1
    scale = w.detach().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    return torch.clamp(torch.round(w / scale), -qmax - 1, qmax) * scale


@torch.library.custom_op("gqa_lut::weight_fake_quant", mutates_args=())
def weight_fake_quant_op(w: torch.Tensor, bits: int) -> torch.Tensor:
    return _weight_fq(w, bits).contiguous()


@weight_fake_quant_op.register_fake
def _weight_fake_quant_fake(w, bits):
    return w.new_empty(w.shape)


weight_fake_quant_op.register_autograd(lambda ctx, grad: (grad, None))  # straight-through


class _WeightFQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, bits):
        return _weight_fq(w, bits)

    @staticmethod
    def backward(ctx, grad):
        return grad, None  # straight-through


def weight_fake_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel (dim 0) fake quantization at max |w| / (2^(bits-1) - 1),
    straight-through gradient; one kernel on CUDA."""
    fused = dispatch.fused_quantizer(w, "weight_fake_quant")
    if fused is not None:
        return fused(w, bits)
    path = call_path(w)
    if path == "plain":
        return _weight_fq(w, bits)
    if path == "export":
        return weight_fake_quant_op(w, bits)
    return _WeightFQFunction.apply(w, bits)

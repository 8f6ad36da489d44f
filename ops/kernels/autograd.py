"""The table lookup with its straight-through backward, by the way in that fits the caller:
the plain function, an autograd.Function (eager training, torch.compile) or a
torch.library custom op (torch.export, ONNX: one node per table). Which kernel computes
either direction is ops.kernels.dispatch's choice, made in one place."""
from __future__ import annotations

from typing import Callable

import torch

from gqa_lut.quantization import int_range
from ops.kernels import dispatch
from ops.kernels.dispatch import lookup, lookup_backward
from ops.kernels.dispatch import lookup_channels
from ops.kernels.reference import call_path, lookup_backward_torch


@torch.library.custom_op("gqa_lut::lookup", mutates_args=())
def lut_lookup(x: torch.Tensor, table_real: torch.Tensor, slopes_real: torch.Tensor, breakpoints: torch.Tensor,
               scale_index: torch.Tensor, d: torch.Tensor, input_bits: int, derivative: str) -> torch.Tensor:
    """The table's forward value as one opaque op: one node in torch.export, no graph break and
    the same bits under torch.compile, its own ONNX translation (ops/convert/onnx_export.py).

    Backward is straight-through: `grad * g(x)` inside the representable input range and 0
    outside it (the input quantizer clamps there), where g is the exact function's derivative
    (`derivative` names it in CLOSED_FORM) or, for "", the slope of the active segment. A
    function without a closed form is differentiated by autograd in `lut_apply`. The result is
    always contiguous (the fake says so; the compiled graph checks it)."""
    return lookup(x, table_real, scale_index, d, input_bits).contiguous()


@lut_lookup.register_fake
def _lut_lookup_fake(x, table_real, slopes_real, breakpoints, scale_index, d, input_bits, derivative):
    return x.new_empty(x.shape)


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
    (ops/kernels/cuda_kernel.py: a Python autograd.Function cost more host time than the kernels);
    eager with no gradient to carry, or a jit trace, calls `lookup` itself; eager training and
    torch.compile use the autograd function (`_LUTFunction`); torch.export (and the ONNX export
    built on it) gets the custom op, one node per table with its own ONNX translation."""
    fused = dispatch.fused_lut(x, table_real, slopes_real, breakpoints, scale_index, d, *int_range(input_bits),
                               derivative)
    if fused is not None:
        return fused
    path = call_path(x)
    if path == "plain":
        return lookup(x, table_real, scale_index, d, input_bits)
    if path == "export" and isinstance(derivative, str):
        return lut_lookup(x, table_real, slopes_real, breakpoints, scale_index, d, input_bits, derivative)
    return _LUTFunction.apply(x, table_real, slopes_real, breakpoints, scale_index, d, input_bits, derivative)


class _ChannelLUTFunction(torch.autograd.Function):
    """The per-feature-scale lookup (`lookup_channels`) with the straight-through backward of
    the per-tensor one, each feature masked outside its own input range. Torch ops both ways:
    the fused kernels take one scale per call."""

    @staticmethod
    def forward(ctx, x, table_real, channel_index, d, input_bits, derivative):
        ctx.save_for_backward(x, d)
        ctx.input_bits, ctx.derivative = input_bits, derivative
        with torch._C.DisableTorchFunction():
            return lookup_channels(x, table_real, channel_index, d, input_bits)

    @staticmethod
    def backward(ctx, grad):
        x, d = ctx.saved_tensors
        with torch._C.DisableTorchFunction():
            gx = lookup_backward_torch(grad, x, None, None, None, d, ctx.input_bits, ctx.derivative)
        return gx, None, None, None, None, None


@torch.library.custom_op("gqa_lut::lookup_channels", mutates_args=())
def lut_lookup_channels(x: torch.Tensor, table_real: torch.Tensor, channel_index: torch.Tensor, d: torch.Tensor,
                        input_bits: int, derivative: str) -> torch.Tensor:
    """The per-feature-scale lookup as one opaque op for torch.export and ONNX (one node per
    table, translated in ops/convert/onnx_export.py); straight-through backward as below."""
    return lookup_channels(x, table_real, channel_index, d, input_bits).contiguous()


@lut_lookup_channels.register_fake
def _lut_lookup_channels_fake(x, table_real, channel_index, d, input_bits, derivative):
    return x.new_empty(x.shape)


def _channels_setup(ctx, inputs, output):
    x, _, _, d, input_bits, derivative = inputs
    ctx.save_for_backward(x, d)
    ctx.input_bits, ctx.derivative = input_bits, derivative


def _channels_backward(ctx, grad):
    x, d = ctx.saved_tensors
    return lookup_backward_torch(grad, x, None, None, None, d, ctx.input_bits, ctx.derivative), None, None, None, \
        None, None


lut_lookup_channels.register_autograd(_channels_backward, setup_context=_channels_setup)


def lut_channels(x: torch.Tensor, table_real: torch.Tensor, channel_index: torch.Tensor, d: torch.Tensor,
                 input_bits: int, derivative: str | Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The table at a scale per feature of the last dim (d[c], row channel_index[c]), with the
    exact function's straight-through derivative (`derivative`: a CLOSED_FORM name or a function)."""
    path = call_path(x)
    if path == "export" and isinstance(derivative, str):
        return lut_lookup_channels(x, table_real, channel_index, d, input_bits, derivative)
    if not (torch.is_grad_enabled() and x.requires_grad):
        with torch._C.DisableTorchFunction():
            return lookup_channels(x, table_real, channel_index, d, input_bits)
    return _ChannelLUTFunction.apply(x, table_real, channel_index, d, input_bits, derivative)

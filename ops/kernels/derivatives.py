"""The exact derivatives of the table functions, for the straight-through backward: closed
forms (what torch.compile traces), their numbers in the GPU kernels, torch's own fused CPU
backward kernels, and autograd's derivative of any other torch function."""
from __future__ import annotations

from typing import Callable

import torch

from ops import registry


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
    "erf": lambda x: 1.1283791670955126 * torch.exp(-x * x),
    "log": lambda x: 1 / x,
}


# The derivatives the GPU kernels compute in registers (ops/kernels/triton_lut.py, ops/kernels/csrc/lut_cuda.cu),
# by CLOSED_FORM name; "" is the active segment's slope
DERIVATIVE_NUMBERS: dict[str, int] = registry.derivative_numbers()


# On the CPU, the derivatives torch itself has as one vectorized backward kernel: grad * f'(x)
# in one pass where CLOSED_FORM's formula takes five to ten (same function, rounding may differ
# in the last bit). The straight-through mask follows in one more pass (ops/kernels/cpu_kernel.py).
NATIVE_BACKWARD: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gelu": lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="none"),
    "gelu_tanh": lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh"),
    "swish": lambda g, x: torch.ops.aten.silu_backward(g, x),
}


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

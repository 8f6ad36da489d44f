"""rsqrt, reciprocal and ln of any positive value through a table fitted on one octave: the
float's exponent does the range reduction (a leading-zero count in integer hardware)."""
from __future__ import annotations

from typing import Optional

import math

import torch
import torch.nn as nn

from gqa_lut.table import Table
from ops.kernels import dispatch
from ops.kernels.reference import compute_dtype, require_float
from ops.nn.activation import LUTActivation, covering_scale
from ops.tables import as_table


class RangeReducedLUT(nn.Module):
    """rsqrt, reciprocal or ln of any positive value through a table fitted on one octave range.

    rsqrt: v = m * 4^k with m in [1, 4), rsqrt(v) = rsqrt(m) * 2^-k.
    reciprocal: v = m * 2^k with m in [1, 2), 1/v = (1/m) * 2^-k.
    log: v = m * 2^k with m in [1, 2), ln(v) = ln(m) + k ln 2 (the table's error is absolute).
    k comes from the float exponent (a leading-zero count in integer hardware); the 2^-k is
    exact (`octave`). For rsqrt and reciprocal values <= 0 are clamped to the smallest positive
    normal float first, +inf to the largest; log gives torch.log's -inf at 0, NaN below 0 and
    inf at inf. NaN propagates (NaN in, NaN out, as torch does), with gradient 0.
    """

    def __init__(self, op: str, table: Table | str | None = None, grad: str = "exact"):
        super().__init__()
        if op not in ("rsqrt", "reciprocal", "log"):
            raise ValueError(f"op {op!r} has no range reduction: use rsqrt, reciprocal or log")
        self.op = op
        t = as_table(table, op)
        hi = 4.0 if op == "rsqrt" else 2.0
        self.lut = LUTActivation(t, scale=covering_scale(t, hi - 2.0 ** -max(t.scales)), grad=grad)
        self.lut.range_reduced = True  # its input is a mantissa of known range: never re-scaled

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        require_float(v, type(self).__name__)
        y = self._fused(v)
        if y is not None:
            return y
        dt = compute_dtype(v)
        vf = torch.nan_to_num(v.to(dt), nan=1.0, posinf=torch.finfo(dt).max).clamp_min(torch.finfo(dt).tiny)
        if torch.compiler.is_compiling():  # compile, export, ONNX: ops every backend has
            E = octave(vf.detach())  # vf = (1.x) * 2^E
        else:  # eager: the same exponent in one pass
            E = (torch.frexp(vf.detach())[1] - 1).to(dt)
        if self.op == "log":
            return self._log(v, vf, E)
        k = torch.floor(E / 2) if self.op == "rsqrt" else E
        # multiplications by exact powers of two (not torch.ldexp, whose gradient to its input is 0)
        m = vf * torch.exp2(-(2 * k if self.op == "rsqrt" else k))
        y = (self.lut(m) * torch.exp2(-k)).to(v.dtype)
        return torch.where(torch.isnan(v), v.detach(), y)

    def _log(self, v: torch.Tensor, vf: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
        y = (self.lut(vf * torch.exp2(-E)) + E * LN2).to(v.dtype)
        special = torch.where(v == 0, -math.inf, torch.where(v > 0, math.inf, math.nan)).to(v.dtype)
        return torch.where((v > 0) & ~torch.isinf(v), y, torch.where(torch.isnan(v), v.detach(), special))

    def fusable(self) -> bool:
        """Whether one-pass kernels compute what the torch ops of `forward` do: a fixed scale,
        the table's own derivative or the slope, not probing or observing (here and in the
        norms' kernels, ops/kernels/triton_norm.py)."""
        lut = self.lut
        return (self.op != "log" and not lut.bypass and not lut.observing and lut.scale_mode == "fixed"
                and (lut.grad == "slope" or lut.derivative == self.op))

    def _fused(self, v: torch.Tensor) -> Optional[torch.Tensor]:
        """One pass where it computes exactly what the torch ops of `forward` do (eager and
        `fusable`): Triton on CUDA (with its own backward), compiled C on the CPU for float32
        without autograd. None elsewhere: the torch ops run."""
        if not self.fusable():
            return None
        return dispatch.range_reduced(v, self.lut, self.op == "rsqrt")


LN2 = math.log(2.0)


def octave(v: torch.Tensor) -> torch.Tensor:
    """E with v = (1.x) * 2^E, as a float, for positive normal v: floor(log2 v) corrected by one
    where log2 rounds across a power of two. Exactly frexp's exponent - 1, written in ops that
    torch.export and ONNX have (frexp has no ONNX function)."""
    e = torch.floor(torch.log2(v))
    m = v * torch.exp2(-e)
    return e + (m >= 2).to(e.dtype) - (m < 1).to(e.dtype)

"""Softmax through the exp table (inputs minus their max, so <= 0) and the range-reduced
reciprocal of the sum; the exp table as a module and as a function."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from gqa_lut.evaluator import evaluate_codes
from gqa_lut.quantization import int_range
from gqa_lut.table import Table
from ops.kernels.reference import compute_dtype, require_float
from ops.nn.activation import LUTActivation, covering_scale
from ops.nn.range_reduced import RangeReducedLUT
from ops.tables import as_table


class LUTSoftmax(nn.Module):
    """Softmax with exp through the exp table (inputs minus their max, so <= 0) and the
    normalising 1/sum through the reciprocal table with range reduction."""

    def __init__(self, dim: int = -1, exp_table: Table | str | None = None,
                 reciprocal_table: Table | str | None = None):
        super().__init__()
        self.dim = dim
        self.exp = exp_module(as_table(exp_table, "exp"))
        self.reciprocal = RangeReducedLUT("reciprocal", reciprocal_table)
        self._note_floor()
        self.register_load_state_dict_post_hook(_after_load)

    def _note_floor(self) -> None:
        """Whether the exp table gives exactly 0 at its most negative code (the shipped one does),
        so that a -inf (masked) input already weighs 0 without a pass to zero it: a Python bool,
        no device sync and no data-dependent branch in forward."""
        t = self.exp.table
        self.masked_is_zero = bool(evaluate_codes(t, np.array([int_range(t.input_bits)[0]]), self.exp.scale)[0] == 0)

    @classmethod
    def from_float(cls, m: nn.Softmax, tables: dict[str, Table], **kw: Any) -> "LUTSoftmax":
        return cls(m.dim if m.dim is not None else -1, tables.get("exp"), tables.get("reciprocal"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.along(x, self.dim)

    def along(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Softmax over `dim` (the call sites of F.softmax give their own). A -inf input is a
        masked position: weight exactly 0, and a row with nothing unmasked is all 0."""
        require_float(x, type(self).__name__)
        xf = x.to(compute_dtype(x))
        if xf.numel() == 0:  # amax has no identity over an empty dim; softmax of nothing is nothing
            return xf.to(x.dtype).clone()
        # a row with every input -inf (all masked) has max -inf: lifted to the lowest float, so
        # that its z stays -inf instead of -inf - -inf = NaN (one op for isneginf/where)
        top = xf.amax(dim, keepdim=True).detach().clamp_min(torch.finfo(xf.dtype).min)
        z = xf - top
        e = self.exp(z)
        if not self.masked_is_zero:  # the table's saturated end is not 0: zero the masked ones
            e = torch.where(torch.isneginf(z), torch.zeros_like(z), e)
        return (e * self.reciprocal(e.sum(dim, keepdim=True))).to(x.dtype)


def _after_load(module: "LUTSoftmax", keys: Any) -> None:
    module._note_floor()  # a module-level function: a model holding a LUTSoftmax still pickles


def exp_module(table: Table) -> LUTActivation:
    """The exp table at the scale that covers its whole fitted range (x <= 0 down to lo); its
    input is a difference to the maximum, so calibration never re-scales it."""
    m = LUTActivation(table, scale=covering_scale(table, abs(table.range[0])))
    m.range_reduced = True
    return m


@lru_cache(maxsize=16)
def _cached_exp(table: Table | str | None, device: str) -> LUTActivation:
    return exp_module(as_table(table, "exp")).to(device)


def lut_exp(x: torch.Tensor, table: Table | str | None = None) -> torch.Tensor:
    """exp(x) for x <= 0 through the exp table (a functional convenience). The module, with its
    expanded table, is built once per table and device, not on every call. x > 0 lies outside
    the table (its last segment is fitted only up to 0), so it is an error, not a guess."""
    require_float(x, "lut_exp")
    if x.numel() and bool((x > 0).any()):
        raise ValueError(f"lut_exp: input {float(x.max()):g} > 0 is outside the exp table (x <= 0): "
                         "subtract the maximum first, as softmax does")
    return _cached_exp(table, str(x.device))(x)

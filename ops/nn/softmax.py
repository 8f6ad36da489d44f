"""Softmax through the exp table (inputs minus their max, so <= 0) and the range-reduced
reciprocal of the sum; the exp table as a module and as a function."""
from __future__ import annotations

from functools import lru_cache
import math
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from gqa_lut.table import Table
from ops.kernels import dispatch
from ops.kernels.reference import compute_dtype, require_float
from ops.nn.activation import LUTActivation, covering_scale
from ops.nn.range_reduced import RangeReducedLUT
from ops.tables import as_table


# exp(z) = exp(r) * 2^-n with n = floor(-z / ln 2) and r = z + n ln 2 in (-ln 2, 0]: the table
# sees only r (at its finest scale there) and the 2^-n is a shift, so every weight keeps the
# table's relative precision. Without it an exp table over [-8, 0] with 8-bit parameters has
# ~0.003 of absolute error, which is most of a small weight; with it SmolLM2-135M's softmax
# tables cost +0.0001% perplexity (python -m bench.real_models). Beyond N_MAX shifts a weight is 0
# (exp(-16.6) = 6e-8 of the row's largest), which also makes masked (-inf) inputs exactly 0.
LN2 = math.log(2.0)
N_MAX = 24
Z_MIN = -(N_MAX + 2) * LN2


class LUTSoftmax(nn.Module):
    """Softmax with exp through the exp table after range reduction (exp(z) = exp(r) * 2^-n for
    z = x - max <= 0, r in (-ln 2, 0]: a multiply by 1/ln 2 and a shift in integer hardware) and
    the normalising 1/sum through the reciprocal table with range reduction."""

    def __init__(self, dim: int = -1, exp_table: Table | str | None = None,
                 reciprocal_table: Table | str | None = None):
        super().__init__()
        self.dim = dim
        self.exp = exp_module(as_table(exp_table, "exp"), LN2)
        self.reciprocal = RangeReducedLUT("reciprocal", reciprocal_table)
        self.register_load_state_dict_post_hook(_after_load)

    def __setstate__(self, state: dict) -> None:
        """A whole module pickled before the exp's range reduction holds the exp scale for [-8, 0]
        and no load hook: both as a new module has them."""
        super().__setstate__(state)
        keep_reduced_exp_scale(self, _after_load)

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
        last = dim in (-1, xf.dim() - 1)
        e = dispatch.softmax_numerators(xf, self.exp, Z_MIN, -1.0 / LN2, LN2, N_MAX) if last else None
        if e is None:
            e = self.numerators(xf, dim)
            return (e * self.reciprocal(e.sum(dim, keepdim=True))).to(x.dtype)
        return e.mul_(self.reciprocal(e.sum(dim, keepdim=True))).to(x.dtype)  # the kernel's own tensor

    def numerators(self, xf: torch.Tensor, dim: int) -> torch.Tensor:
        """exp(x - max) through the table after range reduction, in torch ops (what the CPU
        kernel of ops/kernels is tested against, and what autograd, compile and export see)."""
        top = xf.amax(dim, keepdim=True).detach()
        # a difference below -(N_MAX + 1) ln 2 weighs 0 anyway: clamped a halving further down
        # (n > N_MAX whatever the rounding), -inf (masked) and rows with every input -inf (top
        # -inf, z NaN) weigh 0
        z = torch.nan_to_num(xf - top, nan=-math.inf).clamp_min(Z_MIN)
        n = torch.floor(z.detach() * (-1.0 / LN2))
        e = self.exp(z + n * LN2) * torch.exp2(-n)
        return torch.where(n > N_MAX, torch.zeros_like(e), e)


def exp_reduced(exp: LUTActivation, x: torch.Tensor) -> torch.Tensor:
    """exp(x) for any x through `exp` (an exp table at the scale of (-ln 2, 0]): exp(r) * 2^-n
    with n = floor(-x / ln 2), r = x + n ln 2, so a positive input is as good as a negative one
    and a very negative one keeps the table's relative precision instead of reaching its floor
    (about -4.8 for the shipped table at 8 bits). +-inf and NaN give what exp gives."""
    xf = x.to(compute_dtype(x))
    finite = torch.isfinite(xf)
    zeros = torch.zeros_like(xf)
    xs = torch.where(finite, xf, zeros)
    n = torch.floor(xs.detach() * (-1.0 / LN2))
    y = exp(xs + n * LN2) * torch.exp2(-n)
    # exp(-inf) = 0, exp(inf) = inf, exp(nan) = nan, without a float exp call
    return torch.where(finite, y, torch.where(torch.isneginf(xf), zeros, xf)).to(x.dtype)


def reduced_exp_scale(exp: LUTActivation) -> None:
    """The exp table's input is the reduced r in (-ln 2, 0]: a checkpoint or a pickle from before
    range reduction holds the scale for [-8, 0]; the drop-in's own scale is the one that fits r."""
    exp.set_scale(covering_scale(exp.table, LN2))


def keep_reduced_exp_scale(module: nn.Module, hook: Callable[[Any, Any], None]) -> None:
    """For a module unpickled from before range reduction: its load hook (that resets the exp
    scale after every state-dict load) registered again if missing, and the scale reset now."""
    if not any(h is hook for h in module._load_state_dict_post_hooks.values()):
        module.register_load_state_dict_post_hook(hook)
    hook(module, None)


def _after_load(module: "LUTSoftmax", keys: Any) -> None:
    reduced_exp_scale(module.exp)


def exp_module(table: Table, reach: Optional[float] = None) -> LUTActivation:
    """The exp table at the finest scale that covers its inputs down to -reach (its whole fitted
    range by default); its input is a difference to the maximum, so calibration never re-scales it."""
    m = LUTActivation(table, scale=covering_scale(table, abs(table.range[0]) if reach is None else reach))
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

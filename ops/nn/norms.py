"""LayerNorm, RMSNorm and GroupNorm with 1/sqrt through the range-reduced rsqrt table: the
drop-in modules and the arithmetic they share with the call sites of F.layer_norm,
F.rms_norm and F.group_norm."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from gqa_lut.table import Table
from ops.kernels import dispatch
from ops.kernels.reference import compute_dtype, require_float, tracing
from ops.nn.range_reduced import RangeReducedLUT


def _affine(y: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    if weight is not None and bias is not None:
        return torch.addcmul(bias.to(y.dtype), y, weight.to(y.dtype))  # one pass for both
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def _with_params(old: nn.Module, new: nn.Module) -> nn.Module:
    """The float norm's weight and bias in its drop-in (replace_ops moves it to the model's device)."""
    state = old.state_dict()
    # a model built on the meta device has no data to copy: the drop-in takes the tensors
    new.load_state_dict(state, strict=False, assign=any(t.is_meta for t in state.values()))
    return new


class _RsqrtTable:
    """Mixin for the norms: the torch norm's own arguments, plus `table=` for rsqrt."""

    def __init__(self, *args: Any, table: Table | str | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.rsqrt = RangeReducedLUT("rsqrt", table)


class LUTLayerNorm(_RsqrtTable, nn.LayerNorm):
    """nn.LayerNorm whose 1/sqrt(var + eps) goes through the rsqrt table (range-reduced)."""

    @classmethod
    def from_float(cls, m: nn.LayerNorm, tables: dict[str, Table], **kw: Any) -> "LUTLayerNorm":
        return _with_params(m, cls(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                                   bias=m.bias is not None, table=tables.get("rsqrt")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        require_float(x, type(self).__name__)
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, self.rsqrt)


class LUTRMSNorm(_RsqrtTable, nn.RMSNorm):

    @classmethod
    def from_float(cls, m: nn.RMSNorm, tables: dict[str, Table], **kw: Any) -> "LUTRMSNorm":
        return _with_params(m, cls(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                                   table=tables.get("rsqrt")))

    weight_offset = 0.0  # Gemma-style norms scale by (1 + weight): ops.convert.adapters sets 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        require_float(x, type(self).__name__)
        w = self.weight if self.weight is None or not self.weight_offset else self.weight + self.weight_offset
        return rms_norm(x, self.normalized_shape, w, self.eps, self.rsqrt)


class LUTGroupNorm(_RsqrtTable, nn.GroupNorm):

    @classmethod
    def from_float(cls, m: nn.GroupNorm, tables: dict[str, Table], **kw: Any) -> "LUTGroupNorm":
        return _with_params(m, cls(m.num_groups, m.num_channels, eps=m.eps, affine=m.affine,
                                   table=tables.get("rsqrt")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        require_float(x, type(self).__name__)
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.rsqrt)


# The norms' arithmetic, shared by the drop-in modules and the call sites of F.layer_norm,
# F.rms_norm and F.group_norm (ops/convert/call_sites.py): statistics in float32 (float64 stays), the
# 1/sqrt through the range-reduced rsqrt table, the result in the input's dtype.

def layer_norm(x: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float, rsqrt: RangeReducedLUT) -> torch.Tensor:
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    fused = dispatch.layer_norm(x, dims, weight, bias, eps, rsqrt)  # one Triton pass each way on CUDA
    if fused is not None:
        return fused
    # contiguous, as torch's layer_norm makes its input and so its output: a permuted input
    # (timm's LayerNorm2d) then comes back channels-last, as from the float op, and the
    # convolutions after it keep their fast layout
    xf = x.to(compute_dtype(x)).contiguous()
    centred = xf - xf.mean(dims, keepdim=True)  # (torch.var_mean is 10-15x slower on the CPU)
    return _affine(centred * rsqrt(mean_square(centred, dims) + eps), weight, bias).to(x.dtype)


def mean_square(v: torch.Tensor, dims) -> torch.Tensor:
    """mean(v^2) over dims, in v's dtype; where float32 squares overflow (rows near 1e20 and
    beyond: 1e30 gave +-5e10 after the norm, torch's own gives NaN), those statistics again in
    float64, so the norm still scales such rows to unit size. One check of the small result on
    the CPU; a traced graph keeps the plain formula (no data-dependent branch there)."""
    ms = v.pow(2).mean(dims, keepdim=True)
    if (v.dtype != torch.float64 and v.device.type == "cpu" and not tracing()
            and bool(torch.isinf(ms).any())):
        ms = v.double().pow(2).mean(dims, keepdim=True)
    return ms


def rms_norm(x: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor], eps: Optional[float],
             rsqrt: RangeReducedLUT) -> torch.Tensor:
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    xf = x.to(compute_dtype(x))
    eps = eps if eps is not None else torch.finfo(x.dtype).eps  # F.rms_norm's default
    return _affine(xf * rsqrt(mean_square(xf, dims) + eps), weight, None).to(x.dtype)


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float, rsqrt: RangeReducedLUT) -> torch.Tensor:
    """Statistics per (sample, group), 1/sqrt(var + eps) through the table, then
    y = x * A + B with A = r * weight and B = bias - mean * A per (sample, channel), as torch's
    own group_norm kernel computes it: one pass over x, in x's layout (channels-last stays)."""
    n, c = x.shape[:2]
    fused = dispatch.group_norm_2d(x, num_groups, weight, bias, eps, rsqrt)
    if fused is not None:
        return fused
    dt = compute_dtype(x)
    stats = dispatch.group_stats(x, num_groups)  # images in inference: one compiled pass per statistic
    if stats is not None:
        mean, var = stats
    else:
        xg = x.to(dt).reshape(n, num_groups, -1)
        mean = xg.mean(-1, keepdim=True)  # two passes: torch.var_mean is 10x slower on the CPU
        var = mean_square(xg - mean, -1)
    r = rsqrt(var + eps)  # (n, groups, 1)
    a = r.expand(n, num_groups, c // num_groups).reshape(n, c)
    b = -(mean.expand(n, num_groups, c // num_groups).reshape(n, c) * a)
    if weight is not None:
        a = a * weight.to(dt)
        b = b * weight.to(dt)
    if bias is not None:
        b = b + bias.to(dt)
    shape = (n, c) + (1,) * (x.dim() - 2)
    return torch.addcmul(b.reshape(shape), x.to(dt), a.reshape(shape)).to(x.dtype)

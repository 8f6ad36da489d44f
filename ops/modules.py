"""PyTorch drop-in modules whose non-linearity runs through an integer table, bit-exactly.

Forward is fake-quant: the input is quantized to `input_bits` at a power-of-two scale 2^-d,
the table is evaluated on the integer code exactly as docs/lut-format.md says, and the integer
output is turned back into a real number. Backward is straight-through (see ops.torch_lut.lut_lookup).

State is tensors only (safetensors, save_pretrained): the table itself travels as its JSON in a
uint8 buffer, so a checkpoint is self-describing; a float checkpoint without these keys loads
into a converted model with strict=True (the tables keep what they have).

NaN and inf: NaN inputs are treated as 0 and +-inf saturate to the largest/smallest input
code, so the output is always the table's finite value there, and the gradient there is 0.
Integer and bool tensors raise TypeError (docs/lut-format.md section 7); float64 inputs are
quantized in float64, narrower floats in float32.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from gqa_lut.evaluator import evaluate_codes
from gqa_lut.quantization import int_range
from gqa_lut.table import Table, table_from_json
from ops.fake_quant import tqt_quantize
from ops.tables import as_table
from ops import registry
from ops.torch_lut import (CLOSED_FORM, compute_dtype, dequantized, derivative_of, expand, lut_apply,
                           require_float, tracing)

SCALE_MODES = ("fixed", "calibrate", "learned")
GRAD_MODES = ("exact", "slope")


def covering_scale(table: Table, amax: float) -> int:
    """Finest table scale d whose input range still holds amax (no clipping), else the coarsest."""
    _, qmax = int_range(table.input_bits)
    ok = [d for d in table.scales if amax * 2.0 ** d <= qmax + 0.5]
    return max(ok) if ok else min(table.scales)


class LUTActivation(nn.Module):
    """Any table as an activation.

    scale_mode: "fixed" (scale d given, or the finest that covers the fitted range),
    "calibrate" (d set from observed inputs by `calibrate`), "learned" (TQT: a learnable log2
    threshold picks d, trained with the straight-through estimator). grad: "exact" (the exact
    function's derivative) or "slope" (the active segment's slope).
    """

    op: Optional[str] = None  # the table function of a named drop-in (LUTGELU: "gelu")
    range_reduced = False  # True inside norms and softmax: the input's range is fixed by the drop-in

    def __init__(self, table: Table, scale: Optional[int] = None, scale_mode: str = "fixed",
                 grad: str = "exact", fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        super().__init__()
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode {scale_mode!r} is not allowed: use {', '.join(SCALE_MODES)}")
        if grad not in GRAD_MODES:
            raise ValueError(f"grad {grad!r} is not allowed: use {', '.join(GRAD_MODES)}")
        self.scale_mode, self.grad = scale_mode, grad
        self.fn = fn if fn is not None else registry.reference(table.op)
        self._set_table(table)
        if scale is None:
            scale = covering_scale(table, max(abs(table.range[0]), abs(table.range[1])))
        self.set_scale(scale)
        self.register_buffer("amax", torch.zeros(()), persistent=False)
        self.observing = False
        self.bypass = False
        if scale_mode == "learned":
            self.log2_threshold = nn.Parameter(torch.tensor(float(table.input_bits - 1 - scale)))

    def _set_table(self, table: Table) -> None:
        self.table = table.validate()
        dev = self.table_real.device if hasattr(self, "table_real") else None
        derived = {**_real_tables(table), "scales": torch.tensor(table.scales, dtype=torch.int64),
                   "breakpoints": torch.tensor([table.breakpoints[d].tolist() for d in table.scales],
                                               dtype=torch.int32).reshape(len(table.scales), -1),
                   "d_current": torch.zeros((), dtype=torch.int64)}
        for name, t in derived.items():  # all derived from the table: not saved
            self.register_buffer(name, t.to(dev) if dev is not None else t, persistent=False)
        if not hasattr(self, "scale_index"):
            self.register_buffer("scale_index", torch.zeros((), dtype=torch.int64))
        self._register_derivative()

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves the tables; `.half()`, `.bfloat16()` or `.double()` must not round
        them (LUTGELU().bfloat16().float() changed 502 of 2001 outputs): the derived buffers
        keep their dtypes, rebuilt from the integer table where a cast touched them."""
        out = super()._apply(fn, recurse)
        buf = self._buffers
        if any(buf[k].dtype != dt for k, dt in REAL_TABLE_DTYPES.items()):
            dev = buf["table_real"].device
            buf.update({k: t.to(dev) for k, t in _real_tables(self.table).items()})
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "table_spec"] = _spec_tensor(self.table.to_json(), self.scale_mode, self.grad)

    def _register_derivative(self) -> None:
        """The exact backward: a closed form named by the op where the table's function is the
        registry's, the function's autograd derivative otherwise, the slope without a function."""
        if self.fn is None:
            self.derivative = ""
        elif self.table.op in CLOSED_FORM and self.fn is registry.reference(self.table.op):
            self.derivative = self.table.op
        else:
            self.derivative = derivative_of(self.fn)

    # the state_dict holds table_spec (written from the table when saved), scale_index and,
    # when learned, log2_threshold; a float checkpoint has none of them
    _OWN_KEYS = ("scale_index", "log2_threshold")
    _DERIVED_KEYS = ("table_real", "scales", "slopes_real", "breakpoints")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        raw = state_dict.pop(prefix + "table_spec", None)
        legacy = state_dict.pop(prefix + "_extra_state", None)  # checkpoints before tensor-only state
        for key in self._DERIVED_KEYS:
            state_dict.pop(prefix + key, None)
        spec = None
        if raw is not None:
            spec = json.loads(bytes(raw.to("cpu", torch.uint8).tolist()).decode())
        elif legacy is not None:
            spec = {"table": json.loads(legacy["table"]), "scale_mode": legacy["scale_mode"], "grad": legacy["grad"]}
            state_dict.setdefault(prefix + "scale_index", torch.tensor(table_from_json(spec["table"]).scales.index(
                int(legacy["scale"]))))
        if spec is not None:
            table = table_from_json(spec["table"])
            if self.op is not None:
                _check_slot(table, self.op, type(self).__name__)
            if spec["scale_mode"] not in SCALE_MODES or spec["grad"] not in GRAD_MODES:
                raise ValueError(f"{prefix}table_spec: scale_mode {spec['scale_mode']!r} / grad {spec['grad']!r} "
                                 f"is not allowed: use {', '.join(SCALE_MODES)} / {', '.join(GRAD_MODES)}")
        scales = len((table if spec is not None else self.table).scales)
        index = state_dict.get(prefix + "scale_index")
        if index is not None and not (index.numel() == 1 and 0 <= int(index) < scales):
            raise ValueError(f"{prefix}scale_index {index.tolist()} is not allowed: the table has {scales} "
                             f"scales, index 0 to {scales - 1}")
        if spec is not None:
            self.scale_mode, self.grad = spec["scale_mode"], spec["grad"]
            if table.to_json() != self.table.to_json():
                self._set_table(table)
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # a float checkpoint has none of these: the module keeps its table and scale
        mine = {prefix + k for k in self._OWN_KEYS}
        missing_keys[before:] = [k for k in missing_keys[before:] if k not in mine]
        self.d_current.fill_(int(self.scales[self.scale_index]))

    @property
    def scale(self) -> int:
        return int(self.scales[self.scale_index])

    def set_scale(self, d: int) -> None:
        if d not in self.table.scales:
            raise ValueError(f"scale {d} is not in the table: it has scales {self.table.scales}")
        self.scale_index.fill_(self.table.scales.index(d))
        self.d_current.fill_(d)  # kept beside the index so a fixed-scale call launches no lookup of it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        require_float(x, type(self).__name__)
        if self.observing:
            self.amax = torch.maximum(self.amax, torch.nan_to_num(x.detach().float(), nan=0.0,
                                                                  posinf=0.0, neginf=0.0).abs().max())
        if self.scale_mode == "learned":
            xq, d = tqt_quantize(x, self.log2_threshold, self.table.input_bits,
                                 min(self.table.scales), max(self.table.scales))
            index = (d.long() - self.scales[0]).clamp(0, len(self.table.scales) - 1)
            return self._lut(xq, index, self.scales[index])
        buf = self._buffers
        return self._lut(x, buf["scale_index"], buf["d_current"])

    def _lut(self, x: torch.Tensor, index: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if self.bypass:  # the probe of ops.replace: the drop-in's own arithmetic with exact functions
            return self.fn(x)
        buf = self._buffers  # not self.<buffer>: nn.Module's __getattr__ costs host time on every call
        table = buf["table_real64"] if x.dtype == torch.float64 else buf["table_real"]
        return lut_apply(x, table, buf["slopes_real"], buf["breakpoints"], index, d, self.table.input_bits,
                         self.derivative if self.grad == "exact" else "")

    def start_observing(self) -> None:
        """Record the largest finite |input| of the next forward passes (ops.replace.observe)."""
        self.amax.zero_()
        self.observing = True

    def finish_observing(self) -> int:
        """The finest scale that holds what was observed; returns it."""
        self.observing = False
        d = covering_scale(self.table, float(self.amax))
        self.set_scale(d)
        if self.scale_mode == "learned":
            with torch.no_grad():
                self.log2_threshold.fill_(float(self.table.input_bits - 1 - d))
        return d

    def extra_repr(self) -> str:
        return (f"op={self.table.op}, segments={self.table.segments}, bits={self.table.param_bits}/"
                f"{self.table.input_bits}, scale={self.scale}, scale_mode={self.scale_mode}, grad={self.grad}")


    @classmethod
    def from_float(cls, module: nn.Module, tables: dict[str, Table], **kw: Any) -> "LUTActivation":
        """The drop-in for a float activation module (replace_ops), with its table from `tables`."""
        return cls(tables.get(cls.op), **kw)


REAL_TABLE_DTYPES = {"table_real": torch.float32, "table_real64": torch.float64, "slopes_real": torch.float32}


def _real_tables(table: Table) -> dict[str, torch.Tensor]:
    """The float views of a table the lookups read (exact reals: every 8-bit table's outputs
    and slopes hold in float32), derived from its integers, never saved."""
    values, frac = expand(table)
    slopes = torch.tensor(table.slopes.tolist(), dtype=torch.float64) * 2.0 ** -table.frac_bits
    return {k: (dequantized(values, frac, dt) if k != "slopes_real" else slopes.to(dt))
            for k, dt in REAL_TABLE_DTYPES.items()}


def _spec_tensor(table_json: dict, scale_mode: str, grad: str) -> torch.Tensor:
    """A table and its modes as UTF-8 JSON bytes in a uint8 tensor: tensor-only state."""
    spec = json.dumps({"table": table_json, "scale_mode": scale_mode, "grad": grad})
    return torch.tensor(list(spec.encode()), dtype=torch.uint8)


def _check_slot(table: Table, op: str, who: str) -> Table:
    """A named drop-in computes its own function: a table of another op in its slot (a LUTSiLU
    state loaded into a LUTGELU) would silently compute that op instead."""
    if table.op != op:
        raise ValueError(f"{who} takes a table of op {op!r}, got one of {table.op!r}: use LUTActivation(table) "
                         "for a table of another function")
    return table


def activation_class(op: str) -> type:
    """The drop-in class of an activation record of ops/registry.py."""
    rec = registry.torch_op(op)

    def __init__(self, table: Table | str | None = None, **kw: Any) -> None:
        LUTActivation.__init__(self, _check_slot(as_table(table, rec.tables[0]), rec.tables[0], rec.drop_in), **kw)

    return type(rec.drop_in, (LUTActivation,), {
        "__init__": __init__, "op": rec.tables[0], "__module__": __name__,
        "__doc__": f"Drop-in for nn.{rec.doc}: the {rec.tables[0]} table (shipped default unless given)."})


LUTGELU = activation_class("gelu")
LUTGELUTanh = activation_class("gelu_tanh")
LUTSiLU = activation_class("swish")
LUTHardswish = activation_class("hswish")
LUTSigmoid = activation_class("sigmoid")
LUTTanh = activation_class("tanh")
LUTHardsigmoid = activation_class("hsigmoid")
LUTSoftplus = activation_class("softplus")


class RangeReducedLUT(nn.Module):
    """rsqrt or reciprocal of any positive value through a table fitted on one octave range.

    rsqrt: v = m * 4^k with m in [1, 4), rsqrt(v) = rsqrt(m) * 2^-k.
    reciprocal: v = m * 2^k with m in [1, 2), 1/v = (1/m) * 2^-k.
    k comes from the float exponent (a leading-zero count in integer hardware); the 2^-k is
    exact (`octave`). Values <= 0 are clamped to the smallest positive normal float first, +inf
    to the largest; NaN propagates (NaN in, NaN out, as torch.rsqrt and 1/x do), with gradient 0.
    """

    def __init__(self, op: str, table: Table | str | None = None, grad: str = "exact"):
        super().__init__()
        if op not in ("rsqrt", "reciprocal"):
            raise ValueError(f"op {op!r} has no range reduction: use rsqrt or reciprocal")
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
        k = torch.floor(E / 2) if self.op == "rsqrt" else E
        # multiplications by exact powers of two (not torch.ldexp, whose gradient to its input is 0)
        m = vf * torch.exp2(-(2 * k if self.op == "rsqrt" else k))
        y = (self.lut(m) * torch.exp2(-k)).to(v.dtype)
        return torch.where(torch.isnan(v), v.detach(), y)

    def fusable(self) -> bool:
        """Whether one-pass kernels compute what the torch ops of `forward` do: a fixed scale,
        the table's own derivative or the slope, not probing or observing (here and in the
        norms' kernels, ops/triton_norm.py)."""
        lut = self.lut
        return (not lut.bypass and not lut.observing and lut.scale_mode == "fixed"
                and (lut.grad == "slope" or lut.derivative == self.op))

    def _fused(self, v: torch.Tensor) -> Optional[torch.Tensor]:
        """One pass where it computes exactly what the torch ops of `forward` do (eager and
        `fusable`): Triton on CUDA (with its own backward), compiled C on the CPU for float32
        without autograd. None elsewhere: the torch ops run."""
        lut = self.lut
        if tracing() or not self.fusable():
            return None
        qmin, qmax = int_range(lut.table.input_bits)
        rsqrt = self.op == "rsqrt"
        grad = torch.is_grad_enabled() and v.requires_grad
        if not v.is_cuda:
            if grad:
                return None
            from ops import cpu_kernel
            return cpu_kernel.range_reduced_cpu(v, lut.table_real, int(lut.scale_index), int(lut.d_current), qmin,
                                                qmax, rsqrt)
        from ops import triton_lut
        if not triton_lut.usable(v):
            return None
        if grad:
            return _RangeReducedFunction.apply(v, lut.table_real, lut.slopes_real, lut.breakpoints, lut.scale_index,
                                               lut.d_current, qmin, qmax, rsqrt, lut.grad == "slope")
        return triton_lut.range_reduced_forward(v, lut.table_real, lut.scale_index, lut.d_current, qmin, qmax, rsqrt)


class _RangeReducedFunction(torch.autograd.Function):
    """RangeReducedLUT on CUDA as one kernel each way; the backward is the straight-through
    gradient autograd takes through the torch ops (the table's derivative at the mantissa,
    times the exact powers of two, 0 where nan_to_num or the clamp cut the input)."""

    @staticmethod
    def forward(ctx, v, table_real, slopes_real, breakpoints, scale_index, d, qmin, qmax, rsqrt, slope):
        from ops import triton_lut
        ctx.save_for_backward(v, slopes_real, breakpoints, scale_index, d)
        ctx.args = (qmin, qmax, rsqrt, slope)
        return triton_lut.range_reduced_forward(v, table_real, scale_index, d, qmin, qmax, rsqrt)

    @staticmethod
    def backward(ctx, grad):
        from ops import triton_lut
        v, slopes_real, breakpoints, scale_index, d = ctx.saved_tensors
        gv = triton_lut.range_reduced_backward(grad, v, slopes_real, breakpoints, scale_index, d, *ctx.args)
        return (gv,) + (None,) * 9


def octave(v: torch.Tensor) -> torch.Tensor:
    """E with v = (1.x) * 2^E, as a float, for positive normal v: floor(log2 v) corrected by one
    where log2 rounds across a power of two. Exactly frexp's exponent - 1, written in ops that
    torch.export and ONNX have (frexp has no ONNX function)."""
    e = torch.floor(torch.log2(v))
    m = v * torch.exp2(-e)
    return e + (m >= 2).to(e.dtype) - (m < 1).to(e.dtype)


def device_of(model: nn.Module) -> torch.device:
    """Where a model lives: its first parameter's (or buffer's) device, the CPU for an empty one."""
    anchor = next(model.parameters(), None)
    if anchor is None:
        anchor = next(model.buffers(), None)
    return anchor.device if anchor is not None else torch.device("cpu")


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
    new.load_state_dict(old.state_dict(), strict=False)
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

    weight_offset = 0.0  # Gemma-style norms scale by (1 + weight): ops.adapters sets 1

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
# F.rms_norm and F.group_norm (ops/call_sites.py): statistics in float32 (float64 stays), the
# 1/sqrt through the range-reduced rsqrt table, the result in the input's dtype.

def _norm_kernels_serve(x: torch.Tensor, groups: int, size: int, rsqrt: RangeReducedLUT) -> bool:
    """Whether ops.triton_norm computes what the torch ops below do for this (eager CUDA) call."""
    from ops import triton_norm
    return triton_norm.usable(x, groups, size) and rsqrt.fusable()


def layer_norm(x: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float, rsqrt: RangeReducedLUT) -> torch.Tensor:
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    if x.is_cuda and not tracing():  # one Triton pass each way (ops/triton_norm.py)
        size = math.prod(x.shape[d] for d in dims)
        if _norm_kernels_serve(x, 1, size, rsqrt):
            from ops import triton_norm
            return triton_norm.layer_norm(x, size, weight, bias, eps, rsqrt)
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
    if x.dim() == 2 and x.is_cuda and not tracing() and _norm_kernels_serve(x, num_groups, c, rsqrt):
        from ops import triton_norm
        return triton_norm.group_norm_2d(x, num_groups, weight, bias, eps, rsqrt)
    dt = compute_dtype(x)
    stats = None
    if x.dim() > 2 and not tracing() and not (torch.is_grad_enabled() and x.requires_grad):
        # images (N, C, H, W) in inference: one compiled pass per statistic in x's layout (2-D
        # inputs, a RetNet's per-head norm, keep the torch ops: fast there, and their bits)
        from ops import cpu_kernel
        stats = cpu_kernel.group_stats_cpu(x, num_groups)
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

"""PyTorch drop-in modules whose non-linearity runs through an integer table, bit-exactly.

Forward is fake-quant: the input is quantized to `input_bits` at a power-of-two scale 2^-d,
the table is evaluated on the integer code exactly as docs/lut-format.md says, and the integer
output is turned back into a real number. Backward is straight-through (see ops.kernels.autograd.lut_lookup).

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
import threading
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from gqa_lut.evaluator import covering_scale
from gqa_lut.quantization import int_range
from gqa_lut.table import Table, table_from_json
from ops import registry
from ops.kernels.autograd import lut_apply, lut_channels
from ops.kernels.derivatives import CLOSED_FORM, derivative_of
from ops.kernels.reference import dequantized, expand, require_float
from ops.nn import sync
from ops.nn.fake_quant import tqt_quantize
from ops.tables import as_table

SCALE_MODES = ("fixed", "calibrate", "learned")
_EXACT = threading.local()  # how deep this thread is in a drop-in's exact function


def running_exact() -> bool:
    """Whether this thread is inside a drop-in's exact function (its calls are not call sites)."""
    return getattr(_EXACT, "depth", 0) > 0
GRAD_MODES = ("exact", "slope")


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
        # per-channel scales (empty: one scale for the tensor): the index into table.scales of
        # each feature of the last dim, set by `calibrate(..., scales="channel")`
        self.register_buffer("channel_index", torch.zeros(0, dtype=torch.int64))
        # set by calibrate where the inputs reach fewer than 8 codes at the table's finest scale (a
        # logit soft-cap's tanh(x / 30)): the exact function runs instead, and the report says so
        self.register_buffer("exact_fallback", torch.zeros((), dtype=torch.bool))
        self._exact = False
        self.observing = False
        self.bypass = False
        self.per_channel = False  # calibrate sets it: observe the last dim's features one by one
        self._channel_list: list[int] = []
        self._channels_differ = False
        self._channel_amax: Optional[torch.Tensor] = None
        self._channels_ok = True
        self.collect_samples = 0  # calibrate(fit=True): keep up to this many inputs per batch
        self._samples: list[torch.Tensor] = []
        if scale_mode == "learned":
            # one element, not a scalar: FSDP2 shards no 0-d parameter (forward reads it as 0-d)
            self.log2_threshold = nn.Parameter(torch.tensor([float(table.input_bits - 1 - scale)]))

    def __setstate__(self, state: dict) -> None:
        """A whole module pickled (torch.save(model)) before per-feature scales and per-site fits
        existed has none of their state: it gets a fresh module's (one scale for the tensor), so it
        runs as it did when it was saved."""
        super().__setstate__(state)
        buf = self._buffers
        if "channel_index" not in buf:
            buf["channel_index"] = torch.zeros(0, dtype=torch.int64, device=buf["table_real"].device)
        fresh = {"per_channel": False, "_channel_amax": None, "_channels_ok": True, "collect_samples": 0}
        for name, value in fresh.items():
            self.__dict__.setdefault(name, value)
        self.__dict__.setdefault("_samples", [])
        if "exact_fallback" not in buf:
            buf["exact_fallback"] = torch.zeros((), dtype=torch.bool, device=buf["table_real"].device)
        self.__dict__.setdefault("_exact", False)
        if "_channel_list" not in self.__dict__:
            self._channel_list = buf["channel_index"].tolist()
            self._channels_differ = len(set(self._channel_list)) > 1

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
        self._register_spec()
        self._register_derivative()

    def _register_spec(self) -> None:
        """The table and its modes as a saved uint8 buffer (tensor-only state that a
        torch.distributed checkpoint can name: every state-dict key is a module attribute)."""
        dev = self.table_real.device
        self.register_buffer("table_spec", _spec_tensor(self.table.to_json(), self.scale_mode, self.grad).to(dev))

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves the tables; `.half()`, `.bfloat16()` or `.double()` must not round
        them (LUTGELU().bfloat16().float() changed 502 of 2001 outputs): the derived buffers
        keep their dtypes, rebuilt from the integer table where a cast touched them."""
        was_meta = self._buffers["table_real"].is_meta
        out = super()._apply(fn, recurse)
        buf = self._buffers
        if was_meta and not buf["table_real"].is_meta:
            self._materialise()
        elif any(buf[k].dtype != dt for k, dt in REAL_TABLE_DTYPES.items()):
            dev = buf["table_real"].device
            buf.update({k: t.to(dev) for k, t in _real_tables(self.table).items()})
        return out

    def _materialise(self) -> None:
        """After `to_empty` from the meta device every tensor is uninitialised memory: the
        derived tables come again from the table, the scale (and a learned threshold) from the
        one this module holds; a checkpoint loaded next overwrites the saved ones as usual."""
        channels = self._channel_list
        self._set_table(self.table)
        self.set_scale(self._scale_d)
        self.amax.zero_()
        self.exact_fallback.fill_(self._exact)
        self._set_channels(channels)
        if self.scale_mode == "learned":
            with torch.no_grad():
                self.log2_threshold.fill_(float(self.table.input_bits - 1 - self._scale_d))

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
    _OWN_KEYS = ("scale_index", "log2_threshold", "table_spec", "channel_index", "exact_fallback")
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
            self._register_spec()
        channels = state_dict.get(prefix + "channel_index")
        if channels is not None:
            if channels.dim() != 1 or (channels.numel() and not (0 <= int(channels.min()) and
                                                               int(channels.max()) < scales)):
                raise ValueError(f"{prefix}channel_index: indices into the table's {scales} scales "
                                 f"(0 to {scales - 1}) along one dim are allowed, got shape {tuple(channels.shape)}")
            self._buffers["channel_index"] = torch.zeros_like(channels, device=self.table_real.device)
        threshold = state_dict.get(prefix + "log2_threshold")
        if threshold is not None and threshold.dim() == 0:  # saved before it had one element
            state_dict[prefix + "log2_threshold"] = threshold.reshape(1)
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # a float checkpoint has none of these: the module keeps its table and scale
        mine = {prefix + k for k in self._OWN_KEYS}
        missing_keys[before:] = [k for k in missing_keys[before:] if k not in mine]
        self.d_current.fill_(int(self.scales[self.scale_index]))
        self._scale_d = int(self.d_current)
        self._channel_list = self.channel_index.tolist()
        self._channels_differ = len(set(self._channel_list)) > 1
        self._exact = bool(self.exact_fallback)

    def set_exact_fallback(self, on: bool) -> None:
        self.exact_fallback.fill_(on)
        self._exact = on

    @property
    def scale(self) -> int:
        return int(self.scales[self.scale_index])

    def set_scale(self, d: int) -> None:
        if d not in self.table.scales:
            raise ValueError(f"scale {d} is not in the table: it has scales {self.table.scales}")
        self.scale_index.fill_(self.table.scales.index(d))
        self.d_current.fill_(d)  # kept beside the index so a fixed-scale call launches no lookup of it
        self._scale_d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        require_float(x, type(self).__name__)
        if self.observing:
            finite = torch.nan_to_num(x.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
            seen = finite.abs()
            self.amax = torch.maximum(self.amax, seen.max())
            if self.per_channel:
                self._observe_channels(seen)
            if self.collect_samples:
                self._samples.append(_spread_sample(finite, self.collect_samples))
        if self.bypass or self._exact:  # the probe of ops.replace (the exact function, before any
            return self._exact_fn(x)  # quantization, a learned scale's included), or a site below its resolution
        buf = self._buffers
        channels = buf["channel_index"]
        if self._channels_differ and x.dim() and x.shape[-1] == channels.numel():
            table = buf["table_real64"] if x.dtype == torch.float64 else buf["table_real"]
            return lut_channels(x, table, channels, buf["scales"].index_select(0, channels), self.table.input_bits,
                                self.derivative)
        if self.scale_mode == "learned":
            xq, d = tqt_quantize(x, self.log2_threshold.reshape(()), self.table.input_bits,
                                 min(self.table.scales), max(self.table.scales))
            index = (d.long() - self.scales[0]).clamp(0, len(self.table.scales) - 1)
            return self._lut(xq, index, self.scales[index])
        return self._lut(x, buf["scale_index"], buf["d_current"])

    def _exact_fn(self, x: torch.Tensor) -> torch.Tensor:
        """The exact function, passed over by the call-site router (`running_exact`): a swapped
        module runs under its mode, and its F.gelu would otherwise become a call site of the
        module around it. Other modes (a user's profiler) still see the call."""
        _EXACT.depth = getattr(_EXACT, "depth", 0) + 1
        try:
            return self.fn(x)
        finally:
            _EXACT.depth -= 1

    def _lut(self, x: torch.Tensor, index: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if self.bypass:  # the probe of ops.replace: the drop-in's own arithmetic with exact functions
            return self._exact_fn(x)
        buf = self._buffers  # not self.<buffer>: nn.Module's __getattr__ costs host time on every call
        table = buf["table_real64"] if x.dtype == torch.float64 else buf["table_real"]
        return lut_apply(x, table, buf["slopes_real"], buf["breakpoints"], index, d, self.table.input_bits,
                         self.derivative if self.grad == "exact" else "")

    def start_observing(self) -> None:
        """Record the largest finite |input| of the next forward passes (ops.replace.observe),
        and with `per_channel` that of each feature of the last dim."""
        self.amax.zero_()
        self._channel_amax, self._channels_ok = None, True
        self.observing = True

    def _observe_channels(self, seen: torch.Tensor) -> None:
        """Per-feature maxima of 2-D (batch, features) and 3-D (batch, tokens, features) inputs,
        where the last dim is a linear layer's output features: the requantization before the
        table is per output channel anyway, so each feature can have its own power-of-two scale.
        Other ranks (images: NCHW) or a feature count that changes between calls: one scale."""
        if seen.dim() not in (2, 3) or (self._channel_amax is not None
                                        and self._channel_amax.numel() != seen.shape[-1]):
            self._channels_ok = False
            return
        cm = seen.reshape(-1, seen.shape[-1]).amax(0) if seen.numel() else None
        if cm is not None:
            self._channel_amax = cm if self._channel_amax is None else torch.maximum(self._channel_amax, cm)

    def sync_observations(self) -> None:
        """The largest |input| over every rank (torch.distributed), so all choose one scale."""
        sync.all_max_(self.amax)
        if self.per_channel:
            self._channels_ok = not sync.any_rank([not self._channels_ok])[0]
            cm = self._channel_amax if self._channel_amax is not None else torch.zeros((), device=self.amax.device)
            cm = sync.all_max_shape(cm, 0.0)
            self._channel_amax = cm if cm.dim() else None

    def take_samples(self) -> Optional[torch.Tensor]:
        """The inputs kept while observing (every rank's, under torch.distributed), then forgotten."""
        mine = torch.cat(self._samples)[:, None] if self._samples else None
        self._samples = []
        rows = sync.all_gather_rows(mine, 1)
        return None if rows is None else rows[:, 0]

    def scales_in_use(self) -> list[int]:
        """The scales this module's inputs are quantized at: its features' and the tensor's."""
        return sorted(set(self.channel_scales()) | {self.scale})

    def adopt_table(self, table: Table) -> None:
        """Another table of the same function in place of this one (a per-site fit), keeping the
        tensor's and the features' scales: each must be one of the new table's scales."""
        channels, d = self.channel_scales(), self.scale
        missing = sorted(set(channels + [d]) - set(table.scales))
        if missing:
            raise ValueError(f"the new table has scales {table.scales}, not the scales {missing} in use")
        if self.op is not None:
            _check_slot(table, self.op, type(self).__name__)
        self._set_table(table)
        self.set_scale(d)
        self._set_channels([table.scales.index(c) for c in channels])
        if self.scale_mode == "learned":
            with torch.no_grad():
                self.log2_threshold.fill_(float(table.input_bits - 1 - d))

    def _set_channels(self, index: list[int]) -> None:
        """The per-feature scale indices (kept whole even where all are equal, so that a state dict
        has the same shapes on every rank and in every calibrated copy: torch.distributed.checkpoint
        loads in place); the per-feature path runs only where they differ."""
        self._buffers["channel_index"] = torch.tensor(index, dtype=torch.int64, device=self.table_real.device)
        self._channel_list = list(index)
        self._channels_differ = len(set(index)) > 1

    def channel_scales(self) -> list[int]:
        """Each feature's scale d (empty where the module has one scale for the tensor)."""
        return [self.table.scales[i] for i in self.channel_index.tolist()]

    def finish_observing(self) -> int:
        """The finest scale that holds what was observed; returns it. With `per_channel`, also
        each feature's finest scale where 2-D/3-D inputs let it differ (the rest of the time the
        tensor's scale)."""
        self.observing = False
        d = covering_scale(self.table, float(self.amax))
        self.set_scale(d)
        index: list[int] = []
        if (self.per_channel and self._channels_ok and self._channel_amax is not None
                and self.scale_mode != "learned" and self.grad == "exact" and self.derivative):
            scales = torch.tensor(self.table.scales, dtype=torch.float64)
            _, qmax = int_range(self.table.input_bits)
            fits = self._channel_amax.double().cpu()[:, None] * torch.exp2(scales)[None, :] <= qmax + 0.5
            # the finest fitting scale, else the coarsest (covering_scale, one feature at a time)
            finest = torch.where(fits, scales[None, :], scales.min() - 1).amax(1)
            finest = torch.where(finest < scales.min(), scales.min(), finest)
            index = [self.table.scales.index(int(v)) for v in finest.tolist()]
        self._set_channels(index)
        self._channel_amax = None
        if self.scale_mode == "learned":
            with torch.no_grad():
                self.log2_threshold.fill_(float(self.table.input_bits - 1 - d))
        return d

    def extra_repr(self) -> str:
        return (f"op={self.table.op}, segments={self.table.segments}, bits={self.table.param_bits}/"
                f"{self.table.input_bits}, scale={self.scale}, scale_mode={self.scale_mode}, grad={self.grad}"
                + (f", channel scales {sorted(set(self.channel_scales()))}" if self._channels_differ else ""))


    @classmethod
    def from_float(cls, module: nn.Module, tables: dict[str, Table], **kw: Any) -> "LUTActivation":
        """The drop-in for a float activation module (replace_ops), with its table from `tables`."""
        return cls(tables.get(cls.op), **kw)


REAL_TABLE_DTYPES = {"table_real": torch.float32, "table_real64": torch.float64, "slopes_real": torch.float32}


def _spread_sample(x: torch.Tensor, count: int) -> torch.Tensor:
    """About `count` of x's elements, every k-th in memory order with k coprime to the last dim:
    a stride that divides the feature count (24 of SmolLM2's 1536) would sample a few features
    only, and a per-site fit would see their distribution, not the site's."""
    flat = x.reshape(-1)
    k = max(1, flat.numel() // count)
    last = x.shape[-1] if x.dim() else 1
    while k > 1 and math.gcd(k, last) != 1:
        k += 1
    return flat[::k].cpu()


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


def device_of(model: nn.Module) -> torch.device:
    """Where a model lives: its first parameter's (or buffer's) device, the CPU for an empty one."""
    anchor = next(model.parameters(), None)
    if anchor is None:
        anchor = next(model.buffers(), None)
    return anchor.device if anchor is not None else torch.device("cpu")

"""The RetNet's quantization points and its decay, as small modules that start switched off.

ActQuant: by default per-tensor INT8 activations with a power-of-two scale and a learnable log2
threshold (TQT, Jain et al. 2020). Power-of-two scales are what an integer pipeline applies
with shifts, and what our LUT inputs use, so requantizing between a matmul and a table is a
shift. A `QuantSpec` (quantizers.py) swaps in PACT, LSQ, min-max or percentile scales, per
tensor or per channel, at 2 to 16 bits: the study's comparison.
QuantLinear: nn.Linear with INT8 weights per output channel (symmetric, max-abs scale; LSQ
or per tensor by spec) and an ActQuant on its input.
Decay: the per-head retention decay; in LUT mode gamma_h comes from the decay table.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gqa_lut.quantization import int_range
from ops.nn import sync
from ops.nn.fake_quant import tqt_quantize, weight_fake_quant
from retnet_integration.quantizers import (PERCENTILE, QuantSpec, fake_quant, lsq, pact, tqt, weight_amax,
                                             weight_quant)


class ActQuant(nn.Module):
    """An activation quantizer, off until calibrated. Without a spec (or with the default
    one: TQT per tensor) it runs the fused TQT kernels of ops/nn/fake_quant.py; a `QuantSpec`
    picks another method or per-channel scales (retnet_integration/quantizers.py), whose
    learned parameter (`qparam`) is created at calibration, so float checkpoints load."""

    def __init__(self, bits: int = 8):
        super().__init__()
        self.bits = bits
        self.observing = False
        self.spec: Optional[QuantSpec] = None
        # one element, not a scalar: FSDP2 shards no 0-d parameter (forward reads it as 0-d)
        self.log2_threshold = nn.Parameter(torch.zeros(1))
        self.enabled = False
        self.register_buffer("amax", torch.zeros(()), persistent=False)
        self.register_buffer("scale", torch.ones(()))  # min-max and percentile: saved with the model
        self._abs_sum, self._count, self._samples = 0.0, 0, []

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, on: bool) -> None:
        """The TQT threshold trains only while it is the quantizer in use: DDP refuses a
        parameter that gets no gradient (a switched-off quantizer's, or one another method replaces)."""
        self._enabled = bool(on)
        self.log2_threshold.requires_grad_(self._enabled and self._fused())

    def _fused(self) -> bool:
        return self.spec is None or (self.spec.act_method == "tqt" and self.spec.act_granularity == "tensor")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x.detach())
        if not self.enabled:
            return x
        if self._fused():
            xq, _ = tqt_quantize(x, self.log2_threshold.reshape(()), self.bits, -40, 40)
            return xq
        method = self.spec.act_method
        if method == "tqt":
            return tqt(x, self.qparam, self.bits)
        if method == "pact":
            return pact(x, self.qparam, self.bits)
        if method == "lsq":
            # LSQ's gradient scale counts the elements per step over the whole (data-parallel) batch
            n = x.numel() // (self.qparam.numel() or 1) * sync.world_size()
            return lsq(x, self.qparam, self.bits, n)
        return fake_quant(x, self.scale.to(x.dtype), self.bits)  # minmax, percentile

    def _channel(self) -> bool:
        return self.spec is not None and self.spec.act_granularity == "channel"

    def _observe(self, x: torch.Tensor) -> None:
        a = x.abs().float()
        flat = a.reshape(-1, a.shape[-1]) if self._channel() else a.reshape(-1, 1)
        m = flat.amax(0) if self._channel() else flat.max().reshape(())
        self.amax = torch.maximum(self.amax, m) if self.amax.shape == m.shape else m
        self._abs_sum += float(a.sum())
        self._count += a.numel()
        if self.spec is not None and self.spec.act_method == "percentile":
            step = max(1, flat.shape[0] // (1 << 16))
            self._samples.append(flat[::step].cpu())

    def start_observing(self) -> None:
        self.amax = torch.zeros((), device=self.amax.device)
        self._abs_sum, self._count, self._samples = 0.0, 0, []
        self.observing = True

    def sync_observations(self) -> None:
        """What every rank observed, combined (torch.distributed): the max (per channel too, also
        where a rank saw nothing), the mean's sums, the percentile's samples in rank order."""
        if sync.world_size() <= 1:
            return
        self.amax = sync.all_max_shape(self.amax, 0.0)
        self._abs_sum, self._count = sync.all_sum([self._abs_sum, float(self._count)])
        if self.spec is not None and self.spec.act_method == "percentile":
            width = self.amax.numel() if self._channel() else 1
            rows = sync.all_gather_rows(torch.cat(self._samples) if self._samples else None, width)
            self._samples = [rows] if rows is not None else []

    def finish_observing(self) -> None:
        """Each method's starting point from what was observed, then quantize."""
        self.observing = False
        self.enabled = True
        amax = self.amax.clamp_min(1e-8)
        _, qmax = int_range(self.bits)
        with torch.no_grad():
            if self._fused():
                self.log2_threshold.fill_(math.log2(float(amax.max())))
                return
            method = self.spec.act_method
            if method == "tqt":
                init = torch.log2(amax)
            elif method == "pact":
                init = amax.clone()
            elif method == "lsq":  # LSQ's initial step, 2 mean|x| / sqrt(qmax), per tensor
                mean = self._abs_sum / max(self._count, 1)
                init = torch.full_like(amax, max(2 * mean / math.sqrt(qmax), 1e-8))
            else:
                if method == "percentile":
                    flat = torch.cat(self._samples).to(amax.device)
                    top = torch.quantile(flat[:, 0] if flat.shape[1] == 1 and not self._channel() else flat,
                                         PERCENTILE / 100, dim=0)
                    amax = top.reshape(amax.shape).clamp_min(1e-8)
                self.scale = (amax / qmax).to(self.scale.dtype)
                self._samples = []
                return
        self.qparam = nn.Parameter(init.reshape(-1).to(self.log2_threshold.dtype))  # >= 1-d, for FSDP2
        self._samples = []

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        threshold = state_dict.get(prefix + "log2_threshold")
        if threshold is not None and threshold.dim() == 0:  # saved before it had one element
            state_dict[prefix + "log2_threshold"] = threshold.reshape(1)
        scale = state_dict.get(prefix + "scale")
        if scale is not None and scale.shape != self.scale.shape:  # a per-channel scale: take its shape
            self.scale = torch.empty_like(scale, device=self.scale.device)
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # checkpoints from before the scale was saved (float ones) keep the module's own
        missing_keys[before:] = [k for k in missing_keys[before:] if k != prefix + "scale"]

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}, spec={None if self.spec is None else self.spec.label}"


class QuantLinear(nn.Linear):
    def __init__(self, *args, weight_bits: int = 8, **kw):
        super().__init__(*args, **kw)
        self.weight_bits = weight_bits
        self.quantize_weight = False
        self.weight_spec: Optional[QuantSpec] = None
        self.input_quant = ActQuant()

    def set_weight_spec(self, spec: Optional[QuantSpec]) -> None:
        """The default spec (max-abs per output channel) keeps the fused kernel; LSQ gets its
        learned step here, initialised at max |w| / qmax."""
        self.weight_spec = None if spec is None or (spec.weight_method, spec.weight_granularity) == (
            "minmax", "channel") else spec
        self.weight_bits = spec.weight_bits if spec is not None else self.weight_bits
        if self.weight_spec is not None and spec.weight_method == "lsq":
            _, qmax = int_range(spec.weight_bits)
            step = (weight_amax(self.weight, spec) / qmax).clamp_min(1e-8)
            self.weight_step = nn.Parameter(step.reshape(-1) if step.dim() == 0 else step)  # >= 1-d, for FSDP2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize_weight:
            w = self.weight
        elif self.weight_spec is None:
            w = weight_fake_quant(self.weight, self.weight_bits)
        else:
            w = weight_quant(self.weight, self.weight_spec, getattr(self, "weight_step", None))
        return F.linear(self.input_quant(x), w, self.bias)


class Decay(nn.Module):
    """gamma_h = 1 - 2^(-5-h) per head; `log_gamma()` is what retention uses in every form.

    With a decay table set (`use_table`), gamma_h is the table's integer output at
    x = -ln(gamma_h), quantized at the finest table scale that holds it (8-bit input codes of
    64..127), so every form (parallel mask gamma^(n-m), chunk decays, recurrent state decay)
    uses the same quantized gamma and the forms stay identical to each other.
    """

    def __init__(self, n_heads: int):
        super().__init__()
        gamma = 1.0 - 2.0 ** (-5.0 - torch.arange(n_heads, dtype=torch.float64))
        self.register_buffer("log_gamma_float", torch.log(gamma), persistent=False)
        self.register_buffer("log_gamma_table", torch.log(gamma), persistent=False)
        self.table_name: Optional[str] = None

    def use_table(self, table) -> None:
        from gqa_lut.evaluator import evaluate
        from ops.nn import covering_scale
        import numpy as np

        lam = (-self.log_gamma_float).cpu().numpy()
        vals = []
        for x in lam:
            d = covering_scale(table, float(x))
            code = int(np.clip(np.rint(x * 2.0 ** d), -(2 ** (table.input_bits - 1)), 2 ** (table.input_bits - 1) - 1))
            vals.append(float(evaluate(table, np.array([code]), d)[0]))
        g = torch.tensor(vals, dtype=torch.float64, device=self.log_gamma_float.device)
        if not torch.all((g > 0) & (g <= 1)):
            raise ValueError(f"decay table gives gamma {vals}: not in (0, 1]")
        self.log_gamma_table = torch.log(g)
        self.table_name = table.op

    def use_float(self) -> None:
        self.log_gamma_table = self.log_gamma_float.clone()
        self.table_name = None

    def log_gamma(self) -> torch.Tensor:
        return self.log_gamma_table if self.table_name else self.log_gamma_float

    def extra_repr(self) -> str:
        return f"heads={self.log_gamma_float.numel()}, table={self.table_name}"

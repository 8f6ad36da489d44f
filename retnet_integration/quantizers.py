"""The fake quantizers the RetNet study compares, as functions, and the spec that picks one.

Activations (signed, `bits`-bit, symmetric):
  tqt         power-of-two scale from a learned log2 threshold (Jain et al. 2020): what an
              integer pipeline applies with a shift
  pact        a learned clip alpha, scale alpha / qmax (Choi et al. 2018): the clip learns
              from the clipped values' gradient
  lsq         a learned step (Esser et al. 2020) with LSQ's gradient scale 1/sqrt(n qmax)
  minmax      a fixed scale, max |x| / qmax over the calibration data
  percentile  a fixed scale, the 99.99th percentile of |x| / qmax (a few outliers clip)
Weights: `minmax` (max |w| / qmax) or `lsq` (learned step, initialised at max |w| / qmax);
per output channel or per tensor. Rounding is straight-through everywhere; activations may be
per tensor or per channel (the last dimension).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gqa_lut.errors import UsageError
from gqa_lut.quantization import int_range

ACT_METHODS = ("tqt", "pact", "lsq", "minmax", "percentile")
WEIGHT_METHODS = ("minmax", "lsq")
GRANULARITIES = ("tensor", "channel")
PERCENTILE = 99.99


@dataclass(frozen=True)
class QuantSpec:
    """What `quantize_` puts at every quantization point: the choice, not a code edit."""
    act_method: str = "tqt"
    act_bits: int = 8
    act_granularity: str = "tensor"
    weight_method: str = "minmax"
    weight_bits: int = 8
    weight_granularity: str = "channel"

    def __post_init__(self) -> None:
        for name, value, allowed in (("activation method", self.act_method, ACT_METHODS),
                                     ("weight method", self.weight_method, WEIGHT_METHODS),
                                     ("activation granularity", self.act_granularity, GRANULARITIES),
                                     ("weight granularity", self.weight_granularity, GRANULARITIES)):
            if value not in allowed:
                raise UsageError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        for name, bits in (("activation bits", self.act_bits), ("weight bits", self.weight_bits)):
            if not isinstance(bits, int) or not 2 <= bits <= 16:
                raise UsageError(f"{name} {bits!r} is not allowed: use an integer from 2 to 16")

    @property
    def label(self) -> str:
        a = "" if self.act_granularity == "tensor" else "/ch"
        w = "" if self.weight_granularity == "channel" else "/t"
        return f"{self.act_method}{a} w{self.weight_bits}{w}{'' if self.weight_method == 'minmax' else '-lsq'}a{self.act_bits}"


def parse_spec(text: str) -> QuantSpec:
    """'METHOD[:wWaA][:channel][:wlsq][:wtensor]', e.g. 'lsq:w4a8', 'pact:w8a6:channel'."""
    parts = [p for p in text.split(":") if p]
    if not parts:
        raise UsageError("quantizer '' is empty: use METHOD[:wWaA][:channel][:wlsq][:wtensor], "
                         f"METHOD one of {', '.join(ACT_METHODS)}")
    kw: dict = {"act_method": parts[0]}
    for p in parts[1:]:
        if p == "channel":
            kw["act_granularity"] = "channel"
        elif p == "wlsq":
            kw["weight_method"] = "lsq"
        elif p == "wtensor":
            kw["weight_granularity"] = "tensor"
        elif p.startswith("w") and "a" in p:
            w, a = p[1:].split("a", 1)
            try:
                kw["weight_bits"], kw["act_bits"] = int(w), int(a)
            except ValueError:
                raise UsageError(f"bit widths {p!r} in quantizer {text!r} are not wWaA with integers") from None
        else:
            raise UsageError(f"quantizer option {p!r} in {text!r} is not wWaA, channel, wlsq or wtensor")
    return QuantSpec(**kw)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def ceil_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.ceil(x) - x).detach()


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """clamp(round(x / s)) * s with straight-through rounding; the gradient reaches `scale`
    as LSQ's does (round(v) - v inside the range, the bound outside)."""
    lo, hi = int_range(bits)
    return torch.clamp(round_ste(x / scale), lo, hi) * scale


def tqt(x: torch.Tensor, log2_t: torch.Tensor, bits: int) -> torch.Tensor:
    """TQT with a threshold per tensor or per channel: s = 2^(ceil(log2 t) - (bits - 1)),
    ceil straight-through, so d loss / d log2 t = (d loss / d s) s ln 2, TQT's gradient."""
    s = torch.exp2(ceil_ste(log2_t) - (bits - 1))
    return fake_quant(x, s.to(x.dtype), bits)


def pact(x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """Clip to [-alpha, alpha] (alpha learns from the clipped values), then round at
    alpha / qmax with the scale held constant in the backward pass, as PACT does."""
    _, hi = int_range(bits)
    a = alpha.to(x.dtype).abs()
    y = torch.maximum(torch.minimum(x, a), -a)
    s = (a / hi).detach().clamp_min(1e-12)
    return y + (torch.round(y / s) * s - y).detach()


def lsq(x: torch.Tensor, step: torch.Tensor, bits: int, per_element: int) -> torch.Tensor:
    """LSQ: the step's gradient scaled by 1/sqrt(n qmax), n the elements per step."""
    _, hi = int_range(bits)
    g = 1.0 / math.sqrt(max(per_element, 1) * hi)
    s = step.abs().clamp_min(1e-12)
    s = s * g + (s - s * g).detach()
    return fake_quant(x, s.to(x.dtype), bits)


def weight_quant(w: torch.Tensor, spec: QuantSpec, step: torch.Tensor | None = None) -> torch.Tensor:
    """Weights (out, in): max-abs scale per output channel or tensor, or LSQ's learned step."""
    _, hi = int_range(spec.weight_bits)
    if spec.weight_method == "lsq" and step is not None:
        return lsq(w, step, spec.weight_bits, w.shape[1] if spec.weight_granularity == "channel" else w.numel())
    return fake_quant(w, (weight_amax(w, spec) / hi).clamp_min(1e-12), spec.weight_bits)


def weight_amax(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """max |w| per output channel (out, 1) or per tensor, as the spec's granularity says."""
    a = w.detach().abs()
    return a.amax(dim=1, keepdim=True) if spec.weight_granularity == "channel" else a.amax()

"""The RetNet's quantization points and its decay, as small modules that start switched off.

ActQuant: per-tensor INT8 activations with a power-of-two scale and a learnable log2 threshold
(TQT, Jain et al. 2020). Power-of-two scales are what an integer pipeline applies with shifts,
and what our LUT inputs use, so requantizing between a matmul and a table is a shift; TQT
learns that threshold in the log domain, where PACT would learn a real-valued clip that an
integer pipeline cannot apply for free.
QuantLinear: nn.Linear with INT8 weights per output channel (symmetric, max-abs scale) and an
ActQuant on its input.
Decay: the per-head retention decay; in LUT mode gamma_h comes from the decay table.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ops.fake_quant import tqt_quantize, weight_fake_quant


class ActQuant(nn.Module):
    def __init__(self, bits: int = 8):
        super().__init__()
        self.bits = bits
        self.enabled = False
        self.observing = False
        self.log2_threshold = nn.Parameter(torch.zeros(()))
        self.register_buffer("amax", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.amax = torch.maximum(self.amax, x.detach().abs().max().float())
        if not self.enabled:
            return x
        xq, _ = tqt_quantize(x, self.log2_threshold, self.bits, -40, 40)
        return xq

    def start_observing(self) -> None:
        self.amax.zero_()
        self.observing = True

    def finish_observing(self) -> None:
        """The threshold from the largest |input| observed (ops.replace.observe), and quantize."""
        self.observing = False
        self.enabled = True
        with torch.no_grad():
            self.log2_threshold.fill_(math.log2(max(float(self.amax), 1e-8)))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}"


class QuantLinear(nn.Linear):
    def __init__(self, *args, weight_bits: int = 8, **kw):
        super().__init__(*args, **kw)
        self.weight_bits = weight_bits
        self.quantize_weight = False
        self.input_quant = ActQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = weight_fake_quant(self.weight, self.weight_bits) if self.quantize_weight else self.weight
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
        from ops.modules import covering_scale
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

"""`quantize_(model, mode)`: one call switches a float RetNet to a quantized one, in place.

Modes: "float"; "w8" (INT8 weights per output channel); "w8a8" (plus INT8 activations per
tensor at every matmul input: every linear layer's input and q, k, v of both retention
matmuls, with TQT power-of-two thresholds calibrated on data); "w8a8+<op>[+<op>...]" (plus
LUT ops); "all-lut" (w8a8 with every LUT op).

The two retention accumulators, the decay-masked scores (parallel form) and the recurrent
state, are kept wide by default, as an INT8 accelerator keeps int32 accumulators:
`accumulator_bits` requantizes them too (power-of-two scale per tensor). They are the only
quantizers that differ between the forms (the scores exist only in the parallel form, the
state only in the recurrent one), so requantizing them makes the forms disagree; the eval
measures by how much (bench/results/retnet_*.json, "accumulator study"). LUT ops: gelu (FFN), swish (retention gate), groupnorm and
layernorm (their rsqrt), decay (gamma per head). The activation drop-ins are put in by
`ops.replace_ops`; the decay through `Decay.use_table`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn

from gqa_lut.errors import UsageError
from gqa_lut.table import load_table
from ops.replace import calibrate, observe, replace_ops
from retnet_integration.layers import ActQuant, Decay, QuantLinear

LUT_OPS = ("gelu", "swish", "groupnorm", "layernorm", "decay")
DECAY_TABLE = Path(__file__).resolve().parent / "tables" / "decay.json"


@dataclass(frozen=True)
class QuantMode:
    name: str
    weights: bool
    activations: bool
    lut_ops: tuple[str, ...]


def parse_mode(name: str) -> QuantMode:
    if name == "float":
        return QuantMode(name, False, False, ())
    if name == "w8":
        return QuantMode(name, True, False, ())
    if name == "all-lut":
        return QuantMode(name, True, True, LUT_OPS)
    parts = name.split("+")
    if parts[0] != "w8a8":
        raise UsageError(f"mode {name!r} is not allowed: use float, w8, w8a8, w8a8+OP[+OP...] or all-lut "
                         f"(OP one of {', '.join(LUT_OPS)})")
    for op in parts[1:]:
        if op not in LUT_OPS:
            raise UsageError(f"LUT op {op!r} in mode {name!r} is not one of {', '.join(LUT_OPS)}")
    return QuantMode(name, True, True, tuple(parts[1:]))


def calibration_forward(model: nn.Module, tokens: torch.Tensor) -> None:
    """Run every form, so that each quantizer sees its input: the masked scores live in the
    parallel form, the recurrent state only in the recurrent (and chunkwise) form."""
    model(tokens, "parallel")
    model(tokens, "recurrent")


def quantize_(model: nn.Module, mode: str | QuantMode, calib_batches: Iterable[torch.Tensor],
              forward: Callable[[nn.Module, torch.Tensor], object] | None = None,
              accumulator_bits: int | None = None) -> dict:
    """Switch `model` to `mode` in place, calibrating on `calib_batches` (token tensors)."""
    m = parse_mode(mode) if isinstance(mode, str) else mode
    batches = list(calib_batches)
    fwd = forward or calibration_forward
    swaps = []
    ops = [o for o in m.lut_ops if o != "decay"]  # ops/registry.py names; the decay is the model's own
    if ops:
        # module swaps only: the RetNet's own quantizers own every other call it makes
        swaps = [dict(vars(s)) for s in replace_ops(model, ops=ops, calls=False).swaps]
    if "decay" in m.lut_ops:
        table = load_table(DECAY_TABLE)
        for mod in model.modules():
            if isinstance(mod, Decay):
                mod.use_table(table)
        swaps.append({"name": "*.decay", "old": "Decay", "new": "Decay(table)", "table": table.op})
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.quantize_weight = m.weights
    acts = [mod for mod in model.modules() if isinstance(mod, ActQuant)]
    if m.activations:
        observe(model, batches, acts, fwd)
        for mod in model.modules():
            if hasattr(mod, "score_quant") and hasattr(mod, "state_quant"):
                for acc in (mod.score_quant, mod.state_quant):
                    acc.enabled = accumulator_bits is not None
                    acc.bits = accumulator_bits or acc.bits
    scales = calibrate(model, batches, fwd) if m.lut_ops else {}
    active = sum(a.enabled for a in acts)
    return {"mode": m.name, "swaps": swaps, "lut_scales": scales, "activation_quantizers": active,
            "accumulator_bits": accumulator_bits}

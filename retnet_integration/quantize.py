"""`quantize_(model, mode)`: one call switches a float RetNet to a quantized one, in place.

Modes: "float"; "w8" (INT8 weights per output channel); "w8a8" (plus INT8 activations per
tensor at every matmul input; any wWaA from 2 to 16 bits, e.g. "w4a8": every linear layer's input and q, k, v of both retention
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

import re
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch
import torch.nn as nn

from gqa_lut.errors import UsageError
from gqa_lut.table import load_table
from ops.convert.replace import calibrate, observe, replace_ops
from retnet_integration.integer.spec import DECAY_TABLE
from retnet_integration.layers import ActQuant, Decay, QuantLinear
from retnet_integration.model import MultiScaleRetention
from retnet_integration.quantizers import QuantSpec, parse_spec

LUT_OPS = ("gelu", "swish", "groupnorm", "layernorm", "decay")


@dataclass(frozen=True)
class QuantMode:
    name: str
    weights: bool
    activations: bool
    lut_ops: tuple[str, ...]
    weight_bits: int | None = None  # None: the QuantSpec's (8 by default)
    act_bits: int | None = None


_BITS = re.compile(r"w(\d+)(?:a(\d+))?")


def parse_mode(name: str) -> QuantMode:
    """float | wW | wWaA[+OP...] | all-lut | wWaA+all (W, A from 2 to 16; OP a LUT op)."""
    if name == "float":
        return QuantMode(name, False, False, ())
    if name == "all-lut":
        return QuantMode(name, True, True, LUT_OPS)
    parts = name.split("+")
    m = _BITS.fullmatch(parts[0])
    if m is None:
        raise UsageError(f"mode {name!r} is not allowed: use float, wW, wWaA, wWaA+OP[+OP...], wWaA+all or all-lut "
                         f"(W, A bits from 2 to 16; OP one of {', '.join(LUT_OPS)})")
    wbits, abits = int(m.group(1)), None if m.group(2) is None else int(m.group(2))
    for what, bits in (("weight", wbits), ("activation", abits)):
        if bits is not None and not 2 <= bits <= 16:
            raise UsageError(f"{what} bits {bits} in mode {name!r} are not allowed: use 2 to 16")
    ops = tuple(parts[1:])
    if abits is None and ops:
        raise UsageError(f"mode {name!r}: LUT ops need quantized activations (wWaA+OP)")
    if ops == ("all",):
        ops = LUT_OPS
    for op in ops:
        if op not in LUT_OPS:
            raise UsageError(f"LUT op {op!r} in mode {name!r} is not one of {', '.join(LUT_OPS)} (or 'all')")
    return QuantMode(name, True, abits is not None, ops, wbits, abits)


def calibration_forward(model: nn.Module, tokens: torch.Tensor) -> None:
    """Run every form, so that each quantizer sees its input: the masked scores live in the
    parallel form, the recurrent state only in the recurrent (and chunkwise) form."""
    model(tokens, "parallel")
    model(tokens, "recurrent")


def quantize_(model: nn.Module, mode: str | QuantMode, calib_batches: Iterable[torch.Tensor],
              forward: Callable[[nn.Module, torch.Tensor], object] | None = None,
              accumulator_bits: int | None = None, spec: QuantSpec | str | None = None) -> dict:
    """Switch `model` to `mode` in place, calibrating on `calib_batches` (token tensors).
    `spec` (a QuantSpec or its string, quantizers.parse_spec) picks the quantizers; the
    mode's bit widths, where it names them, override the spec's."""
    m = parse_mode(mode) if isinstance(mode, str) else mode
    spec = parse_spec(spec) if isinstance(spec, str) else (spec or QuantSpec())
    spec = replace(spec, weight_bits=m.weight_bits or spec.weight_bits, act_bits=m.act_bits or spec.act_bits)
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
    accumulators = [a for mod in model.modules() if isinstance(mod, MultiScaleRetention)
                    for a in (mod.score_quant, mod.state_quant)]
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.quantize_weight = m.weights
            mod.set_weight_spec(spec)
    acts = [mod for mod in model.modules() if isinstance(mod, ActQuant)]
    for a in acts:
        if not any(a is acc for acc in accumulators):  # the accumulators stay TQT at accumulator_bits
            a.spec, a.bits = spec, spec.act_bits
    if m.activations:
        observe(model, batches, acts, fwd)
        for acc in accumulators:
            acc.enabled = accumulator_bits is not None
            acc.bits = accumulator_bits or acc.bits
    scales = calibrate(model, batches, fwd) if m.lut_ops else {}
    active = sum(a.enabled for a in acts)
    return {"mode": m.name, "swaps": swaps, "lut_scales": scales, "activation_quantizers": active,
            "accumulator_bits": accumulator_bits, "quantizer": spec.label}

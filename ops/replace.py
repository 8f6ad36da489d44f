"""One call converts a model in place: `replace_ops(model)` swaps every supported module for its
LUT drop-in and says what it did; `calibrate(model, batches)` then sets the input scales."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gqa_lut.table import Table
from ops.modules import (LUTActivation, LUTGELU, LUTGroupNorm, LUTHardswish, LUTLayerNorm, LUTRMSNorm,
                         LUTSigmoid, LUTSiLU, LUTSoftmax, LUTTanh, RangeReducedLUT)
from ops.tables import as_table

TableLike = Table | str | Path


@dataclass(frozen=True)
class Swap:
    name: str
    old: str
    new: str
    table: str


def _act(cls: type, op: str) -> Callable[[nn.Module, dict], nn.Module]:
    return lambda m, t: cls(t.get(op), **t.get("_kwargs", {}))


def _layernorm(m: nn.LayerNorm, t: dict) -> nn.Module:
    new = LUTLayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                       bias=m.bias is not None, table=t.get("rsqrt"))
    return _copy_params(m, new)


def _rmsnorm(m: nn.RMSNorm, t: dict) -> nn.Module:
    new = LUTRMSNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine, table=t.get("rsqrt"))
    return _copy_params(m, new)


def _groupnorm(m: nn.GroupNorm, t: dict) -> nn.Module:
    new = LUTGroupNorm(m.num_groups, m.num_channels, eps=m.eps, affine=m.affine, table=t.get("rsqrt"))
    return _copy_params(m, new)


def _softmax(m: nn.Softmax, t: dict) -> nn.Module:
    return LUTSoftmax(m.dim if m.dim is not None else -1, t.get("exp"), t.get("reciprocal"))


def _copy_params(old: nn.Module, new: nn.Module) -> nn.Module:
    new.load_state_dict(old.state_dict(), strict=False)  # replace_ops moves it to the model's device
    return new


# op key -> (torch type, builder, tables the drop-in uses)
SWAPS: dict[str, tuple[type, Callable, tuple[str, ...]]] = {
    "gelu": (nn.GELU, _act(LUTGELU, "gelu"), ("gelu",)),
    "silu": (nn.SiLU, _act(LUTSiLU, "swish"), ("swish",)),
    "hswish": (nn.Hardswish, _act(LUTHardswish, "hswish"), ("hswish",)),
    "sigmoid": (nn.Sigmoid, _act(LUTSigmoid, "sigmoid"), ("sigmoid",)),
    "tanh": (nn.Tanh, _act(LUTTanh, "tanh"), ("tanh",)),
    "layernorm": (nn.LayerNorm, _layernorm, ("rsqrt",)),
    "rmsnorm": (nn.RMSNorm, _rmsnorm, ("rsqrt",)),
    "groupnorm": (nn.GroupNorm, _groupnorm, ("rsqrt",)),
    "softmax": (nn.Softmax, _softmax, ("exp", "reciprocal")),
}
LUT_TYPES = (LUTActivation, LUTLayerNorm, LUTRMSNorm, LUTGroupNorm, LUTSoftmax, RangeReducedLUT)


def replace_ops(model: nn.Module, tables: Optional[dict[str, TableLike]] = None,
                ops: Optional[Iterable[str]] = None, **module_kwargs: Any) -> list[dict]:
    """Swap supported modules of `model` in place for their LUT drop-ins; return the swaps.

    tables: op name (gelu, swish, hswish, sigmoid, tanh, exp, rsqrt, reciprocal) -> Table or
    file; the shipped defaults otherwise. ops: which kinds to swap (keys of SWAPS), all by
    default. module_kwargs (scale_mode, grad, ...) go to the activation drop-ins. Modules
    whose class subclasses a torch one are swapped too; LUT modules and everything else are
    left untouched. nn.TransformerEncoder/DecoderLayer's functional `activation` (F.gelu,
    "gelu") is swapped as well, and its fused fast path disabled so the table is used.
    """
    chosen = list(SWAPS) if ops is None else list(ops)
    for key in chosen:
        if key not in SWAPS:
            raise ValueError(f"op {key!r} cannot be swapped: choose from {', '.join(SWAPS)}")
    needed = {name for key in chosen for name in SWAPS[key][2]}
    given = dict(tables or {})
    for name in given:
        if name not in {n for v in SWAPS.values() for n in v[2]}:
            raise ValueError(f"tables key {name!r} is not a table the drop-ins use")
    loaded = {name: as_table(given.get(name), name) for name in needed}
    loaded["_kwargs"] = module_kwargs
    report: list[Swap] = []
    anchor = next(model.parameters(), None)
    if anchor is None:
        anchor = next(model.buffers(), None)
    device = anchor.device if anchor is not None else torch.device("cpu")

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            full = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, LUT_TYPES):
                continue
            for key in chosen:
                typ, build, used = SWAPS[key]
                if isinstance(child, typ):
                    new = build(child, loaded).to(device)  # the drop-in lives where the model does
                    setattr(parent, child_name, new)
                    report.append(Swap(full, type(child).__name__, type(new).__name__,
                                       ", ".join(loaded[u].op for u in used)))
                    break
            else:
                visit(child, full)
        if isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and "gelu" in chosen:
            act = getattr(parent, "activation", None)
            if act is F.gelu:
                parent.activation = LUTGELU(loaded["gelu"], **module_kwargs).to(device)
                report.append(Swap(f"{prefix}.activation" if prefix else "activation", "F.gelu", "LUTGELU",
                                   loaded["gelu"].op))
            if isinstance(parent.activation, LUTActivation):
                parent.activation_relu_or_gelu = 0  # the fused kernel would bypass the table

    visit(model, "")
    return [asdict(s) for s in report]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], forward: Optional[Callable[[nn.Module, Any], Any]] = None
              ) -> dict[str, int]:
    """Run batches through the model, observe each LUT activation's largest |input|, and set
    its scale to the finest one that does not clip it. Returns {module name: scale d}."""
    acts = {n: m for n, m in model.named_modules() if isinstance(m, LUTActivation)}
    for m in acts.values():
        m.amax.zero_()
        m.calibrating = True
    try:
        for batch in batches:
            forward(model, batch) if forward is not None else model(batch)
    finally:
        scales = {n: m.finish_calibration() for n, m in acts.items()}
    return scales

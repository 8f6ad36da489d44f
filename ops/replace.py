"""One call converts a model in place: `replace_ops(model)` swaps every supported module for its
LUT drop-in and says what it did; `calibrate(model, batches)` then sets the input scales."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gqa_lut.functions import OPS, canonical_name
from gqa_lut.table import Table
from ops import modules, registry
from ops.modules import LUTActivation, LUTGELU, RangeReducedLUT
from ops.tables import as_table

TableLike = Table | str | Path


@dataclass(frozen=True)
class Swap:
    """One module: swapped (new, table) or kept in float (new None, and why)."""

    name: str
    old: str
    new: Optional[str]
    table: Optional[str]
    reason: str = ""


def overrides_forward(cls: type, bases: tuple[type, ...]) -> Optional[type]:
    """The torch base whose forward a subclass replaces (None if it keeps the base's): such a
    module computes something else (LayerNorm2d permutes channels first), so swapping it for
    the base's drop-in would silently change the model."""
    for base in bases:
        if issubclass(cls, base) and cls is not base:
            for k in cls.__mro__[:cls.__mro__.index(base)]:
                if "forward" in vars(k):
                    return base
    return None


# every drop-in the registry names, and the building blocks inside them: never swapped again
LUT_TYPES = (LUTActivation, RangeReducedLUT, *(getattr(modules, r.drop_in) for r in registry.swappable()))


def replace_ops(model: nn.Module, tables: Optional[dict[str, TableLike]] = None,
                ops: Optional[Iterable[str]] = None, **module_kwargs: Any) -> list[dict]:
    """Swap supported modules of `model` in place for their LUT drop-ins; return the swaps.

    tables: table name (gelu, swish, hswish, sigmoid, tanh, exp, rsqrt, reciprocal) -> Table or
    file; the shipped defaults otherwise. ops: which ops to swap (ops/registry.py names or
    their aliases: gelu, swish/silu, hswish, sigmoid, tanh, layernorm, rmsnorm, groupnorm,
    softmax), all by default. module_kwargs (scale_mode, grad, ...) go to the activation
    drop-ins. Modules whose class subclasses a torch one are swapped too; LUT modules and
    everything else are left untouched. nn.TransformerEncoder/DecoderLayer's functional
    `activation` (F.gelu, "gelu") is swapped as well, and its fused fast path disabled so the
    table is used.
    """
    swappable = {r.name: r for r in registry.swappable()}
    chosen: list[registry.TorchOp] = []
    for key in (swappable if ops is None else ops):
        rec = registry.TORCH_OPS.get(canonical_name(key) if key in OPS else key)
        if rec is None or rec.name not in swappable:
            raise ValueError(f"op {key!r} cannot be swapped: choose from {', '.join(swappable)}")
        chosen.append(rec)
    known = registry.table_names()
    for name in tables or {}:
        if name not in known:
            raise ValueError(f"tables key {name!r} is not a table the drop-ins use: use {', '.join(sorted(known))}")
    loaded = {name: as_table((tables or {}).get(name), name) for rec in chosen for name in rec.tables}
    report: list[Swap] = []
    anchor = next(model.parameters(), None)
    if anchor is None:
        anchor = next(model.buffers(), None)
    device = anchor.device if anchor is not None else torch.device("cpu")

    def visit(parent: nn.Module, prefix: str) -> None:
        before = len(report)
        for child_name, child in list(parent.named_children()):
            full = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, LUT_TYPES):
                continue
            for rec in chosen:
                if isinstance(child, rec.replaces) and (rec.when is None or rec.when(child)):
                    base = overrides_forward(type(child), rec.replaces)
                    if base is not None:  # its own forward means something the drop-in does not know
                        report.append(Swap(full, type(child).__name__, None, None,
                                           f"kept float: {type(child).__name__} overrides {base.__name__}.forward"))
                        break
                    drop_in = getattr(modules, rec.drop_in)
                    new = drop_in.from_float(child, loaded, **module_kwargs).to(device)  # where the model is
                    setattr(parent, child_name, new)
                    report.append(Swap(full, type(child).__name__, type(new).__name__,
                                       ", ".join(loaded[t].op for t in rec.tables)))
                    break
            else:
                visit(child, full)
        if (isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
                and any(r.name == "gelu" for r in chosen)):
            act = getattr(parent, "activation", None)
            if act is F.gelu:
                parent.activation = LUTGELU(loaded["gelu"], **module_kwargs).to(device)
                report.append(Swap(f"{prefix}.activation" if prefix else "activation", "F.gelu", "LUTGELU",
                                   loaded["gelu"].op))
        if isinstance(parent, nn.TransformerEncoderLayer) and any(r.new for r in report[before:]):
            # the fused inference kernel reads the norms' weights and the activation itself and
            # would bypass every drop-in inside the layer
            parent.activation_relu_or_gelu = 0

    visit(model, "")
    return [asdict(s) for s in report]


def observe(model: nn.Module, batches: Iterable[Any], observers: list[nn.Module],
            forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> None:
    """Run batches through the model while `observers` (modules with start_observing and
    finish_observing: the LUT activations, the RetNet's activation quantizers) record the
    largest |input| they see; each then sets its scale from it. The one calibration loop."""
    batches = list(batches)
    if not batches:
        raise ValueError("calibration got no batches: give at least one batch of real inputs")
    for m in observers:
        m.start_observing()
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch) if forward is not None else model(batch)
    finally:
        for m in observers:
            m.finish_observing()


def calibrate(model: nn.Module, batches: Iterable[Any], forward: Optional[Callable[[nn.Module, Any], Any]] = None
              ) -> dict[str, int]:
    """Run batches through the model, observe each LUT activation's largest |input|, and set
    its scale to the finest one that does not clip it. Returns {module name: scale d}. Tables
    whose input a drop-in range-reduces (the rsqrt inside norms, exp and 1/x inside softmax)
    keep the scale that fits that fixed range."""
    acts = {n: m for n, m in model.named_modules() if isinstance(m, LUTActivation) and not m.range_reduced}
    observe(model, batches, list(acts.values()), forward)
    return {n: m.scale for n, m in acts.items()}

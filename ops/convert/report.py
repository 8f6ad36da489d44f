"""What `replace_ops` did to a model, kept live: every module swap and every call site the
model has met, each through a table (which, at which scale) or left in float (why).

`print(report)` gives the coverage line and a table; `report.rows()` the same as records,
`report.to_dict()` as JSON-ready dicts.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from gqa_lut.table import Table
from ops.nn import LUTActivation, sync

TableLike = Table | str | Path
# a probed drop-in (tables bypassed) may differ from the original by float rounding only
PROBE_TOL = {torch.float32: 1e-3, torch.float64: 1e-6, torch.float16: 3e-2, torch.bfloat16: 3e-2}


@dataclass
class Swap:
    """One module: swapped (new, table) or kept (new None, and why)."""

    name: str
    old: str
    new: Optional[str]
    table: Optional[str]
    reason: str = ""
    # a kept module whose non-linear work no call site can see (an RNN's fused gates): a float
    # row of its own even where call sites are on
    opaque: bool = False


@dataclass
class Row:
    name: str
    kind: str  # the module class swapped, or the kind of call
    through: bool
    tables: str = ""
    scale: Optional[int] = None
    reason: str = ""
    channel_scales: str = ""  # "lo-hi": the range of per-feature scales, where calibrate set them
    calls: Optional[int] = None  # calls during calibration's pass over its batches (None before calibration)


def _channels(m: Optional[nn.Module]) -> str:
    if isinstance(m, LUTActivation) and m._channels_differ:
        ds = m.channel_scales()
        return f"{min(ds)}-{max(ds)}"
    return ""


EXACT_REASON = "inputs below the table's resolution (fewer than 8 codes at its finest step): kept float"


def _exact(m: Optional[nn.Module]) -> bool:
    return isinstance(m, LUTActivation) and m._exact


def _scale(m: Optional[nn.Module]) -> Optional[int]:
    if isinstance(m, LUTActivation) and not m.range_reduced:
        return m.scale
    return None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class _bypass:
    """Every table inside `m` replaced by its exact function, for the probe."""

    def __init__(self, m: nn.Module):
        self.luts = [x for x in m.modules() if isinstance(x, LUTActivation)]

    def __enter__(self) -> None:
        for x in self.luts:
            x.bypass = x.fn is not None

    def __exit__(self, *exc: Any) -> None:
        for x in self.luts:
            x.bypass = False


class _Probe:
    """For one batch the original module is back in its slot (the model runs as it was, its
    attributes intact; Report.probe pauses the call sites meanwhile); this forward hook on it
    runs the drop-in, tables bypassed, on the same call and records how far that is from the
    original's output."""

    def __init__(self, drop_in: nn.Module):
        self.drop_in = drop_in
        self.rel: Optional[float] = None
        self.dtype = torch.float32  # of the original's output: how much rounding to allow
        self.error = ""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        try:
            with _bypass(self.drop_in):
                mine = self.drop_in(*args, **kwargs)
            theirs, tree = tree_flatten(out)
            ours, my_tree = tree_flatten(mine)
            if (my_tree != tree or not theirs or not all(isinstance(t, torch.Tensor) for t in theirs + ours)
                    or any(a.shape != b.shape for a, b in zip(ours, theirs))):
                self.error = "returns something else"
            else:  # a tensor, or a recurrent layer's (output, (h, c)): every tensor within tolerance
                self.rel = max([self.rel or 0.0] + [_rel(a, b) for a, b in zip(ours, theirs)])
                self.dtype = theirs[0].dtype
        except Exception as e:  # noqa: BLE001 - a drop-in that cannot take the call is a refused swap
            self.error = f"cannot take the call ({type(e).__name__}: {e})".splitlines()[0][:120]


@dataclass
class Report:
    swaps: list[Swap]
    router: Any  # ops.call_sites.CallRouter, or None with calls=False
    originals: dict[str, tuple[nn.Module, str, nn.Module]] = field(default_factory=dict)
    model_ref: Optional[nn.Module] = None
    notes: list[str] = field(default_factory=list)  # model-wide changes (the attention implementation)
    record_after_calibration: bool = False  # replace_ops(calls="recorded")
    # calls of each row during calibration's pass over its batches (module swaps by a hook, call
    # sites by the router); None before calibration. A row with none did not run: not counted
    calls: Optional[dict[str, int]] = None

    def count_calls(self, model: nn.Module) -> Callable[[], None]:
        """Count every row's calls from now on; returns the function that stops counting."""
        counts: dict[str, int] = {}
        handles = []
        for s in self.swaps:
            if s.new is None and not s.opaque:
                continue
            try:
                m = model.get_submodule(s.name)
            except AttributeError:
                continue
            handles.append(m.register_forward_pre_hook(lambda mod, args, name=s.name: counts.__setitem__(
                name, counts.get(name, 0) + 1)))
        if self.router is not None:
            self.router.counts = counts

        def stop() -> None:
            for h in handles:
                h.remove()
            if self.router is not None:
                self.router.counts = None
            self.calls = counts

        return stop

    # --- the probe (ops.replace.calibrate) -----------------------------------------------------
    def probe(self, run: Callable[[Any], Any], batch: Any) -> None:
        """One forward with each swap beside its original; undo the ones that differ."""
        probes, handles = {}, []
        for name, (parent, attr, old) in self.originals.items():
            probes[name] = p = _Probe(getattr(parent, attr))
            handles.append(old.register_forward_hook(p, with_kwargs=True))
            setattr(parent, attr, old)
        router = self.router
        try:
            if router is not None:
                router.paused = True  # the originals' own calls are not call sites
            run(batch)
        finally:
            if router is not None:
                router.paused = False
            for h in handles:
                h.remove()
            # a swap any rank rejects is undone on every rank (torch.distributed): one model
            verdicts = {name: p.error or (p.rel is not None and p.rel > PROBE_TOL.get(p.dtype, 1e-3))
                        for name, p in probes.items()}
            agreed = dict(zip(verdicts, sync.any_rank([bool(v) for v in verdicts.values()])))
            for name, (parent, attr, old) in self.originals.items():
                p = probes[name]
                if agreed[name]:
                    why = p.error or (f"output differs from {type(old).__name__}'s by rel {p.rel:.2g}"
                                      if verdicts[name] else "another rank's inputs rejected it")
                    setattr(parent, attr, old)
                    if router is not None:
                        router.hook(old)
                    fused = isinstance(old, nn.RNNBase)  # its gates stay inside torch's kernel: a float row
                    for s in self.swaps:
                        if s.name == name:
                            s.new, s.table, s.opaque = None, None, fused
                            s.reason = f"probe: {why}; kept" + (" float" if fused else " (its calls are call sites)")
                else:
                    setattr(parent, attr, p.drop_in)
            self.originals = {}

    # --- what it says --------------------------------------------------------------------------
    def rows(self) -> list[Row]:
        """Every swap and call site that ran at calibration (all of them before it)."""
        return [r for r in self._all_rows() if r.calls != 0]

    def idle(self) -> list[str]:
        """Swaps and call sites calibration never ran (a code path the model did not take)."""
        return [r.name for r in self._all_rows() if r.calls == 0]

    def _all_rows(self) -> list[Row]:
        out = self._rows()
        calls = getattr(self, "calls", None)  # (reports pickled before call counting have none)
        if calls is not None:
            for r in out:
                r.calls = calls.get(r.name, 0)
        return out

    def _rows(self) -> list[Row]:
        out = []
        model = self.model_ref
        calls_on = self.router is not None
        for s in self.swaps:
            if s.new is not None:
                mod = model.get_submodule(s.name) if model is not None else None
                if _exact(mod):
                    out.append(Row(s.name, s.old, False, reason=EXACT_REASON))
                    continue
                out.append(Row(s.name, s.old, True, s.table or "", _scale(mod), channel_scales=_channels(mod)))
            elif not calls_on or s.opaque:
                out.append(Row(s.name, s.old, False, reason=s.reason))
        if calls_on:
            for r in self.router.sites():
                mod = model.get_submodule(r.name) if model is not None and r.tables else None
                if _exact(mod):
                    out.append(Row(r.name, r.kind, False, reason=EXACT_REASON))
                    continue
                out.append(Row(r.name, r.kind, bool(r.tables), ", ".join(r.tables), _scale(mod), r.reason,
                               _channels(mod)))
        return out

    def kept(self) -> list[Swap]:
        """Modules left as they were, and why (their own calls may still be call sites)."""
        return [s for s in self.swaps if s.new is None]

    def coverage(self, rows: Optional[list[Row]] = None) -> str:
        rows = self.rows() if rows is None else rows
        through = sum(r.through for r in rows)
        line = f"{through} of {len(rows)} call sites through tables"
        if rows and all(r.calls is not None for r in rows):
            line += (f" ({sum(r.calls for r in rows if r.through)} of {sum(r.calls for r in rows)} calls at "
                     "calibration)")
        floats = Counter((r.kind, r.reason) for r in rows if not r.through)
        if floats:
            line += "; float: " + "; ".join(f"{n} {k} ({why})" for (k, why), n in floats.items())
        unmet = self.router is not None and self.router.forwards == 0
        if unmet:
            line += " (call sites appear after a forward: run calibrate)"
        if not rows:
            line = "nothing to convert: no non-linear module or call found" + (
                " yet (run a forward or calibrate)" if unmet else "")
        return line

    def __str__(self) -> str:
        rows = self.rows()
        lines = [self.coverage(rows)]
        if rows:
            w = max(len(r.name) for r in rows)
            lines.append(f"{'site'.ljust(w)}  {'kind':<22} {'':5} {'tables':<20} {'calls':>6} {'scale':>5}  reason")
            for r in rows:
                scale = "" if r.scale is None else str(r.scale)
                scale = f"{scale} (features {r.channel_scales})" if r.channel_scales else scale
                calls = "" if r.calls is None else str(r.calls)
                lines.append(f"{r.name.ljust(w)}  {r.kind:<22} {'table' if r.through else 'float':5} "
                             f"{r.tables:<20} {calls:>6} {scale:>5}  {r.reason}")
        idle = self.idle()
        if idle:
            lines.append(f"not run at calibration (not counted): {', '.join(idle)}")
        for s in self.kept():
            lines.append(f"kept module {s.name} ({s.old}): {s.reason}")
        lines += self.notes
        return "\n".join(lines)

    def to_dict(self) -> dict:
        rows = self.rows()
        return {"coverage": self.coverage(rows), "rows": [asdict(r) for r in rows], "idle": self.idle(),
                "swaps": [asdict(s) for s in self.swaps], "notes": list(self.notes)}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["originals"] = {}
        return state

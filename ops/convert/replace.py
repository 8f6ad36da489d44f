"""One call converts a model in place: `replace_ops(model)` swaps the modules whose meaning it
knows for their LUT drop-ins and routes every other non-linear call through a table
(ops/convert/call_sites.py); `calibrate(model, batches)` probes the swaps and sets the input scales.
The returned `Report` stays live: print it after a forward to see every call site."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gqa_lut.functions import OPS, canonical_name
from ops import nn as lut_nn, registry
from ops.convert import adapters, site_tables
from ops.convert.call_sites import KIND_OP, SITE_TABLES, CallRouter
from ops.nn import LUTActivation, LUTGELU, RangeReducedLUT, device_of
from ops.nn.activation import GRAD_MODES, SCALE_MODES
from ops.convert.report import Report, Swap, TableLike
from ops.tables import as_table

# every drop-in the registry names, and the building blocks inside them: never swapped again
LUT_TYPES = (LUTActivation, RangeReducedLUT, *(getattr(lut_nn, r.drop_in) for r in registry.swappable()))
# ops that have call sites but no module to swap
CALL_ONLY = tuple(dict.fromkeys(c.op for c in registry.CALLS if c.op not in {r.name for r in registry.swappable()}))


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


def _chosen_ops(ops: Optional[Iterable[str]]) -> list[str]:
    allowed = [r.name for r in registry.swappable()] + list(CALL_ONLY)
    if ops is None:
        return allowed
    if isinstance(ops, str):
        ops = [ops]
    out = []
    for key in ops:
        name = canonical_name(key) if key in OPS else key
        if name not in allowed:
            raise ValueError(f"op {key!r} cannot be swapped: choose from {', '.join(allowed)}")
        out.append(name)
    return out


def _load_tables(chosen: list[str], tables: Optional[dict[str, TableLike]]) -> dict[str, Any]:
    known = registry.table_names() | {t for ts in SITE_TABLES.values() for t in ts}
    for name in tables or {}:
        if name not in known:
            raise ValueError(f"tables key {name!r} is not a table the drop-ins use: use {', '.join(sorted(known))}")
    needed = {t for rec in registry.RECORDS if rec.name in chosen for t in rec.tables}
    needed |= {t for kind, ts in SITE_TABLES.items() if KIND_OP[kind] in chosen for t in ts}
    loaded = {}
    for name in sorted(needed | set(tables or {})):
        t = as_table((tables or {}).get(name), name)
        if canonical_name(t.op) != name if t.op in OPS else t.op != name:
            raise ValueError(f"tables[{name!r}] is a table for {t.op!r}: give a {name} table there")
        loaded[name] = t
    return loaded


# what replace_ops passes on to the activation drop-ins (modules and call sites alike)
MODULE_KWARGS = {"scale_mode": SCALE_MODES, "grad": GRAD_MODES}
Filter = Callable[[nn.Module, str], bool]


def _check_module_kwargs(kwargs: dict[str, Any]) -> None:
    for key, value in kwargs.items():
        if key not in MODULE_KWARGS:
            raise ValueError(f"replace_ops got an unknown argument {key!r}: the drop-ins take "
                             f"{', '.join(MODULE_KWARGS)}")
        if value not in MODULE_KWARGS[key]:
            raise ValueError(f"{key}={value!r} is not allowed: use {', '.join(map(repr, MODULE_KWARGS[key]))}")


def replace_ops(model: nn.Module, tables: Optional[dict[str, TableLike]] = None,
                ops: Optional[Iterable[str]] = None, calls: bool | str = True,
                filter_fn: Optional[Filter] = None, **module_kwargs: Any) -> Report:
    """Convert `model` in place; return its live Report.

    Modules are swapped where their meaning is known: torch's own classes (a subclass only if
    it keeps the base's forward) and the library classes of ops/convert/adapters.py (found by class
    name). With `calls` (the default) every other non-linear call the model makes (F.gelu,
    torch.rsqrt, softmax, scaled_dot_product_attention, the norms' functions...) goes through
    a table of its own at each call site; the sites appear at the first forward (calibrate).
    calls="recorded": the same, and after calibration the interception runs only inside the
    modules where calibration met a call (eager forward without the per-operation Python cost
    elsewhere; a call on a code path calibration never took is then not seen). calls=False:
    module swaps only.

    tables: table name (gelu, gelu_tanh, swish, hswish, hsigmoid, softplus, sigmoid, tanh,
    exp, rsqrt, reciprocal, erf, log) -> Table or file; the shipped defaults otherwise. ops: which
    ops (ops/registry.py names or aliases; rsqrt, exp, reciprocal, erf, log and logsumexp are call
    sites only; lstm, gru and rnn the recurrent layers), all by default.
    filter_fn(module, name) -> bool (torchao's quantize_ filter): a module for which it is False
    is not swapped, and the calls its own forward makes stay float (reported with that reason);
    its children are asked on their own. module_kwargs: scale_mode ('fixed', 'calibrate',
    'learned') and grad ('exact', 'slope') for every activation drop-in, modules and call sites.
    """
    if calls not in (True, False, "model", "recorded"):
        raise ValueError(f"calls={calls!r} is not allowed: use True (or 'model'), 'recorded' or False")
    if filter_fn is not None and not callable(filter_fn):
        raise ValueError(f"filter_fn={filter_fn!r} is not allowed: give a function (module, name) -> bool")
    _check_module_kwargs(module_kwargs)
    keep = filter_fn if filter_fn is not None else (lambda m, name: True)
    chosen = _chosen_ops(ops)
    loaded = _load_tables(chosen, tables)
    prior: Optional[Report] = getattr(model, "_gqa_lut_report", None)
    report = prior if prior is not None else Report([], None)
    device = device_of(model)
    swappable = [r for r in registry.swappable() if r.name in chosen]

    def swap(parent: nn.Module, attr: str, full: str, old: nn.Module, new: nn.Module, table: str) -> None:
        new = new.to(device)  # where the model is
        setattr(parent, attr, new)
        report.swaps.append(Swap(full, type(old).__name__, type(new).__name__, table))
        report.originals[full] = (parent, attr, old)

    def visit(parent: nn.Module, prefix: str) -> None:
        before = len(report.swaps)
        for child_name, child in list(parent.named_children()):
            full = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, LUT_TYPES) or child_name == "lut_calls":
                continue
            if not keep(child, full):
                visit(child, full)
                continue
            rec = next((r for r in swappable if isinstance(child, r.replaces) and (r.when is None or r.when(child))),
                       None)
            if rec is None and isinstance(child, nn.RNNBase):  # its gates run inside one ATen kernel
                if child.mode in ("LSTM", "GRU", "RNN_TANH"):  # (not chosen: the ops= left it out)
                    report.swaps.append(Swap(full, type(child).__name__, None, None,
                                             f"kept float: {type(child).__name__}'s sigmoid/tanh gates run inside "
                                             "torch's fused RNN kernel", opaque=True))
                continue
            if rec is not None:
                base = overrides_forward(type(child), rec.replaces)
                if base is not None:  # its own forward means something the drop-in does not know
                    report.swaps.append(Swap(full, type(child).__name__, None, None,
                                             f"kept: {type(child).__name__} overrides {base.__name__}.forward"))
                    visit(child, full)
                    continue
                new = getattr(lut_nn, rec.drop_in).from_float(child, loaded, **module_kwargs)
                swap(parent, child_name, full, child, new, ", ".join(loaded[t].op for t in rec.tables))
                continue
            adapter = adapters.find(child)
            if adapter is not None and adapter.op in chosen:
                new = adapter.build(child, loaded, **module_kwargs)
                if new is not None:
                    table = ", ".join(loaded[t].op for t in registry.torch_op(adapter.op).tables)
                    swap(parent, child_name, full, child, new, table)
                    continue
            visit(child, full)
        if (isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and "gelu" in chosen
                and getattr(parent, "activation", None) is F.gelu and keep(parent, prefix)):
            parent.activation = LUTGELU(loaded["gelu"], **module_kwargs).to(device)
            report.swaps.append(Swap(f"{prefix}.activation" if prefix else "activation", "F.gelu", "LUTGELU",
                                     loaded["gelu"].op))
        if isinstance(parent, nn.TransformerEncoderLayer) and any(s.new for s in report.swaps[before:]):
            # the fused inference kernel reads the norms' weights and the activation itself and
            # would bypass every drop-in inside the layer
            parent.activation_relu_or_gelu = 0

    visit(model, "")
    if calls and "softmax" in chosen:
        old = adapters.route_hf_attention(model)
        if old is not None:
            report.notes.append(f"attention: {old} -> {adapters.HF_ATTENTION} (Hugging Face's sdpa path, "
                                "its softmax through the tables)")
    if calls and report.router is None:
        report.router = CallRouter(model, loaded, set(chosen), LUT_TYPES, module_kwargs, filter_fn)
        report.record_after_calibration = calls == "recorded"
    elif report.router is not None:
        report.router.hook(model)
    report.model_ref = model
    model._gqa_lut_report = report
    return report


def call_model(model: nn.Module, batch: Any) -> Any:
    """A calibration batch into the model: a dict (a tokenizer's output) as keyword arguments,
    anything else as the one argument (give `forward=` for other signatures)."""
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


def observe(model: nn.Module, batches: Iterable[Any], observers: list[nn.Module],
            forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> None:
    """Run batches through the model while `observers` (modules with start_observing,
    sync_observations and finish_observing: the LUT activations, the RetNet's activation
    quantizers) record what they see; each then sets its scale from it. The one
    calibration loop. Under torch.distributed each rank runs its own batches and the observers
    combine what they saw over the ranks before choosing (ops/nn/sync.py), so every rank ends
    with the same scales, also for a module that saw no input on some rank."""
    batches = list(batches)
    if not batches:
        raise ValueError("calibration got no batches: give at least one batch of real inputs")
    for m in observers:
        m.start_observing()
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch) if forward is not None else call_model(model, batch)
        for m in observers:
            m.sync_observations()
    finally:
        for m in observers:
            m.finish_observing()


SCALE_GRAINS = ("channel", "tensor")
# the largest input reaches fewer codes than this (of 127) even at the table's finest step: the
# site runs its exact function (Gemma2's final soft-cap tanh(x / 30) reaches 1.5 codes in
# bench.model_zoo's random-init model: every logit on 3 levels); fewer than COARSE_CODES: the
# report warns
FLOAT_CODES = 8
COARSE_CODES = 16
RESOLUTION_NOTE = "resolution: "


def resolution_notes(acts: dict[str, LUTActivation]) -> list[str]:
    """After observing: a site whose largest input reaches fewer than FLOAT_CODES codes even at
    the table's finest step runs its exact function instead (and says so); one that reaches
    fewer than COARSE_CODES is warned about. The largest input decides (per-feature scales only
    refine the grid)."""
    notes = []
    for name, m in acts.items():
        amax = float(m.amax)
        codes = amax * 2.0 ** m.scale
        m.set_exact_fallback(bool(amax > 0 and amax * 2.0 ** max(m.table.scales) < FLOAT_CODES))
        if m._exact:
            notes.append(f"{RESOLUTION_NOTE}{name}: inputs (|x| <= {amax:.3g}) reach {codes:.1f} codes at the "
                         f"table's finest step 2^-{max(m.table.scales)}: it runs float")
        elif 0 < codes < COARSE_CODES:
            notes.append(f"{RESOLUTION_NOTE}warning: {name}: inputs (|x| <= {amax:.3g}) reach only "
                         f"{codes:.0f} input codes at step 2^-{m.scale}: the table is coarse there")
    return notes


def _fit_sites(acts: dict[str, LUTActivation]) -> None:
    """Each activation's table fitted to its own inputs (calibrate(fit=True))."""
    requests = {}
    for name, m in acts.items():
        samples = m.take_samples()
        if samples is None:
            continue
        cfg = site_tables.site_request(m.table, m.scales_in_use(), samples.double().numpy())
        if cfg is not None:
            requests[name] = (m.table.op, cfg)
    for name, table in site_tables.fit_site_tables(requests).items():
        acts[name].adopt_table(table)


def calibrate(model: nn.Module, batches: Iterable[Any], forward: Optional[Callable[[nn.Module, Any], Any]] = None,
              scales: str = "channel", fit: bool = False) -> dict[str, int]:
    """Probe the swaps and set every free table's scale from real inputs.

    The first batch runs with the originals back in place, each followed by its drop-in with
    exact functions in place of its tables: a swap whose output differs from the original's
    beyond float rounding is undone and reported. A second pass over that batch meets the call
    sites. Then every LUT activation (modules and call sites) observes its largest |input| over
    all batches and takes the finest scale that does not clip it. Tables whose input a drop-in
    range-reduces (the rsqrt inside norms, exp and 1/x inside softmax) keep the scale that fits
    that fixed range (exp call sites range-reduce too: right for inputs of either sign).

    scales="channel" (the default): an activation whose inputs are 2-D or 3-D (features last: a
    linear layer's outputs) gets a power-of-two scale per feature, each the finest that holds
    that feature's largest |input|, as an INT8 pipeline's per-output-channel requantization
    gives it for free. A few outlier features no longer coarsen every other feature's grid: on
    SmolLM2-135M all tables cost +0.95% perplexity instead of +2.39% (python -m bench.real_models). scales="tensor": one
    scale per activation. Returns {module name: scale d} of the calibrated activations (the
    tensor's scale; `LUTActivation.channel_scales()` has the features').

    fit=True: each activation's table is then fitted again, weighted by a sample of the inputs
    that site saw and over the scales it uses (ops/convert/site_tables.py: parallel, cached on
    disk). For a pretrained LLM this is the accurate path: SmolLM2-135M's SiLU tables cost
    +0.41% perplexity instead of +0.76%, all tables +0.52%, for 85 s on 2 cores with an empty
    fit cache (python -m bench.real_models)."""
    if scales not in SCALE_GRAINS:
        raise ValueError(f"scales={scales!r} is not allowed: use {' or '.join(map(repr, SCALE_GRAINS))}")
    if not isinstance(fit, bool):
        raise ValueError(f"fit={fit!r} is not allowed: use True or False")
    batches = list(batches)
    if not batches:
        raise ValueError("calibration got no batches: give at least one batch of real inputs")
    report: Optional[Report] = getattr(model, "_gqa_lut_report", None)
    run = (lambda b: forward(model, b)) if forward is not None else (lambda b: call_model(model, b))
    if report is not None:
        with torch.no_grad():
            if report.originals:
                report.probe(run, batches[0])
            if report.router is not None:
                run(batches[0])  # meets the call sites (the probe's pass runs with interception paused)
    acts = {n: m for n, m in model.named_modules() if isinstance(m, LUTActivation) and not m.range_reduced}
    for m in acts.values():
        m.per_channel = scales == "channel"
        m.collect_samples = site_tables.SAMPLES_PER_BATCH if fit else 0
    stop_counting = report.count_calls(model) if report is not None else None
    try:
        try:
            observe(model, batches, list(acts.values()), forward)
        finally:
            if stop_counting is not None:
                stop_counting()
        notes = resolution_notes(acts)
        if report is not None:
            report.notes[:] = [n for n in report.notes if not n.startswith(RESOLUTION_NOTE)] + notes
        if fit:
            _fit_sites({n: m for n, m in acts.items() if not m._exact})
    finally:
        for m in acts.values():
            m.collect_samples, m._samples = 0, []
    if report is not None and report.router is not None and report.record_after_calibration:
        owners = report.router.record()
        report.notes.append(f"calls recorded at calibration: interception runs inside {len(owners)} modules only")
    return {n: m.scale for n, m in acts.items()}


def load_converted(model: nn.Module, saved: Any, **replace_kwargs: Any) -> Report:
    """A converted model back from what it saved, in one call: `replace_ops(model, ...)` on the
    float model (e.g. `from_pretrained` of a folder that `save_pretrained` wrote from a converted
    model, which loads only the float weights and warns about the table keys), then its saved
    state: a state dict, a .safetensors file, or a folder holding model.safetensors. The call
    sites are recreated from their keys. Keys the file lacks must be parameters the model ties to
    ones it has (save_pretrained drops a tied lm_head); anything else missing or unexpected is an
    error naming the keys."""
    if isinstance(saved, (str, Path)):
        path = Path(saved)
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            raise ValueError(f"load_converted: {str(path)!r} is not a file: give a state dict, a .safetensors "
                             "file or a folder that save_pretrained wrote")
        from safetensors.torch import load_file
        saved = load_file(str(path))
    if not isinstance(saved, Mapping):
        raise ValueError(f"load_converted: a state dict, a file or a folder is needed, not {type(saved).__name__}")
    report = replace_ops(model, **replace_kwargs)
    missing, unexpected = model.load_state_dict(dict(saved), strict=False)
    params = list(model.named_parameters(remove_duplicate=False))
    saved_storage = {p.data_ptr() for name, p in params if name in saved}
    tied_to_saved = {name for name, p in params if p.data_ptr() in saved_storage}
    missing = [k for k in missing if k not in tied_to_saved]
    if missing or unexpected:
        raise ValueError(f"load_converted: the saved state does not fit the converted model: missing "
                         f"{missing[:5]}, unexpected {list(unexpected)[:5]}")
    return report

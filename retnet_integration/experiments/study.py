"""`gqa-lut retnet study`: what each quantization choice costs the RetNet, with spreads across
trained models.

Rows (`ROWS`): the quantizers compared at W8A8 with every LUT op after QAT (TQT, PACT, LSQ,
min-max, percentile, LSQ per channel), bit widths (W6A6, W4A8 with PACT and LSQ, W4A4),
latent QAT (float first, then quantized), the integer graph (integer/simulation.py: the retention
quantized too, scored in its recurrent form), and a float model fine-tuned for the same steps.
Every row runs on every checkpoint given (models of one preset trained with different seeds:
`gqa-lut retnet train --seed S`), `seeds` times per QAT row (calibration batches and QAT data
order); a row's number is its mean across the models and its spread is the spread across them,
so it says how much of a difference the training itself would move. Costs are paired: each model
against its own float model fine-tuned as long (the headline) and its own float model. A ranking
is stated only where those ranges separate (`ranking`).
Sensitivity rows (deterministic, no QAT): each quantizer alone, each LUT op alone, each tensor
type alone (`TENSORS`: the q/k/v/gate projections' input, q, k, v, the masked scores, the
state, the out_proj input = swish gate x GroupNorm, the FFN's input and hidden layer, the
head's input), retention only (its weights, activations and LUT ops) against
the whole network. Results go to a JSON file after every run, so a stopped study resumes where
it stopped; the markdown table and the figures are written from that file.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from gqa_lut.errors import UsageError
from gqa_lut.io import parse_json, read_text_capped, write_json_atomic, write_text_atomic
from retnet_integration.data import eval_windows, load_corpus
from retnet_integration.integer.simulation import IntSim
from retnet_integration.layers import ActQuant
from retnet_integration.experiments.pipeline import (bits_per_char, calib_batches, checkpoint_config, load_checkpoint,
                                                     pick_device, train_steps)
from retnet_integration.quantize import LUT_OPS, quantize_


MAX_STUDY_BYTES = 64 << 20  # a study of every row on a dozen models is under 1 MB

TENSORS = ("projections input", "q", "k", "v", "scores", "state", "out_proj input", "FFN input", "FFN hidden",
           "head input")


@dataclass(frozen=True)
class Row:
    name: str
    group: str  # quantizer | bits | schedule | baseline | sensitivity
    mode: str = "all-lut"
    spec: str = "tqt"
    kind: str = "qat"  # qat | latent | float-ft | ptq | int-qat (the integer graph, integer/simulation.py)
    only: Optional[str] = None  # sensitivity: keep only the activation quantizers of this tensor type


ROWS: list[Row] = [
    Row("float", "baseline", "float", kind="ptq"),
    Row("float + same fine-tune", "baseline", "float", kind="float-ft"),
    *[Row(f"W8A8 all-lut, {m}", "quantizer", spec=m + (":wlsq" if m == "lsq" else ""))
      for m in ("tqt", "pact", "lsq", "minmax", "percentile")],
    Row("W8A8 all-lut, lsq per channel", "quantizer", spec="lsq:channel:wlsq"),
    Row("W6A6 all-lut, lsq", "bits", "w6a6+all", "lsq:wlsq"),
    Row("W4A8 all-lut, pact", "bits", "w4a8+all", "pact"),
    Row("W4A8 all-lut, lsq", "bits", "w4a8+all", "lsq:wlsq"),
    Row("W4A4 all-lut, lsq", "bits", "w4a4+all", "lsq:wlsq"),
    Row("W8A8 all-lut, tqt, latent QAT", "schedule", kind="latent"),
    Row("integer graph: W8A8 all-lut + quantized retention", "retention", kind="int-qat"),
    # sensitivity: before any fine-tune
    *[Row(f"quantizer alone (W8A8, no LUT): {m}", "sensitivity", "w8a8", m, "ptq")
      for m in ("tqt", "pact", "lsq", "minmax", "percentile")],
    *[Row(f"LUT op alone (W8A8 + {op})", "sensitivity", f"w8a8+{op}", "tqt", "ptq") for op in LUT_OPS],
    *[Row(f"tensor alone (A8 only): {t}", "sensitivity", "w8a8", "tqt", "ptq", only=t)
      for t in TENSORS],
    Row("retention only (W8A8 + decay, swish, groupnorm)", "sensitivity", "w8a8+decay+swish+groupnorm", "tqt",
        "ptq", only="retention"),
    Row("whole network (W8A8 all-lut)", "sensitivity", "all-lut", "tqt", "ptq"),
]


def _tensor_of(name: str) -> str:
    """The tensor type an ActQuant's module name stands for (TENSORS)."""
    for key, tensor in ((".q_quant", "q"), (".k_quant", "k"), (".v_quant", "v"), (".score_quant", "scores"),
                        (".state_quant", "state"), ("out_proj.input_quant", "out_proj input"),
                        ("ffn.up.input_quant", "FFN input"), ("ffn.down.input_quant", "FFN hidden"),
                        ("head.input_quant", "head input")):
        if name.endswith(key):
            return tensor
    return "projections input"  # q_proj, k_proj, v_proj, g_proj: the first norm's output


def keep_only(model: torch.nn.Module, only: str) -> int:
    """Keep one tensor type's activation quantizers (weights float), or the retention's
    weights and activations ('retention'); the rest back to float. Returns how many
    activation quantizers stay on."""
    kept = 0
    for name, mod in model.named_modules():
        inside = ".retention." in name + "."
        if isinstance(mod, ActQuant):
            on = inside if only == "retention" else _tensor_of(name) == only
            mod.enabled = on and mod.enabled
            kept += mod.enabled
        elif hasattr(mod, "quantize_weight"):
            mod.quantize_weight = only == "retention" and inside and mod.quantize_weight
    return kept


def run_row(row: Row, seed: int, base: torch.nn.Module, corpus, tcfg, device, test, batch: int = 64) -> dict:
    """One row on one trained model; `seed` varies the calibration batches and the QAT data order
    (tcfg.seed is the model's training seed, so two models never share their QAT batches)."""
    cfg = replace(tcfg, seed=1000 * tcfg.seed + 100 * seed)
    calib = calib_batches(corpus, cfg, device)
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    info: dict = {}
    if row.kind == "int-qat":
        # every tensor quantized, the retention too (q, k, v, the state with fixed-point gamma,
        # its output), trained through the parallel form, scored by the recurrent form: the
        # integer graph itself, bit for bit
        sim = IntSim(model)
        sim.calibrate(calib)
        train_steps(sim, corpus.train, cfg, cfg.qat_steps, cfg.qat_lr, device, cfg.seed + 2)
        bpc = bits_per_char(sim, test, device, form="recurrent", batch=batch)
        par = bits_per_char(sim, test, device, form="parallel", batch=batch)
        return {"row": row.name, "seed": seed, "test_bpc": bpc, "seconds": time.perf_counter() - t0,
                "quantizer": "integer graph", "kept": None, "parallel_form_bpc": par}
    if row.kind == "float-ft":
        train_steps(model, corpus.train, cfg, cfg.qat_steps, cfg.qat_lr, device, cfg.seed + 2)
    elif row.kind == "latent":
        half = cfg.qat_steps // 2
        train_steps(model, corpus.train, cfg, half, cfg.qat_lr, device, cfg.seed + 3)
        info = quantize_(model, row.mode, calib, spec=row.spec)
        train_steps(model, corpus.train, cfg, cfg.qat_steps - half, cfg.qat_lr, device, cfg.seed + 4)
    elif row.mode != "float":
        if row.only in ("scores", "state"):
            info = quantize_(model, row.mode, calib, spec=row.spec, accumulator_bits=8)
        else:
            info = quantize_(model, row.mode, calib, spec=row.spec)
        if row.only:
            info["kept"] = keep_only(model, row.only)
        if row.kind == "qat":
            train_steps(model, corpus.train, cfg, cfg.qat_steps, cfg.qat_lr, device, cfg.seed + 2)
    # the state exists only in the recurrent and chunkwise forms
    bpc = bits_per_char(model, test, device, form="chunkwise" if row.only == "state" else "parallel", batch=batch)
    return {"row": row.name, "seed": seed, "test_bpc": bpc, "seconds": time.perf_counter() - t0,
            "quantizer": info.get("quantizer"), "kept": info.get("kept")}


FT = "float + same fine-tune"


def _range(v: list[float]) -> tuple[float, float, float]:
    """(mean, spread = max - min, sample standard deviation; 0 for one value)."""
    return statistics.mean(v), max(v) - min(v), statistics.stdev(v) if len(v) > 1 else 0.0


def summarise(doc: dict) -> list[dict]:
    """Per row: its bpc per trained model (the mean over that model's QAT seeds), then the mean
    and the spread across the trained models; the costs are paired, each model's row against the
    same model's float rows, then averaged, so the model-to-model spread of bpc (larger than
    most costs) does not hide in them."""
    per: dict[str, dict[int, list[float]]] = {}
    for r in doc["runs"]:
        per.setdefault(r["row"], {}).setdefault(r.get("model", 0), []).append(r["test_bpc"])
    model_mean = {row: {m: statistics.mean(v) for m, v in ms.items()} for row, ms in per.items()}
    out = []
    for row in ROWS:
        ms = model_mean.get(row.name)
        if not ms:
            continue
        models = sorted(ms)
        mean, spread, std = _range([ms[m] for m in models])
        entry = {"row": row.name, "group": row.group, "models": len(models),
                 "seeds": max(len(per[row.name][m]) for m in models), "runs": sum(len(per[row.name][m]) for m in models),
                 "mean_bpc": mean, "spread": spread, "std": std, "per_model_bpc": [ms[m] for m in models]}
        for key, ref in (("vs_float_finetuned", FT), ("vs_float", "float")):
            paired = [ms[m] / model_mean[ref][m] - 1 for m in models if m in model_mean.get(ref, {})]
            entry[key] = statistics.mean(paired) if paired else math.nan
            entry[key + "_range"] = [min(paired), max(paired)] if paired else None
        out.append(entry)
    return out


def ranking(summary: list[dict], group: str = "quantizer") -> Optional[str]:
    """The ranking of a group's rows that the spread across trained models supports: rows sorted
    by their mean cost vs the fine-tuned float model, cut into tiers where every row above the
    cut costs less on every model's range than every row below it (the ranges, min to max of the
    per-model paired costs, do not overlap). None with fewer than two models: one model has no
    spread to separate anything."""
    rows = sorted((s for s in summary if s["group"] == group and s.get("vs_float_finetuned_range")),
                  key=lambda s: s["vs_float_finetuned"])
    if len(rows) < 2 or rows[0]["models"] < 2:
        return None
    tiers: list[list[dict]] = [[rows[0]]]
    for i in range(1, len(rows)):
        above = max(s["vs_float_finetuned_range"][1] for s in rows[:i])
        below = min(s["vs_float_finetuned_range"][0] for s in rows[i:])
        if above < below:
            tiers.append([])
        tiers[-1].append(rows[i])
    short = (lambda n: n.split(", ", 1)[-1]) if group == "quantizer" else (lambda n: n)  # all W8A8 all-lut there
    names = ["; ".join(short(s["row"]) for s in t) for t in tiers]
    if len(tiers) == 1:
        return (f"No ranking of the {group} rows: their ranges across the {rows[0]['models']} trained models "
                "overlap, so the spread separates none of them.")
    return (f"Ranking of the {group} rows that the spread supports (tiers separated on every one of the "
            f"{rows[0]['models']} trained models; within a tier the ranges overlap, so no order is claimed): "
            + " < ".join("{" + n + "}" for n in names) + " (lower cost first).")


def _pct_range(s: dict, key: str) -> str:
    if s["row"] == {"vs_float_finetuned": FT, "vs_float": "float"}[key]:
        return "reference"
    if s.get(key + "_range") is None:
        return "-"
    lo, hi = s[key + "_range"]
    if s["models"] < 2:
        return f"{100 * s[key]:+.2f}%"
    return f"{100 * s[key]:+.2f}% ({100 * lo:+.2f} to {100 * hi:+.2f})"


def markdown(summary: list[dict], doc: dict) -> str:
    calls = [c for c in doc.get("calls", []) if c["runs_added"]]
    ran = "; ".join(f"`{c['command']}` on {c['device']} ({c['runs_added']} runs)" for c in calls)
    models = doc["models"]
    data = doc.get("data", {})
    near = data.get("near_duplicates_dropped")
    seeds = ", ".join(str(m["train_seed"]) for m in models)
    paths = ", ".join(f"`{m['checkpoint']}`" for m in models)
    lines = [f"Study of {len(models)} trained model{'s' * (len(models) > 1)} ({doc['preset']} preset, training seeds "
             f"{seeds}: {paths}) "
             f"on {doc.get('corpus', 'fortunes')}; {doc['windows_rule']}; {doc['qat_steps']} QAT steps"
             + (f"; {near} near-duplicate and {data.get('duplicates_dropped')} repeated documents dropped from "
                "the evaluation splits" if near is not None else "") + f". {ran or 'No runs'}.", "",
             "Each row's bpc is its mean over the trained models (each model's own bpc the mean of its QAT seeds); "
             "the spread is max - min across the models. Costs are paired, each model against its own float "
             "model fine-tuned for the same steps (first) and its own float model (second), then averaged; "
             "in brackets the lowest and highest model.", "",
             "| row | models x seeds | bpc (mean) | spread across models | vs float fine-tuned as long | vs float |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['row']} | {s['models']} x {s['seeds']} | {s['mean_bpc']:.4f} | {s['spread']:.4f} | "
                     f"{_pct_range(s, 'vs_float_finetuned')} | {_pct_range(s, 'vs_float')} |")
    for statement in doc.get("rankings", {}).values():
        if statement:
            lines += ["", statement]
    return "\n".join(lines) + "\n"


def file_sha256(path: Path) -> str:
    """What a results file resumes against: the checkpoint's bytes, not its name (retraining
    to the same path must not mix two models' runs in one table)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def device_name_of(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_study(checkpoints: list[Path] | Path, out: Path, seeds: Optional[int] = None, windows: Optional[int] = None,
              rows: Optional[list[str]] = None, device_name: str = "auto", log: Callable[[str], None] = print,
              command: str = "") -> dict:
    """Every chosen row on every checkpoint (one per training seed, one preset), `seeds` runs of
    each QAT row per checkpoint (default: 3 for one checkpoint, 1 for several: the training seeds
    then carry the spread), on every test window unless `windows` asks for an evenly spaced subset."""
    checkpoints = [Path(checkpoints)] if isinstance(checkpoints, (str, Path)) else [Path(c) for c in checkpoints]
    if not checkpoints:
        raise UsageError("no checkpoint given: name one or more with --checkpoint")
    if seeds is None:
        seeds = 3 if len(checkpoints) == 1 else 1
    if seeds < 1:
        raise UsageError(f"--seeds {seeds} is not allowed: use 1 or more")
    if windows is not None and windows < 1:
        raise UsageError(f"--windows {windows} is not allowed: use 1 or more")
    chosen = ROWS
    if rows:
        names = {r.name for r in ROWS}
        for n in rows:
            if n not in names and n not in {r.group for r in ROWS}:
                raise UsageError(f"row {n!r} is not a study row or group: groups are "
                                 f"{', '.join(sorted({r.group for r in ROWS}))}")
        chosen = [r for r in ROWS if r.name in rows or r.group in rows or r.group == "baseline"]
    device = pick_device(device_name)
    shas = [file_sha256(c) if Path(c).is_file() else None for c in checkpoints]
    if len(set(shas)) < len(shas) and None not in shas:
        raise UsageError("the same checkpoint is named twice: each --checkpoint must be another trained model")
    loaded = [load_checkpoint(c, device) for c in checkpoints]
    presets = {extra.get("preset", "cpu") for _, extra in loaded}
    if len(presets) > 1:
        raise UsageError(f"the checkpoints come from several presets ({', '.join(sorted(presets))}): "
                         "a study compares training seeds of one preset")
    cfgs = [checkpoint_config(extra) for _, extra in loaded]
    corpora = {c.corpus for c in cfgs}
    if len(corpora) > 1:
        raise UsageError(f"the checkpoints were trained on several corpora ({', '.join(sorted(corpora))}): "
                         "a study compares training seeds on one corpus")
    tcfg = cfgs[0]
    corpus = load_corpus(tcfg.corpus)
    test = eval_windows(corpus.test, tcfg.seq_len, windows)
    total = (corpus.test.numel() - 1) // tcfg.seq_len
    rule = (f"every test window ({total} of {tcfg.seq_len} bytes)" if test.shape[0] == total else
            f"{test.shape[0]} of the {total} test windows of {tcfg.seq_len} bytes, evenly spaced (so every "
            "source file in proportion to its text)")
    models = [{"checkpoint": str(c), "checkpoint_sha256": sha, "train_seed": cfg.seed, "val_bpc": extra.get("val_bpc")}
              for c, sha, cfg, (_, extra) in zip(checkpoints, shas, cfgs, loaded)]
    doc = {"benchmark": "retnet-study", "preset": presets.pop(), "corpus": tcfg.corpus, "data": corpus.info,
           "models": models, "test_windows": int(test.shape[0]), "windows_rule": rule, "qat_steps": tcfg.qat_steps,
           "calls": [], "runs": []}
    if out.is_file():  # resume: keep the runs of the same checkpoints (by content) and test set
        try:
            old = json.loads(read_text_capped(out, f"results file {str(out)!r}", MAX_STUDY_BYTES))
        except json.JSONDecodeError as exc:
            raise UsageError(f"results file {str(out)!r} is not JSON ({exc.msg}): move it away to start afresh") from None
        if not isinstance(old, dict):
            raise UsageError(f"results file {str(out)!r} is not a study's results: move it away to start afresh")
        old_shas = ([m.get("checkpoint_sha256") for m in old["models"]] if "models" in old
                    else [old.get("checkpoint_sha256")])  # a study file of one checkpoint, before training seeds
        same = (old_shas == shas[:len(old_shas)] and all(old.get(k) == doc[k] for k in ("test_windows", "qat_steps")))
        if old.get("runs") and not same:
            raise UsageError(f"results file {str(out)!r} holds runs of another checkpoint or test set "
                             f"({', '.join(repr(m.get('checkpoint')) for m in old.get('models', [old])) or 'unknown'}): "
                             "move it away or name another --out (more checkpoints may follow the ones it holds)")
        doc["runs"], doc["calls"] = old.get("runs", []), old.get("calls", [])
    call = {"command": command, "device": device_name_of(device), "runs_added": 0}
    doc["calls"].append(call)
    done = {(r["row"], r.get("model", 0), r["seed"]) for r in doc["runs"]}
    for row in chosen:
        for m, ((base, _), cfg) in enumerate(zip(loaded, cfgs)):
            for seed in range(1 if row.kind == "ptq" else seeds):
                if (row.name, m, seed) in done:
                    continue
                # wider evaluation batches on a GPU: the recurrent form's steps are sequential
                r = {"model": m, **run_row(row, seed, base, corpus, cfg, device, test,
                                           256 if device.type == "cuda" else 64)}
                doc["runs"].append(r)
                call["runs_added"] += 1
                write_json_atomic(out, doc)
                log(f"{row.name:<52} model {m} seed {seed}: {r['test_bpc']:.4f} bpc ({r['seconds']:.0f}s)")
    return finish(doc, out, log)


def finish(doc: dict, out: Path, log: Callable[[str], None]) -> dict:
    """The summary, rankings and markdown table from the runs, written beside them."""
    doc["summary"] = summarise(doc)
    doc["rankings"] = {g: ranking(doc["summary"], g) for g in ("quantizer", "bits")}
    write_json_atomic(out, doc)
    table = markdown(doc["summary"], doc)
    write_text_atomic(out.with_suffix(".md"), table)
    log(table)
    return doc


def merge_studies(parts: list[Path], out: Path, log: Callable[[str], None] = print) -> dict:
    """Studies of the same preset, corpus, test set and QAT steps, each on its own trained models
    (run side by side, one process or machine each), as one study of all their models."""
    docs = []
    for p in parts:
        d = parse_json(read_text_capped(p, f"study file {str(p)!r}", MAX_STUDY_BYTES), f"study file {str(p)!r}")
        if (not isinstance(d, dict) or d.get("benchmark") != "retnet-study" or not isinstance(d.get("models"), list)
                or not isinstance(d.get("runs"), list)):
            raise UsageError(f"study file {str(p)!r} is not a study of `gqa-lut retnet study` with training seeds")
        docs.append(d)
    keys = ("preset", "corpus", "test_windows", "windows_rule", "qat_steps")
    for d, p in zip(docs[1:], parts[1:]):
        diff = [k for k in keys if d.get(k) != docs[0].get(k)]
        if diff:
            raise UsageError(f"study file {str(p)!r} differs from {str(parts[0])!r} in {', '.join(diff)}: "
                             "only studies of one preset, corpus and test set merge")
    shas = [m["checkpoint_sha256"] for d in docs for m in d["models"]]
    if len(set(shas)) < len(shas):
        raise UsageError("two study files hold the same trained model: each model may appear once")
    doc = {**{k: docs[0].get(k) for k in ("benchmark", *keys, "data")}, "models": [], "calls": [], "runs": [],
           "merged_from": [str(p) for p in parts]}
    for d in docs:
        offset = len(doc["models"])
        doc["models"] += d["models"]
        doc["calls"] += d.get("calls", [])
        doc["runs"] += [{**r, "model": r.get("model", 0) + offset} for r in d["runs"]]
    return finish(doc, out, log)

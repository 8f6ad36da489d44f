"""`gqa-lut retnet study`: what each quantization choice costs the RetNet, with spreads.

Rows (`ROWS`): the quantizers compared at W8A8 with every LUT op after QAT (TQT, PACT, LSQ,
min-max, percentile, LSQ per channel), bit widths (W6A6, W4A8 with PACT and LSQ, W4A4),
latent QAT (float first, then quantized), the integer graph (integer/simulation.py: the retention
quantized too, scored in its recurrent form), and a float model fine-tuned for the same steps;
each of those with `seeds` seeds (calibration batches and QAT data order), mean and spread.
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
from gqa_lut.io import write_json_atomic, write_text_atomic
from retnet_integration.data import eval_windows, load_corpus
from retnet_integration.integer.simulation import IntSim
from retnet_integration.layers import ActQuant
from retnet_integration.experiments.pipeline import (bits_per_char, calib_batches, get_preset, load_checkpoint, pick_device,
                                         train_steps)
from retnet_integration.quantize import LUT_OPS, quantize_


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


def run_row(row: Row, seed: int, base: torch.nn.Module, corpus, tcfg, device, test) -> dict:
    cfg = replace(tcfg, seed=tcfg.seed + 100 * seed)
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
        bpc = bits_per_char(sim, test, device, form="recurrent")
        par = bits_per_char(sim, test, device, form="parallel")
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
    bpc = bits_per_char(model, test, device, form="chunkwise" if row.only == "state" else "parallel")
    return {"row": row.name, "seed": seed, "test_bpc": bpc, "seconds": time.perf_counter() - t0,
            "quantizer": info.get("quantizer"), "kept": info.get("kept")}


def summarise(doc: dict) -> list[dict]:
    runs = doc["runs"]
    by = {}
    for r in runs:
        by.setdefault(r["row"], []).append(r["test_bpc"])
    ref = statistics.mean(by.get("float", [math.nan]))
    ft = statistics.mean(by.get("float + same fine-tune", [math.nan]))
    out = []
    for row in ROWS:
        v = by.get(row.name)
        if not v:
            continue
        mean = statistics.mean(v)
        out.append({"row": row.name, "group": row.group, "seeds": len(v), "mean_bpc": mean,
                    "spread": max(v) - min(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                    "vs_float": mean / ref - 1, "vs_float_finetuned": mean / ft - 1})
    return out


def markdown(summary: list[dict], doc: dict) -> str:
    calls = [c for c in doc.get("calls", []) if c["runs_added"]]
    ran = "; ".join(f"`{c['command']}` on {c['device']} ({c['runs_added']} runs)" for c in calls)
    lines = [f"Study on `{doc['checkpoint']}` ({doc['preset']} preset, {doc['test_windows']} test windows, "
             f"{doc['qat_steps']} QAT steps; {ran or 'no runs'})", "",
             "| row | seeds | bpc (mean) | spread (max-min) | vs float | vs float fine-tuned as long |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['row']} | {s['seeds']} | {s['mean_bpc']:.4f} | {s['spread']:.4f} | "
                     f"{100 * s['vs_float']:+.2f}% | {100 * s['vs_float_finetuned']:+.2f}% |")
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


def run_study(checkpoint: Path, out: Path, seeds: int = 3, windows: Optional[int] = 256,
              rows: Optional[list[str]] = None, device_name: str = "auto", log: Callable[[str], None] = print,
              command: str = "") -> dict:
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
        chosen = [r for r in ROWS if r.name in rows or r.group in rows or r.name in ("float", "float + same fine-tune")]
    device = pick_device(device_name)
    base, extra = load_checkpoint(checkpoint, device)
    preset = extra.get("preset", "cpu")
    _, tcfg = get_preset(preset)
    corpus = load_corpus()
    test = eval_windows(corpus.test, tcfg.seq_len, windows or tcfg.eval_windows)
    doc = {"benchmark": "retnet-study", "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint),
           "preset": preset, "test_windows": int(test.shape[0]), "qat_steps": tcfg.qat_steps, "calls": [], "runs": []}
    if out.is_file():  # resume: keep the runs of the same checkpoint (by content) and test set
        try:
            old = json.loads(out.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"results file {str(out)!r} is not JSON ({exc.msg}): move it away to start afresh") from None
        same = all(old.get(k) == doc[k] for k in ("checkpoint_sha256", "test_windows", "qat_steps"))
        if old.get("runs") and not same:
            raise UsageError(f"results file {str(out)!r} holds runs of another checkpoint or test set "
                             f"({old.get('checkpoint')!r}): move it away or name another --out")
        doc["runs"], doc["calls"] = old.get("runs", []), old.get("calls", [])
    call = {"command": command, "device": device_name_of(device), "runs_added": 0}
    doc["calls"].append(call)
    done = {(r["row"], r["seed"]) for r in doc["runs"]}
    for row in chosen:
        for seed in range(1 if row.kind == "ptq" else seeds):
            if (row.name, seed) in done:
                continue
            r = run_row(row, seed, base, corpus, tcfg, device, test)
            doc["runs"].append(r)
            call["runs_added"] += 1
            write_json_atomic(out, doc)
            log(f"{row.name:<52} seed {seed}: {r['test_bpc']:.4f} bpc ({r['seconds']:.0f}s)")
    doc["summary"] = summarise(doc)
    write_json_atomic(out, doc)
    table = markdown(doc["summary"], doc)
    write_text_atomic(out.with_suffix(".md"), table)
    log(table)
    return doc

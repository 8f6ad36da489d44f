"""Train a float RetNet, then measure what each quantization step costs: `gqa-lut retnet ...`.

train:  float training on the fortunes train split, checkpoint (state dict + config, loaded
        with weights_only=True).
eval:   from the checkpoint, test bits per character for float, W8, W8A8, W8A8 + each LUT op
        alone, all LUT ops, and after a short quantization-aware fine-tune with all LUT ops
        (direct, and the 'latent' schedule: float fine-tune first, then quantized); plus the
        quantized model's recurrent-vs-parallel next-token agreement. Writes a results JSON.
report: results JSONs -> runs/retnet.json (the published ones: bench/results/) and a markdown table (--plot: a chart).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from gqa_lut.errors import UsageError
from gqa_lut.progress import ProgressBar
from gqa_lut.io import check_readable, parse_json, read_text_capped, write_atomic, write_json_atomic, write_text_atomic

MAX_RESULTS_BYTES = 64 << 20
from retnet_integration.data import Corpus, eval_windows, load_corpus, random_windows
from retnet_integration.model import RetNet, RetNetConfig
from retnet_integration.quantize import LUT_OPS, quantize_



@dataclass
class TrainConfig:
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 1200
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    qat_steps: int = 200
    qat_lr: float = 3e-4
    calib_batches: int = 8
    eval_windows: Optional[int] = None  # all test windows when None
    agreement_windows: int = 32
    max_seconds: Optional[float] = None  # training budget: fewer steps if the measured rate needs it
    eval_every: Optional[int] = None  # keep the weights with the best validation bpc, checked this often
    patience: Optional[int] = None  # stop after this many validation checks without a new best
    corpus: str = "fortunes"  # retnet_integration.data.CORPORA


PRESETS: dict[str, tuple[RetNetConfig, TrainConfig]] = {
    "tiny": (RetNetConfig(d_model=32, n_layers=1, n_heads=2, max_len=256),
             TrainConfig(seq_len=32, batch_size=8, steps=40, lr=1e-2, warmup=5, qat_steps=6, calib_batches=2,
                         eval_windows=8, agreement_windows=4)),
    "cpu": (RetNetConfig(d_model=128, n_layers=2, n_heads=4, max_len=1024), TrainConfig()),
    "gpu": (RetNetConfig(d_model=256, n_layers=4, n_heads=4, max_len=2048, dropout=0.15),
            TrainConfig(seq_len=256, batch_size=64, steps=6000, lr=2e-3, warmup=200, weight_decay=0.1,
                        qat_steps=400, qat_lr=1.5e-4, calib_batches=16, agreement_windows=64,
                        max_seconds=200, eval_every=250, corpus="gcide")),
    # the study's scale: up to ~10 minutes on one H100 or H200, twice the gpu preset's layers,
    # on fortunes (the protocol of the published gpu10 study; the gpu preset moved to gcide),
    # more dropout; it stops once 6 validation checks (3000 steps) bring no new best: 4500 steps
    # show the 2.3 MB corpus ~30 times, and a 5.5M-parameter run of the full 8 minutes peaked at
    # step 4500 of 23138 (val 1.991 bpc, then 2.14 at the end: overfitting)
    "gpu10": (RetNetConfig(d_model=256, n_layers=8, n_heads=4, max_len=2048, dropout=0.25),
              TrainConfig(seq_len=256, batch_size=64, steps=40000, lr=1.5e-3, warmup=300, weight_decay=0.1,
                          qat_steps=200, qat_lr=1e-4, calib_batches=16, agreement_windows=64,
                          max_seconds=480, eval_every=500, patience=6)),
}


def get_preset(name: str) -> tuple[RetNetConfig, TrainConfig]:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    m, t = PRESETS[name]
    return copy.deepcopy(m), copy.deepcopy(t)


def checkpoint_config(extra: dict) -> TrainConfig:
    """The preset's training config with what the checkpoint was trained with (its corpus and
    seed): evaluation must read the corpus the model was trained on. Checkpoints from before the
    corpus field were all trained on fortunes."""
    _, tcfg = get_preset(extra.get("preset", "cpu"))
    trained = extra.get("train") or {}
    tcfg.corpus = trained.get("corpus", "fortunes")
    tcfg.seed = int(trained.get("seed", tcfg.seed))
    return tcfg


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' was asked for but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"device {name!r} is not allowed: use auto, cpu or cuda")
    return torch.device(name)


# --- checkpoints ---------------------------------------------------------------------------------

def save_checkpoint(model: RetNet, path: Path, extra: dict) -> None:
    doc = {"config": model.cfg.to_dict(), "state_dict": model.state_dict(), "extra": extra}
    write_atomic(path, lambda tmp: torch.save(doc, tmp))


def load_checkpoint(path: Path, device: torch.device) -> tuple[RetNet, dict]:
    model, doc = read_checkpoint(path, device)
    return model, doc.get("extra", {})


def read_checkpoint(path: Path, device: torch.device) -> tuple[RetNet, dict]:
    """The model (in eval mode) and the whole checkpoint document, read once."""
    if not Path(path).exists() and not Path(path).is_symlink():
        raise UsageError(f"checkpoint {str(path)!r} does not exist: train one with `gqa-lut retnet train`")
    check_readable(path, "checkpoint")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)  # never unpickle code
        model = RetNet(RetNetConfig(**ck["config"])).to(device)
        model.load_state_dict(ck["state_dict"])
    except Exception as exc:  # noqa: BLE001 - whatever a broken or foreign file raises, one line
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UsageError(f"checkpoint {str(path)!r} is not a RetNet checkpoint: {why}") from None
    return model.eval(), ck  # evaluated (and calibrated) without dropout


# --- training and evaluation ---------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig, total: int, peak: float) -> float:
    if step < cfg.warmup:
        return peak * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train_steps(model: RetNet, data: torch.Tensor, cfg: TrainConfig, steps: int, lr: float, device: torch.device,
                seed: int, log: Optional[Callable[[str], None]] = None, budget: Optional[float] = None,
                every: Optional[tuple[int, Callable[[int], bool]]] = None, label: str = "train") -> list[float]:
    """AdamW with warm-up and cosine decay; returns the training loss of every step.
    `every` = (n, check): check(step) runs every n steps; it returns True to stop training.

    With a budget (seconds), the rate of steps 10..30 sets how many steps fit it,
    and the schedule is laid over that many, so it still ends at its low learning rate."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    model.train()
    losses = []
    step = 0
    bar = ProgressBar(label, total=steps)  # drawn on a terminal only (gqa_lut.progress)
    while step < steps:
        if budget is not None and step == 10:
            t10 = time.perf_counter()  # the first steps include warm-up (CUDA init, allocator)
        if budget is not None and step == 30:
            rate = (time.perf_counter() - t10) / 20
            fit = int(budget / rate)
            if fit < steps:
                if log:
                    log(f"{rate * 1e3:.1f} ms/step: {fit} steps fit the {budget:g}s budget (of {steps})")
                steps = max(fit, 31)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, steps, lr)
        batch = random_windows(data, cfg.seq_len, cfg.batch_size, gen).to(device)
        loss = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(step + 1, steps, f"loss {losses[-1]:.4f}")
        if log and (step % max(1, steps // 10) == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps} loss {losses[-1]:.4f} ({losses[-1] / math.log(2):.3f} bpc)")
        step += 1
        if every is not None and (step % every[0] == 0 or step == steps):
            if every[1](step):
                break
            model.train()
    bar.close()
    model.eval()
    return losses


@torch.no_grad()
def bits_per_char(model: RetNet, windows: torch.Tensor, device: torch.device, form: str = "parallel",
                  batch: int = 64) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i:i + batch].to(device)
        logits, _ = model(w[:, :-1], form)
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                         w[:, 1:].reshape(-1), reduction="sum"))
        count += w[:, 1:].numel()
    return total / count / math.log(2)


@torch.no_grad()
def form_agreement(model: RetNet, windows: torch.Tensor, device: torch.device, chunk: int = 32) -> dict:
    """Share of positions where recurrent (and chunkwise) give the parallel form's next token."""
    model.eval()  # dropout would make every form disagree with every other
    w = windows.to(device)[:, :-1]
    p, _ = model(w, "parallel")
    r, _ = model(w, "recurrent")
    c, _ = model(w, "chunkwise", chunk_size=chunk)
    top = p.argmax(-1)
    return {"recurrent_vs_parallel": float((r.argmax(-1) == top).float().mean()),
            "chunkwise_vs_parallel": float((c.argmax(-1) == top).float().mean()),
            "recurrent_max_abs_logit_diff": float((r - p).abs().max()), "positions": int(top.numel())}


def calib_batches(corpus: Corpus, cfg: TrainConfig, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return [random_windows(corpus.train, cfg.seq_len, cfg.batch_size, gen)[:, :-1].to(device)
            for _ in range(cfg.calib_batches)]


# --- the commands ------------------------------------------------------------------------------------

def run_train(preset: str, out: Path, device_name: str = "auto", steps: Optional[int] = None,
              log: Callable[[str], None] = print, seed: Optional[int] = None, corpus_name: Optional[str] = None,
              max_seconds: Optional[float] = None) -> dict:
    """`seed` sets the initialisation and the data order (the study's training seeds);
    `corpus_name` and `max_seconds` override the preset's."""
    mcfg, tcfg = get_preset(preset)
    if steps is not None:
        if steps < 1:
            raise UsageError(f"steps {steps} is not allowed: use 1 or more")
        tcfg.steps = steps
    if seed is not None:
        if seed < 0:
            raise UsageError(f"seed {seed} is not allowed: use 0 or more")
        tcfg.seed = seed
    if max_seconds is not None:
        if not max_seconds > 0:
            raise UsageError(f"max seconds {max_seconds:g} is not allowed: use a positive number")
        tcfg.max_seconds = max_seconds
    if corpus_name is not None:
        tcfg.corpus = corpus_name
    device = pick_device(device_name)
    corpus = load_corpus(tcfg.corpus)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for the float model on GPU
    torch.manual_seed(tcfg.seed)
    model = RetNet(mcfg).to(device)
    val_windows = eval_windows(corpus.val, tcfg.seq_len, tcfg.eval_windows)
    best = {"bpc": math.inf, "step": 0, "state": None}

    def keep_best(step: int) -> bool:
        bpc = bits_per_char(model, val_windows[:128], device)
        if bpc < best["bpc"]:
            best.update(bpc=bpc, step=step, state=copy.deepcopy(model.state_dict()))
        log(f"  step {step}: val {bpc:.4f} bpc (best {best['bpc']:.4f} at step {best['step']})")
        stop = tcfg.patience is not None and step - best["step"] >= tcfg.patience * (tcfg.eval_every or 1)
        if stop:
            log(f"  stopped: no better validation in {tcfg.patience} checks")
        return stop

    t0 = time.perf_counter()
    losses = train_steps(model, corpus.train, tcfg, tcfg.steps, tcfg.lr, device, tcfg.seed, log, tcfg.max_seconds,
                         (tcfg.eval_every, keep_best) if tcfg.eval_every else None)
    seconds = time.perf_counter() - t0
    tcfg.steps = len(losses)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    val = bits_per_char(model, val_windows, device)
    extra = {"preset": preset, "train": asdict(tcfg), "train_seconds": seconds, "val_bpc": val,
             "best_step": best["step"] or len(losses),
             "first_loss": losses[0], "last_loss": losses[-1], "data": corpus.info, "device": str(device),
             "params": sum(p.numel() for p in model.parameters())}
    save_checkpoint(model, out, extra)
    log(f"trained {extra['params']} parameters in {seconds:.1f}s on {device}: val {val:.3f} bpc -> {out}")
    return extra


EVAL_MODES = ["float", "w8", "w8a8", *[f"w8a8+{op}" for op in LUT_OPS], "all-lut"]


def run_eval(checkpoint: Path, out: Path, device_name: str = "auto", log: Callable[[str], None] = print,
             command: str = "") -> dict:
    device = pick_device(device_name)
    if device.type == "cuda":
        # full float32 in evaluation: TF32's 10-bit mantissa rounds the parallel and recurrent
        # forms differently enough to flip downstream 8-bit codes (measured: 94.6% agreement)
        torch.backends.cuda.matmul.allow_tf32 = False
    base, extra = load_checkpoint(checkpoint, device)
    preset = extra.get("preset", "cpu")
    tcfg = checkpoint_config(extra)
    corpus = load_corpus(tcfg.corpus)
    test = eval_windows(corpus.test, tcfg.seq_len, tcfg.eval_windows)
    calib = calib_batches(corpus, tcfg, device)
    rows = []

    def measure(name: str, model: RetNet, note: str = "", **more) -> None:
        t0 = time.perf_counter()
        bpc = bits_per_char(model, test, device)
        row = {"step": name, "test_bpc": bpc, "eval_seconds": time.perf_counter() - t0, "note": note, **more}
        rows.append(row)
        log(f"{name:<22} {bpc:.4f} bpc {note}")

    for mode in EVAL_MODES:
        model = copy.deepcopy(base)
        info = quantize_(model, mode, calib)
        more = {}
        if mode == "all-lut":
            more["agreement"] = form_agreement(model, test[:tcfg.agreement_windows], device)
        measure(mode, model, f"{len(info['swaps'])} swaps" if info["swaps"] else "", **more)

    # quantization-aware fine-tune with every LUT op in place (straight-through gradients)
    model = copy.deepcopy(base)
    quantize_(model, "all-lut", calib)
    t0 = time.perf_counter()
    qat_losses = train_steps(model, corpus.train, tcfg, tcfg.qat_steps, tcfg.qat_lr, device, tcfg.seed + 2)
    measure("all-lut + QAT", model, f"{tcfg.qat_steps} steps", qat_seconds=time.perf_counter() - t0,
            agreement=form_agreement(model, test[:tcfg.agreement_windows], device))

    # 'latent' schedule: the same number of steps, float first, then quantized
    model = copy.deepcopy(base)
    half = tcfg.qat_steps // 2
    train_steps(model, corpus.train, tcfg, half, tcfg.qat_lr, device, tcfg.seed + 3)
    quantize_(model, "all-lut", calib)
    train_steps(model, corpus.train, tcfg, tcfg.qat_steps - half, tcfg.qat_lr, device, tcfg.seed + 4)
    measure("all-lut + latent QAT", model, f"{half} float + {tcfg.qat_steps - half} quantized steps")

    # accumulator study: requantizing the retention accumulators (masked scores, recurrent state)
    for bits in (16, 8):
        model = copy.deepcopy(base)
        quantize_(model, "all-lut", calib, accumulator_bits=bits)
        measure(f"all-lut, accumulators {bits}-bit", model, "accumulator study",
                agreement=form_agreement(model, test[:tcfg.agreement_windows], device))

    # float fine-tuned as long, so the QAT rows are not credited with extra training
    model = copy.deepcopy(base)
    train_steps(model, corpus.train, tcfg, tcfg.qat_steps, tcfg.qat_lr, device, tcfg.seed + 2)
    measure("float + same fine-tune", model, f"{tcfg.qat_steps} float steps")

    ref = rows[0]["test_bpc"]
    for r in rows:
        r["rel_to_float"] = r["test_bpc"] / ref - 1
    doc = {"benchmark": "retnet", "preset": preset, "device": str(device),
           "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "checkpoint": str(checkpoint), "model": base.cfg.to_dict(), "train": extra.get("train"),
           "train_seconds": extra.get("train_seconds"), "params": extra.get("params"), "data": corpus.info,
           "test_windows": int(test.shape[0]), "seq_len": tcfg.seq_len, "command": command, "rows": rows,
           "qat_first_last_loss": [qat_losses[0], qat_losses[-1]]}
    write_json_atomic(out, doc)
    log(f"wrote {out}")
    return doc


def markdown(docs: list[dict]) -> str:
    steps = [r["step"] for r in docs[0]["rows"]]
    head = "| step | " + " | ".join(f"{d['preset']} ({d['device_name']}) bpc | vs float" for d in docs) + " |"
    sep = "|---|" + "---|---|" * len(docs)
    lines = [head, sep]
    for s in steps:
        cells = []
        for d in docs:
            r = next((r for r in d["rows"] if r["step"] == s), None)
            cells += ["-", "-"] if r is None else [f"{r['test_bpc']:.4f}", f"{100 * r['rel_to_float']:+.2f}%"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    notes = []
    for d in docs:
        ag = next((r.get("agreement") for r in d["rows"] if r["step"] == "all-lut + QAT"), None)
        if ag:
            notes.append(f"- {d['preset']}: all-lut + QAT, recurrent vs parallel next-token agreement "
                         f"{100 * ag['recurrent_vs_parallel']:.2f}% (chunkwise {100 * ag['chunkwise_vs_parallel']:.2f}%) "
                         f"over {ag['positions']} test positions; {d['params']} parameters, "
                         f"{d['test_windows']} test windows of {d['seq_len']} bytes; `{d.get('command', '')}`")
    return "\n".join(lines + [""] + notes) + "\n"


def run_report(inputs: list[Path], out_json: Path, out_md: Path, log: Callable[[str], None] = print) -> dict:
    docs = []
    for p in inputs:
        if not Path(p).exists():
            raise UsageError(f"results file {str(p)!r} does not exist: run `gqa-lut retnet eval` first")
        doc = parse_json(read_text_capped(p, "results file", MAX_RESULTS_BYTES), f"results file {str(p)!r}")
        if not isinstance(doc, dict) or doc.get("benchmark") != "retnet" or not isinstance(doc.get("rows"), list):
            raise UsageError(f"results file {str(p)!r} is not a RetNet results file")
        docs.append(doc)
    try:
        md = markdown(docs)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"results files: a run lacks what `retnet eval` writes ({type(exc).__name__}: {exc})") from None
    combined = {"benchmark": "retnet", "runs": docs}
    write_json_atomic(out_json, combined)
    write_text_atomic(out_md, md)
    log(md)
    return combined

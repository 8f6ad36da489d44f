"""What quantization-aware training costs per step. Run: python -m bench.qat_speed [--device cuda]

One AdamW training step (forward, loss, backward, gradient clipping, update) of
- the RetNet (gpu preset's model and batch, 64 x 256 tokens, on CUDA; the cpu preset's, 32 x
  128, on the CPU) in float, W8A8 and all-LUT (W8A8 + every LUT op), and
- a small GPT-2-class transformer of `transformers` (4 layers, 256 wide; batch 16 x 256 on
  CUDA, 8 x 128 on the CPU) in float and with `replace_ops` (GELU, LayerNorm and attention's
  softmax through tables, every call site); its float baseline runs attention written out
  (`attn_implementation="eager"`), the computation the tables replace, and the SDPA kernel's
  time is recorded beside it.
Each step is timed as median of --reps steps after warm-up, the ratio taken against float in
the same process. Ways of running a step: `eager`; on CUDA `graph` (the whole step captured
once as a CUDA graph and replayed: it only captures if the step has no host sync, which this
checks) and, with --compile, `compile` (torch.compile of the model); on CUDA also
`eager-triton`, the eager step with the C++ operators of ops/kernels/cuda_kernel.py switched off (the
Triton kernels behind Python autograd functions), as a baseline in the same process. Kernel launches per step
come from the profiler. JSON merged into bench/results/qat_speed.json under the device.

    python -m bench.qat_speed [--device cpu|cuda] [--reps 20] [--compile] [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench._common import RESULTS, machine, names_in, positive_int, print_table, write_results
from ops import calibrate, replace_ops
from retnet_integration.model import RetNet
from retnet_integration.experiments.pipeline import get_preset
from retnet_integration.quantize import quantize_

TARGET_CUDA = 1.5  # all-LUT step / float step on the H100


def retnet_case(device: str, quick: bool) -> tuple[Callable[[str], nn.Module], Callable[[], torch.Tensor]]:
    mcfg, tcfg = get_preset("tiny" if quick else ("gpu" if device == "cuda" else "cpu"))
    mcfg.dropout = 0.0  # dropout's random masks are not the subject here
    gen = torch.Generator().manual_seed(0)
    shape = (tcfg.batch_size, tcfg.seq_len + 1)

    def batch() -> torch.Tensor:
        return torch.randint(0, 256, shape, generator=gen).to(device)

    def build(mode: str) -> nn.Module:
        torch.manual_seed(0)
        model = RetNet(mcfg).to(device)
        if mode != "float":
            quantize_(model, mode, [batch()[:, :-1] for _ in range(2)])
        model.train()
        return model

    return build, batch


def retnet_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits, _ = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def gpt2_case(device: str, quick: bool) -> tuple[Callable[[str], nn.Module], Callable[[], torch.Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel
    b, L = (2, 32) if quick else ((16, 256) if device == "cuda" else (8, 128))
    gen = torch.Generator().manual_seed(0)

    def batch() -> torch.Tensor:
        return torch.randint(0, 256, (b, L + 1), generator=gen).to(device)

    def build(mode: str) -> nn.Module:
        torch.manual_seed(0)
        attn = "sdpa" if mode == "float-sdpa" else "eager"
        cfg = GPT2Config(vocab_size=256, n_positions=L + 1, n_embd=256, n_layer=4, n_head=4, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        cfg._attn_implementation = attn
        model = GPT2LMHeadModel(cfg).to(device)
        if mode == "all-lut":
            replace_ops(model)
            calibrate(model, [batch()[:, :-1] for _ in range(2)], forward=lambda m, t: m(input_ids=t))
        model.train()
        return model

    return build, batch


def gpt2_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def make_step(model: nn.Module, loss_fn, device: str, capturable: bool):
    kw = {"capturable": True, "foreach": True} if capturable else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **kw)

    def step(tokens: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(model, tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=False)  # grads stay allocated: a captured graph keeps their addresses
        return loss

    return step


def time_steps(device: str, run: Callable[[], object], reps: int, warmup: int = 3) -> float:
    """Median wall seconds of one step, synchronised before and after each: a training step
    pays its host time, which bench._common.timer (back-to-back calls between events) hides;
    three warm-up steps (compilation, CUDA graph capture)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernels_per_step(run: Callable[[], object], show: int = 0) -> int:
    """CUDA kernels one step launches (the profiler's count); with show, the costliest ones."""
    from torch.profiler import ProfilerActivity, profile
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    if show:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=show), flush=True)
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")


def captured(step, batch: Callable[[], torch.Tensor]) -> Callable[[], object]:
    """The whole step as one CUDA graph (PyTorch's whole-network capture recipe)."""
    static = batch()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static)

    def replay() -> None:
        static.copy_(batch())
        graph.replay()

    return replay


def without_cpp_ops(run: Callable[[], object]) -> Callable[[], object]:
    from ops.kernels import cuda_kernel

    def plain() -> object:
        with cuda_kernel.switched_off():
            return run()

    return plain


def measure(name: str, build, batch, loss_fn, modes: list[str], device: str, reps: int, ways: list[str],
            profile: int = 0) -> list[dict]:
    recs = []
    for way in ways:
        base = None
        for mode in modes:
            rec = {"model": name, "mode": mode, "way": way}
            model = None
            try:
                model = build(mode)
                if way == "compile":
                    model = torch.compile(model)
                step = make_step(model, loss_fn, device, capturable=(device == "cuda"))
                run = captured(step, batch) if way == "graph" else (lambda s=step: s(batch()))
                if way == "eager-triton":  # the same eager step without the C++ operators
                    run = without_cpp_ops(run)
                rec["step_ms"] = time_steps(device, run, reps) * 1e3
                if device == "cuda" and way != "graph":
                    rec["kernels_per_step"] = kernels_per_step(run, profile if mode == "all-lut" else 0)
                if mode.startswith("float") and base is None:
                    base = rec["step_ms"]
                rec["ratio_to_float"] = rec["step_ms"] / base
            except Exception as exc:  # a way that cannot run this model is a result, not a crash
                rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            recs.append(rec)
            print(json.dumps(rec), flush=True)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    return recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--reps", type=positive_int, default=20)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    ap.add_argument("--quick", action="store_true", help="tiny models, few steps (a smoke run)")
    ap.add_argument("--models", type=names_in(("retnet", "gpt2")), default="retnet,gpt2")
    ap.add_argument("--profile", type=int, default=0, help="print the N costliest ops of an all-LUT step")
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    ways = ["eager"] + (["eager-triton", "graph"] if dev == "cuda" else []) + (["compile"] if args.compile else [])
    reps = 3 if args.quick else args.reps
    recs = []
    if "retnet" in args.models:
        build, batch = retnet_case(dev, args.quick)
        recs += measure("retnet", build, batch, retnet_loss, ["float", "w8a8", "all-lut"], dev, reps, ways,
                        args.profile)
    if "gpt2" in args.models:
        build, batch = gpt2_case(dev, args.quick)
        recs += measure("gpt2", build, batch, gpt2_loss, ["float", "all-lut", "float-sdpa"], dev, reps, ways,
                        args.profile)
    rows = [[r["model"], r["way"], r["mode"], f"{r['step_ms']:.2f}" if "step_ms" in r else "-",
             f"{r['ratio_to_float']:.2f}" if "ratio_to_float" in r else r.get("error", "-")[:40],
             str(r.get("kernels_per_step", "-"))] for r in recs]
    print_table(["model", "way", "mode", "step ms", "vs float", "kernels"], rows)
    lut = [r for r in recs if r["model"] == "retnet" and r["mode"] == "all-lut" and "ratio_to_float" in r]
    summary = {"retnet_all_lut_ratio": {r["way"]: r["ratio_to_float"] for r in lut}}
    if dev == "cuda":
        summary["device_name"] = torch.cuda.get_device_name()
        best = min((r["ratio_to_float"] for r in lut), default=None)
        summary.update(target=TARGET_CUDA, best_all_lut_ratio=best,
                       target_met=best is not None and best <= TARGET_CUDA)
    path = RESULTS / "qat_speed.json"
    doc = json.loads(path.read_text()) if path.exists() else {"benchmark": "qat_speed"}
    key = ("cpu" if dev == "cpu" else "cuda") + ("_quick" if args.quick else "")
    doc[key] = {"machine": machine(), "torch": torch.__version__, "reps": reps, "rows": recs, "summary": summary}
    print(f"wrote {write_results('qat_speed.json', doc)}")


if __name__ == "__main__":
    main()

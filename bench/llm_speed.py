"""What the tables cost an LLM-size model on the GPU, and the fused attention against torch's.
Run: python -m bench.llm_speed (CUDA only)

1. A random-init Hugging Face Llama of 542 M parameters (hidden 2048, 8 layers, 16 heads of
   128, MLP 5632, vocab 32000, bfloat16, SDPA attention), float against the same model after
   `replace_ops` + `calibrate` (every call site through tables), built once each in one process
   and timed interleaved: the no-grad forward (inference) and a training step (forward, loss,
   backward; no optimizer, which costs both alike), median of --reps, synchronised around each
   call, and the peak memory of each (torch.cuda.max_memory_allocated). Ways of running the
   tables: `eager` (the router intercepts calls in the whole model), `recorded`
   (`replace_ops(calls="recorded")`: interception only inside the modules that made calls);
   with --compile also torch.compile of float and tables. The tables' attention runs fused
   (ops/kernels/triton_attention.py); `eager-written-out` is the eager model with the fused
   kernel switched off (the L x S path it replaces) where it fits in memory (--written-out).
2. The fused attention alone (causal, bfloat16, head dim 128) against
   F.scaled_dot_product_attention (flash) on the same shapes: forward, and forward+backward,
   back-to-back calls between CUDA events.

JSON to bench/results/llm_speed.json (--attention-only: llm_speed_attention.json).

    python -m bench.llm_speed [--sizes 8x512,4x2048,1x8192] [--reps 10] [--compile] [--written-out]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench._common import machine, print_table, write_results

SIZES = ((8, 512), (4, 2048), (1, 8192))
VOCAB = 32000


def llama(calls) -> nn.Module:
    """The 542 M model, float (calls None) or converted with replace_ops(calls=calls) and
    calibrated on two batches of 2 x 512 tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from ops import calibrate, replace_ops
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=8192,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    if calls is not None:
        replace_ops(model, calls=calls)
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, VOCAB, (2, 512), generator=gen).cuda() for _ in range(2)]
        calibrate(model, batches, forward=lambda m, t: m(input_ids=t))
    return model


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def timed(run: Callable[[], object], reps: int) -> tuple[float, float]:
    """(median seconds of one call, synchronised around each, after two warm-ups; peak GiB)."""
    for _ in range(2):
        run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30


def model_rows(sizes, reps: int, compile_: bool, written_out: bool) -> list[dict]:
    from ops.kernels import triton_attention
    models = {"float": llama(None), "eager": llama(True), "recorded": llama("recorded")}
    if compile_:
        models["compiled-float"] = torch.compile(models["float"])
        models["compiled"] = torch.compile(llama(True))
    recs = []
    for b, L in sizes:
        gen = torch.Generator().manual_seed(2)
        tokens = torch.randint(0, VOCAB, (b, L + 1), generator=gen).cuda()
        ways = list(models) + (["eager-written-out"] if written_out else [])
        got = {}
        for way in ways:
            model = models["eager" if way == "eager-written-out" else way]
            triton_attention.ENABLED = way != "eager-written-out"
            try:
                with torch.no_grad():
                    inf = timed(lambda: model(input_ids=tokens[:, :-1]), reps)
                model.zero_grad(set_to_none=True)
                train = timed(lambda: loss_of(model, tokens).backward(), reps)
                model.zero_grad(set_to_none=True)
                got[way] = (*inf, *train)
            except torch.OutOfMemoryError:
                got[way] = None
                torch.cuda.empty_cache()
            finally:
                triton_attention.ENABLED = True
        fl = got["float"]
        for way, g in got.items():
            rec = {"batch": b, "tokens": L, "way": way}
            if g is not None:
                rec.update(infer_s=g[0], infer_gib=g[1], train_s=g[2], train_gib=g[3])
                if way != "float" and not way.startswith("compiled-"):
                    base = got["compiled-float"] if way == "compiled" else fl
                    rec.update(infer_ratio=g[0] / base[0], train_ratio=g[2] / base[2], infer_mem_ratio=g[1] / base[1],
                               train_mem_ratio=g[3] / base[3])
            else:
                rec["error"] = "out of memory"
            recs.append(rec)
            print(rec, flush=True)
    return recs


def cuda_ms(fn: Callable[[], object], n: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def attention_rows(sizes, reps: int) -> list[dict]:
    from ops.convert.call_sites import sdpa
    from ops.nn import LUTSoftmax
    site = LUTSoftmax(-1).cuda()
    recs = []
    for b, L in sizes:
        gen = torch.Generator(device="cuda").manual_seed(3)
        q, k, v = (torch.randn(b, 16, L, 128, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
                   for _ in range(3))
        g = torch.randn(b, 16, L, 128, device="cuda", generator=gen).to(torch.bfloat16)
        row = {"batch": b, "tokens": L, "heads": 16, "head_dim": 128}
        for name, fn in (("flash", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
                         ("fused", lambda: sdpa(site, q, k, v, is_causal=True))):
            with torch.no_grad():
                row[f"{name}_fwd_ms"] = cuda_ms(fn, reps)
            row[f"{name}_fwd_bwd_ms"] = cuda_ms(lambda: fn().backward(g), reps)
        row["fwd_ratio"] = row["fused_fwd_ms"] / row["flash_fwd_ms"]
        row["fwd_bwd_ratio"] = row["fused_fwd_bwd_ms"] / row["flash_fwd_bwd_ms"]
        recs.append(row)
        print(row, flush=True)
    return recs


def sizes_arg(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        try:
            b, L = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"size {part!r} is not BATCHxTOKENS (e.g. 8x512)") from None
        if b < 1 or L < 2:
            raise argparse.ArgumentTypeError(f"size {part!r}: batch must be >= 1 and tokens >= 2")
        out.append((b, L))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=sizes_arg, default=list(SIZES), help="BATCHxTOKENS,... (default 8x512,4x2048,1x8192)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also torch.compile of float and tables")
    ap.add_argument("--written-out", action="store_true", help="also the tables with attention written out")
    ap.add_argument("--attention-only", action="store_true", help="only the fused attention against flash")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error(f"--reps {args.reps}: must be >= 1")
    if not torch.cuda.is_available():
        raise SystemExit("llm_speed needs CUDA: no GPU is visible to torch here")
    doc = {"machine": machine(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    doc["attention"] = attention_rows(args.sizes, args.reps)
    print_table(["batch x tokens", "flash fwd ms", "fused fwd ms", "ratio", "flash f+b ms", "fused f+b ms", "ratio"],
                [[f"{r['batch']}x{r['tokens']}", f"{r['flash_fwd_ms']:.3f}", f"{r['fused_fwd_ms']:.3f}",
                  f"{r['fwd_ratio']:.2f}", f"{r['flash_fwd_bwd_ms']:.3f}", f"{r['fused_fwd_bwd_ms']:.3f}",
                  f"{r['fwd_bwd_ratio']:.2f}"] for r in doc["attention"]])
    if not args.attention_only:
        doc["model"] = model_rows(args.sizes, args.reps, args.compile, args.written_out)
        print_table(["batch x tokens", "way", "infer ms", "x float", "train ms", "x float", "peak GiB (train)", "x float"],
                    [[f"{r['batch']}x{r['tokens']}", r["way"], f"{r.get('infer_s', float('nan')) * 1e3:.1f}",
                      f"{r.get('infer_ratio', 1.0):.2f}", f"{r.get('train_s', float('nan')) * 1e3:.1f}",
                      f"{r.get('train_ratio', 1.0):.2f}", f"{r.get('train_gib', float('nan')):.2f}",
                      f"{r.get('train_mem_ratio', 1.0):.2f}"] for r in doc["model"]])
    # the attention alone goes to its own file, leaving the model rows of a full run in place
    print(f"wrote {write_results('llm_speed_attention.json' if args.attention_only else 'llm_speed.json', doc)}")


if __name__ == "__main__":
    main()

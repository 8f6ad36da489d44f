"""A trained Hugging Face-class model with every non-linear call through tables.

Run: python -m bench.hf_trained [--minutes 3] [--qat-steps 150]

A small LlamaForCausalLM (byte vocabulary; RMSNorm, SiLU, rotary, SDPA attention: all met by
`replace_ops` as module swaps or call sites) trained from scratch on the fortunes corpus
(apt-get install fortunes) for a few CPU minutes; then bits per byte on the test split:
float, all call sites through tables after calibration, and after a short QAT with the tables
in place (straight-through backward), beside the float model fine-tuned for the same steps.
JSON to bench/results/hf_trained.json.
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F

from bench._common import machine, print_table, write_results
from ops import calibrate, replace_ops
from retnet_integration.data import eval_windows, load_corpus, random_windows

CONTEXT = 128


def make_model(seed: int = 0) -> torch.nn.Module:
    import transformers as T
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return T.LlamaForCausalLM(cfg)


def loss_of(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=windows[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), windows[:, 1:].reshape(-1))


def bpc(model: torch.nn.Module, windows: torch.Tensor, batch: int = 32) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            w = windows[i:i + batch]
            total += float(loss_of(model, w)) * len(w)
    return total / len(windows) / math.log(2)


def train(model: torch.nn.Module, stream: torch.Tensor, steps: int | None, seconds: float | None, lr: float,
          seed: int) -> int:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    t0, step = time.perf_counter(), 0
    while (steps is None or step < steps) and (seconds is None or time.perf_counter() - t0 < seconds):
        loss = loss_of(model, random_windows(stream, CONTEXT, 32, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
    return step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="float training time")
    ap.add_argument("--qat-steps", type=int, default=150)
    ap.add_argument("--windows", type=int, default=256, help="test windows of 128 bytes")
    args = ap.parse_args(argv)
    corpus = load_corpus()
    test = eval_windows(corpus.test, CONTEXT, args.windows)
    model = make_model()
    t0 = time.perf_counter()
    steps = train(model, corpus.train, None, 60 * args.minutes, 3e-3, seed=1)
    train_s = time.perf_counter() - t0
    bpc_float = bpc(model, test)
    tuned = copy.deepcopy(model)
    report = replace_ops(model)
    g = torch.Generator().manual_seed(2)
    calibrate(model, [{"input_ids": random_windows(corpus.train, CONTEXT, 16, g)[:, :-1]} for _ in range(8)],
              forward=lambda m, b: m(**b))
    bpc_tables = bpc(model, test)
    t1 = time.perf_counter()
    train(model, corpus.train, args.qat_steps, None, 3e-4, seed=3)
    qat_s = time.perf_counter() - t1
    bpc_qat = bpc(model, test)
    train(tuned, corpus.train, args.qat_steps, None, 3e-4, seed=3)
    bpc_tuned = bpc(tuned, test)
    def vs(b: float) -> str:
        return f"{100 * (b / bpc_float - 1):+.2f}%"

    rows = [["float", f"{bpc_float:.4f}", "-"],
            ["all call sites through tables", f"{bpc_tables:.4f}", vs(bpc_tables)],
            [f"float, fine-tuned {args.qat_steps} steps", f"{bpc_tuned:.4f}", vs(bpc_tuned)],
            [f"tables, QAT {args.qat_steps} steps", f"{bpc_qat:.4f}", vs(bpc_qat)]]
    print(report.coverage())
    print_table(["model", "test bpc", "vs float"], rows)
    doc = {"machine": machine(), "torch": torch.__version__, "model": "LlamaForCausalLM 4x128, bytes",
           "train_steps": steps, "train_seconds": train_s, "qat_steps": args.qat_steps, "qat_seconds": qat_s,
           "test_windows": len(test), "context": CONTEXT, "coverage": report.coverage(),
           "bpc_float": bpc_float, "bpc_tables": bpc_tables, "bpc_float_tuned": bpc_tuned, "bpc_qat": bpc_qat,
           "corpus": corpus.info}
    print(f"wrote {write_results('hf_trained.json', doc)}")


if __name__ == "__main__":
    main()

"""Quantization-aware fine-tuning with every table in place, on several processes.

    torchrun --standalone --nproc-per-node 2 -m bench.distributed_qat --backend gloo   # CPU
    torchrun --standalone --nproc-per-node N -m bench.distributed_qat --backend nccl   # N GPUs

Each rank converts the same model (the RetNet cpu preset through `quantize_`, all-lut; a
small LlamaForCausalLM through `replace_ops`), calibrates it on its own windows of the
fortunes corpus (the observers combine what every rank saw: ops/nn/sync.py), wraps it in
DistributedDataParallel and fine-tunes it. Rank 0 then leaves the process group and runs the
same fine-tune in one process on the combined batch, calibrated on every rank's windows.
The JSON holds the loss per step of both runs, every rank's digest of its scales and
learned thresholds (after calibration and after training), and the time per step of both.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from bench._common import machine, names_in, print_table, write_results

MODELS = ("retnet", "hf")
CONTEXT = 128


def _tokens(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=windows[:, :-1]) if not _is_retnet(model) else model(windows[:, :-1])
    logits = out.logits if hasattr(out, "logits") else out[0]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), windows[:, 1:].reshape(-1))


def _is_retnet(model: nn.Module) -> bool:
    from retnet_integration import RetNet
    inner = getattr(model, "module", model)
    return isinstance(inner, RetNet)


def build(name: str, calib: list[torch.Tensor], device: torch.device) -> nn.Module:
    """The converted, calibrated model (the same on every rank: seeded, then synced scales)."""
    torch.manual_seed(0)
    calib = [w.to(device) for w in calib]
    if name == "retnet":
        from retnet_integration import RetNet, quantize_
        from retnet_integration.experiments.pipeline import get_preset
        cfg, _ = get_preset("cpu")
        model = RetNet(cfg).to(device)
        quantize_(model, "all-lut", [w[:, :-1] for w in calib])
        return model
    import transformers as T
    from ops import calibrate, replace_ops
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = T.LlamaForCausalLM(cfg).to(device)
    replace_ops(model)
    calibrate(model, [{"input_ids": w[:, :-1]} for w in calib], forward=lambda m, b: m(**b))
    return model


def digest(model: nn.Module) -> str:
    """What must agree across ranks: every saved scale index and learned threshold or step."""
    state = getattr(model, "module", model).state_dict()
    keys = sorted(k for k in state if k.endswith(("scale_index", "log2_threshold", "qparam", "scale")))
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode())
        h.update(state[k].detach().cpu().double().numpy().tobytes())
    return h.hexdigest()[:16]


def windows_for(corpus, step: int, rank: int, batch: int) -> torch.Tensor:
    from retnet_integration.data import random_windows
    g = torch.Generator().manual_seed(10_000 * step + rank)
    return random_windows(corpus.train, CONTEXT, batch, g)


def fine_tune(model: nn.Module, batches, steps: int, device: torch.device,
              reduce: bool) -> tuple[list[float], float]:
    """AdamW steps; the loss of each step (averaged over ranks where `reduce`), ms per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, start = [], 0.0
    for step in range(steps):
        if step == 1:  # the first step builds kernels and buffers: timed from the second on
            start = time.perf_counter()
        loss = _tokens(model, batches(step).to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = loss.detach().clone()
        if reduce:
            dist.all_reduce(value)
            value /= dist.get_world_size()
        losses.append(float(value))
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3 / max(steps - 1, 1)
    return losses, ms


def main(argv: list[str] | None = None) -> int:
    from gqa_lut.errors import UsageError
    try:
        return run(argv)
    except UsageError as exc:  # one line, exit 2
        print(f"bench.distributed_qat: error: {exc}", file=sys.stderr)
        return 2


def run(argv: list[str] | None = None) -> int:
    from gqa_lut.cli_support import Parser
    p = Parser(prog="torchrun ... -m bench.distributed_qat", description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    p.add_argument("--models", type=names_in(MODELS), default=list(MODELS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="windows per rank and step")
    p.add_argument("--out", default=None, help="JSON under bench/results (default distributed_qat_<backend>.json)")
    args = p.parse_args(argv)
    if args.steps < 2 or args.batch < 1:
        p.error(f"--steps {args.steps} / --batch {args.batch}: at least 2 steps and 1 window")
    if "RANK" not in os.environ:
        p.error("run under torchrun: torchrun --standalone --nproc-per-node 2 -m bench.distributed_qat")
    from retnet_integration.data import load_corpus
    corpus = load_corpus()
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" else \
        torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    calib = {r: [windows_for(corpus, -1 - i, r, args.batch) for i in range(4)] for r in range(world)}
    rows = []
    for name in args.models:
        model = build(name, calib[rank], device)
        calibrated = digest(model)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        losses, ms = fine_tune(ddp, lambda s: windows_for(corpus, s, rank, args.batch), args.steps, device, True)
        digests = [None] * world
        dist.all_gather_object(digests, [calibrated, digest(model)])
        rows.append({"model": name, "losses": losses, "ms_per_step": ms, "rank_digests": digests,
                     "ranks_agree": all(d == digests[0] for d in digests)})
    dist.destroy_process_group()  # rank 0's reference below: one process, no collectives
    if rank != 0:
        return 0
    for row in rows:
        union = [w for r in range(world) for w in calib[r]]
        model = build(row["model"], union, device)
        combined = lambda s: torch.cat([windows_for(corpus, s, r, args.batch) for r in range(world)])  # noqa: E731
        single, ms = fine_tune(model, combined, args.steps, device, False)
        row.update(single_process_losses=single, single_process_ms_per_step=ms,
                   single_process_digest=digest(model),
                   max_loss_rel_diff=max(abs(a - b) / abs(b) for a, b in zip(row["losses"], single)))
    doc = {"benchmark": "distributed_qat", "backend": args.backend, "world": world, "steps": args.steps,
           "batch_per_rank": args.batch, "context": CONTEXT, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "machine": machine(),
           "command": f"torchrun --standalone --nproc-per-node {world} -m bench.distributed_qat --backend "
                      f"{args.backend} --steps {args.steps} --batch {args.batch}",
           "rows": rows}
    path = write_results(args.out or f"distributed_qat_{args.backend}.json", doc)
    print_table(["model", "ranks agree", "loss first/last (ranks)", "loss last (1 process)", "max rel diff",
                 "ms/step ranks", "ms/step 1 process"],
                [[r["model"], "yes" if r["ranks_agree"] else "NO", f"{r['losses'][0]:.4f} / {r['losses'][-1]:.4f}",
                  f"{r['single_process_losses'][-1]:.4f}", f"{r['max_loss_rel_diff']:.2e}", f"{r['ms_per_step']:.0f}",
                  f"{r['single_process_ms_per_step']:.0f}"] for r in rows])
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    code = main()
    # gloo's threads can abort the interpreter's teardown (exit -6) after the JSON is written
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

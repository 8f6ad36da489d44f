"""One rank of tests/test_distributed.py, started under torchrun (gloo, 2 processes):
`python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py CASE OUT`.
Each rank writes OUT/rank<r>.json (and, for "dcp", a checkpoint and its outputs).

Cases: "calibrate" (different data per rank, a module one rank never runs), "ddp" and "fsdp"
(5 training steps with learned scales against one process with the combined batch, every rank
computing that reference itself), "dcp" (an FSDP2 model saved with torch.distributed.checkpoint).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops import calibrate, replace_ops  # noqa: E402
from ops.nn import LUTActivation, LUTGELU, LUTLayerNorm, LUTSiLU  # noqa: E402

STEPS, BATCH = 5, 8


class Branch(nn.Module):
    """A tanh that runs only where `on` (a rank that never routes to it still needs its scale)."""

    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()
        self.on = True

    def forward(self, x):
        return self.act(x) if self.on else x


def converted() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.LayerNorm(32), Branch(), nn.Linear(32, 32), nn.SiLU(),
                      nn.Linear(32, 4), nn.Softmax(-1))
    replace_ops(m)
    return m


def learned() -> nn.Sequential:
    """Drop-ins with learned (TQT) input scales: parameters DDP averages and FSDP2 shards."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), LUTGELU(scale_mode="learned"), LUTLayerNorm(32), nn.Linear(32, 32),
                         LUTSiLU(scale_mode="learned"), nn.Linear(32, 4))


def batches(rank: int, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(16, 8, generator=g) * (1 + 3 * rank) for _ in range(n)]


def scales(m: nn.Module) -> dict[str, int]:
    return {n: mod.scale for n, mod in m.named_modules() if isinstance(mod, LUTActivation)}


def step_data(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 8, generator=g) * 2, torch.randn(BATCH, 4, generator=g)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def case_calibrate(rank: int, world: int) -> dict:
    m = converted()
    m[3].on = rank == 0
    calibrate(m, batches(rank))
    union = converted()
    calibrate(union, [b for r in range(world) for b in batches(r)])
    return {"scales": scales(m), "union": scales(union), "swaps": [s.new for s in m._gqa_lut_report.swaps]}


def calib_tokens(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(200 + rank)
    return [torch.randint(0, 256, (4, 16), generator=g) for _ in range(2)]


def retnet(calib: list[torch.Tensor], spec: str) -> nn.Module:
    """A tiny RetNet through `quantize_` (all-lut: W8A8 and every LUT op)."""
    from retnet_integration import RetNet, RetNetConfig, quantize_
    torch.manual_seed(0)
    net = RetNet(RetNetConfig(d_model=32, n_layers=1, n_heads=2))
    quantize_(net, "all-lut", calib, spec=spec)
    return net


def train_alone(kind: str, world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, no process group: calibrated on every rank's data, trained on the combined
    batch (the reference for LSQ, whose gradient scale counts the whole batch's elements)."""
    ref = retnet([b for r in range(world) for b in calib_tokens(r)], kind.split("-")[1])
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    losses = [combined_step(ref, opt, kind, step, world) for step in range(STEPS)]
    return losses, {n: p.detach() for n, p in ref.named_parameters()}


def combined_step(model: nn.Module, opt, kind: str, step: int, world: int) -> float:
    """One SGD step on every rank's batch of this step at once; its loss."""
    xs, ys = zip(*(_data(kind, step, r) for r in range(world)))
    loss = _loss(model, torch.cat(xs), torch.cat(ys))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.int64:  # tokens: next-token cross entropy
        return nn.functional.cross_entropy(model(x)[0].flatten(0, 1), y.flatten())
    return nn.functional.mse_loss(model(x), y)


def _data(kind: str, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "lut":
        return step_data(step, rank)
    g = torch.Generator().manual_seed(1000 * step + rank)
    t = torch.randint(0, 256, (4, 17), generator=g)
    return t[:, :-1], t[:, 1:]


def train(wrap: str, rank: int, world: int, kind: str = "lut", out: Path | None = None) -> dict:
    if kind == "lut":
        m = learned()
        calibrate(m, batches(rank))
    else:  # "retnet-tqt", "retnet-lsq", "retnet-pact": the RetNet's own quantizers
        m = retnet(calib_tokens(rank), kind.split("-")[1])
    ref = copy.deepcopy(m)  # calibrated alike on every rank (synced), trained on the combined batch
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(m)
    else:
        from torch.distributed.fsdp import fully_shard
        for layer in m.modules() if kind == "lut" else ():
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        model = fully_shard(m)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    losses, ref_losses = [], []
    for step in range(STEPS):
        x, y = _data(kind, step, rank)
        loss = _loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
        ref_losses.append(combined_step(ref, ref_opt, kind, step, world))
    params = {n: _full(p.detach()) for n, p in m.named_parameters()}
    if out is not None:
        torch.save(params, out / f"params{rank}.pt")
    diff = max(float((params[n] - p.detach()).abs().max()) for n, p in ref.named_parameters())
    thresholds = [params[n].reshape(-1).tolist() for n in sorted(params)
                  if n.endswith(("log2_threshold", "qparam", "weight_step"))]
    digest = hashlib.sha256(json.dumps([scales(m), thresholds]).encode()).hexdigest()
    return {"losses": losses, "ref_losses": ref_losses, "max_param_diff": diff, "thresholds": thresholds,
            "digest": digest, "scales": scales(m)}


def case_dcp(rank: int, world: int, out: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    m = converted()
    calibrate(m, batches(rank))
    for layer in m:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(m)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = m(x)
    dcp.save(get_model_state_dict(m), checkpoint_id=str(out / "ckpt"))
    if rank == 0:
        torch.save({"x": x, "y": y}, out / "outputs.pt")
    return {"scales": scales(m)}


def main() -> None:
    case, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if case == "calibrate":
        doc = case_calibrate(rank, world)
    elif case in ("ddp", "fsdp"):
        doc = train(case, rank, world)
    elif case.startswith(("ddp-retnet", "fsdp-retnet")):
        wrap, kind = case.split("-", 1)
        doc = train(wrap, rank, world, kind, out)
    elif case == "dcp":
        doc = case_dcp(rank, world, out)
    else:
        raise SystemExit(f"case {case!r} is not allowed: calibrate, ddp, fsdp, dcp, ddp-retnet-<q>, fsdp-retnet-<q>")
    (out / f"rank{rank}.json").write_text(json.dumps(doc))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # gloo's threads can abort the interpreter's own teardown ("terminate called without an
    # active exception", exit -6) after everything is written: leave without it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

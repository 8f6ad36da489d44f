"""Calibration under torch.distributed: every rank observes its own batches, and what each
observer saw is combined over the default process group before any scale is chosen, so that
every rank chooses the same scales and keeps the same swaps. Outside an initialised process
group of more than one rank every function here is the identity.

Why by hand: DDP copies rank 0's buffers once, at wrap time (after calibration they would
already differ), and FSDP2 syncs no buffers at all. Maxima and sums are exact in any order,
so the result is bit-equal on every rank.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def world_size() -> int:
    """Ranks of the default process group, 1 where there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _device() -> torch.device:
    """Where the backend takes its tensors: CUDA for NCCL, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_max_(t: torch.Tensor) -> torch.Tensor:
    """t replaced in place by its elementwise maximum over ranks (-inf and NaN-free inputs)."""
    if world_size() > 1:
        work = t.detach().to(_device(), torch.float64)
        dist.all_reduce(work, op=dist.ReduceOp.MAX)
        t.copy_(work.to(t.device, t.dtype))
    return t


def all_max_shape(t: torch.Tensor, fill: float) -> torch.Tensor:
    """The elementwise maximum over ranks of tensors that may differ in shape where a rank saw
    nothing: a 0-d `fill` on such a rank takes the others' shape (per-channel statistics)."""
    if world_size() <= 1:
        return t
    n = torch.tensor([t.numel() if t.dim() else 0], dtype=torch.int64, device=_device())
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    width = int(n)
    if width and t.dim() == 0:
        t = torch.full((width,), fill, dtype=t.dtype, device=t.device)
    out = t.clone()
    return all_max_(out)


def _reduced(values: list[float], op: dist.ReduceOp) -> list[float]:
    """A few numbers reduced over ranks in float64 (exact for counts and flags)."""
    work = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(work, op=op)
    return work.cpu().tolist()


def all_sum(values: list[float]) -> list[float]:
    """The sums over ranks of a few numbers (float64: exact for counts, and the same on every rank)."""
    return _reduced(values, dist.ReduceOp.SUM) if world_size() > 1 else list(values)


def any_rank(flags: list[bool]) -> list[bool]:
    """Each flag true where it is true on any rank (a swap one rank rejects is undone on all)."""
    if world_size() <= 1 or not flags:
        return list(flags)
    return [v > 0 for v in _reduced([float(f) for f in flags], dist.ReduceOp.MAX)]


def all_gather_rows(t: Optional[torch.Tensor], width: int) -> Optional[torch.Tensor]:
    """Every rank's rows (n_r, width) concatenated in rank order (samples for a percentile);
    a rank without rows gives none. None where no rank has any."""
    if world_size() <= 1:
        return t
    mine = t if t is not None else torch.zeros((0, width))
    parts: list[Optional[torch.Tensor]] = [None] * world_size()
    dist.all_gather_object(parts, mine.cpu())
    rows = [p for p in parts if p is not None and p.numel()]
    return torch.cat(rows, 0) if rows else None

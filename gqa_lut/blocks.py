"""Block starts: shared tables in which groups of scales own their own runs of lines.

Strictly increasing integer breakpoints let a scale move on by at most one line per code, and
every scale meets the lines in the same order. So a coarse scale (9 codes at d = 0 for
[-4, 4]) walks a consecutive block of at most 9 lines, and if the lines are laid out along x
as the fine scales want them, each coarse code lands on a line made for somewhere else
(gelu at 16 segments: 3.9e-5, 11x the bound, from every local start we tried). The way
out is a layout: each group of neighbouring scales owns a block of lines (a whole table,
with its own copies of the tails) and parks the other blocks outside its range, where no
code is scored. Local steps never find such a layout (a line would have to jump from one
block to another), so these starts build it: for each split of the scales into a coarse and
a fine group and each split of the N lines between them, a block's lines are the exact
optimum of one of its scales with that many lines. The alternation first keeps every scale
on its own block, then runs free; the best few are polished. gelu at 16 segments: 7.92e-6.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from gqa_lut.exact import free_segments, scale_lines, with_tails
from gqa_lut.localsearch import Population, exact_alternation, resegment
from gqa_lut.problem import Problem

MAX_GROUPS = 2  # three groups never won on gelu, exp or hswish at 16 segments, at 25x the layouts
SIZE_STEPS = 16  # block sizes are multiples of N / 16 past 16 segments: about as many layouts as at 16
MAX_SEGMENTS = 64  # beyond, each layout's alternation costs O(N) more; the N/2 fit brings its layout up


def _groups(rows: list[int], count: int) -> Iterator[list[list[int]]]:
    """Every split of the scales (coarse to fine) into `count` contiguous groups."""
    for cuts in itertools.combinations(range(1, len(rows)), count - 1):
        bounds = (0, *cuts, len(rows))
        yield [rows[a:b] for a, b in itertools.pairwise(bounds)]


def _sizes(total: int, count: int, least: int) -> Iterator[tuple[int, ...]]:
    """Every way to give `count` blocks at least `least` of `total` lines each, all lines used."""
    for cuts in itertools.combinations(range(1, total), count - 1):
        sizes = tuple(b - a for a, b in itertools.pairwise((0, *cuts, total)))
        if min(sizes) >= least:
            yield sizes


def layouts(problem: Problem) -> list[tuple[list[list[int]], tuple[int, ...]]]:
    """(groups, block sizes) for every layout with 2..MAX_GROUPS groups, blocks in the groups'
    order, coarse first (the other order gave the same tables). A block holds a whole table of
    its group, pinned tails included, so sizes sum to N. Past 16 segments the sizes step by
    N / 16: the N/2 fit's layout, lines doubled, is not one its local steps can leave (a
    doubled line never splits), and gelu at 32 segments went from 7.92e-6 (the 16-segment
    table) to 2.95e-6 with its own layouts. None past MAX_SEGMENTS."""
    if problem.segments > MAX_SEGMENTS:
        return []
    rows = [int(r) for r in np.argsort(problem.dscale)]
    N = problem.segments
    step = max(1, N // SIZE_STEPS)
    least = N - free_segments(problem) + 1  # the tails and at least one free line
    out = []
    for count in range(2, min(MAX_GROUPS, len(rows), N // least) + 1):
        for groups in _groups(rows, count):
            for sizes in _sizes(N, count, least):
                if all(size % step == 0 for size in sizes):
                    out.append((groups, sizes))
    return out


def _group_table(problem: Problem, rows: list[int], segments: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A table of `segments` lines for a group of scales, pinned tails included: the exact
    optimum of its middle scale (sharing it with the group is the alternation's job; starting
    from every scale's optimum and alternating on the group first found nothing better)."""
    n = segments - (problem.segments - free_segments(problem))
    found = scale_lines(problem, rows[len(rows) // 2], n)
    if found is None:
        return None
    K, B = with_tails(problem, found[1][None], found[2][None])
    return K[0], B[0]


def block_starts(problem: Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lines (M, N) and the lines each scale may use for its scored codes (M, D, N) of every
    layout; empty when the exact per-scale optima are not available."""
    N, D = problem.segments, problem.dscale.size
    empty = np.zeros((0, N), np.int64), np.zeros((0, N), np.int64), np.zeros((0, D, N), bool)
    tables: dict[tuple[tuple[int, ...], int], tuple[np.ndarray, np.ndarray] | None] = {}
    Ks, Bs, allowed = [], [], []
    for groups, sizes in layouts(problem):
        K, B = [], []
        mask = np.zeros((D, N), dtype=bool)
        at = 0
        for group, size in zip(groups, sizes):
            key = (tuple(group), size)
            if key not in tables:
                tables[key] = _group_table(problem, group, size)
            if tables[key] is None:
                return empty
            K.append(tables[key][0])
            B.append(tables[key][1])
            mask[group, at:at + size] = True
            at += size
        Ks.append(np.concatenate(K))
        Bs.append(np.concatenate(B))
        allowed.append(mask)
    if not Ks:
        return empty
    return np.stack(Ks).astype(np.int64), np.stack(Bs).astype(np.int64), np.stack(allowed)


def best_layouts(problem: Problem) -> Population:
    """Tables grown from every layout, best first: alternation confined to each layout's blocks,
    then free. Empty when there is nothing to start from (one scale, minimax, past MAX_SEGMENTS)."""
    K, B, allowed = block_starts(problem)
    if K.shape[0] == 0:
        return Population(K, B, np.zeros((0, problem.dscale.size, problem.segments - 1), np.int64), np.zeros(0))
    idx, fit = resegment(problem, K, B, allowed)
    pop = exact_alternation(problem, Population(K, B, idx, fit), allowed=allowed)
    idx, fit = resegment(problem, pop.K, pop.B)
    pop = exact_alternation(problem, Population(pop.K, pop.B, idx, fit))
    return pop.take(np.argsort(pop.fitness, kind="stable"))

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
from gqa_lut.seeding import union_tables

MAX_GROUPS = 2  # three groups never won on gelu, exp or hswish at 16 segments, at 25x the layouts
SIZE_STEPS = 16  # block sizes are multiples of N / 16 past 16 segments: about as many layouts as at 16
MAX_SEGMENTS = 64  # beyond, each layout's alternation costs O(N) more; the N/2 fit brings its layout up
# Past 16 segments: three groups too (their block sizes multiples of N / 8), each group of
# several scales also starting from its own shared-breakpoint optimum (seeding.union_tables),
# and only the SHORTLIST of those whose starts score best get the alternation. gelu at 64
# segments, frac_bits 6: 2.95e-6 (the 32-segment table) -> 2.51e-6 (gqa-lut fit).
WIDE_SEGMENTS = 16
WIDE_MAX_GROUPS = 3
WIDE_SIZE_STEPS = {2: 16, 3: 8}
SHORTLIST = 48


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
    wide = N > WIDE_SEGMENTS
    least = N - free_segments(problem) + 1  # the tails and at least one free line
    out = []
    for count in range(2, min(WIDE_MAX_GROUPS if wide else MAX_GROUPS, len(rows), N // least) + 1):
        step = max(1, N // (WIDE_SIZE_STEPS[count] if wide else SIZE_STEPS))
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


def _stack(layouts_: list, source: dict, D: int, N: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lines (M, N) of each layout from the blocks' tables in `source`, and the lines each scale
    may use for its scored codes (M, D, N)."""
    Ks, Bs, allowed = [], [], []
    for groups, sizes in layouts_:
        mask = np.zeros((D, N), dtype=bool)
        at = 0
        for group, size in zip(groups, sizes):
            mask[group, at:at + size] = True
            at += size
        Ks.append(np.concatenate([source[(tuple(g), n)][0] for g, n in zip(groups, sizes)]))
        Bs.append(np.concatenate([source[(tuple(g), n)][1] for g, n in zip(groups, sizes)]))
        allowed.append(mask)
    if not Ks:
        return np.zeros((0, N), np.int64), np.zeros((0, N), np.int64), np.zeros((0, D, N), bool)
    return np.stack(Ks).astype(np.int64), np.stack(Bs).astype(np.int64), np.stack(allowed)


def block_starts(problem: Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lines (M, N) and the lines each scale may use for its scored codes (M, D, N) of every
    layout of up to MAX_GROUPS groups, each block from its middle scale's optimum; empty when
    the exact per-scale optima are not available."""
    N, D = problem.segments, problem.dscale.size
    chosen = [lay for lay in layouts(problem) if len(lay[0]) <= MAX_GROUPS]
    tables: dict[tuple[tuple[int, ...], int], tuple[np.ndarray, np.ndarray] | None] = {}
    for groups, sizes in chosen:
        for group, size in zip(groups, sizes):
            key = (tuple(group), size)
            if key not in tables:
                tables[key] = _group_table(problem, group, size)
            if tables[key] is None:
                return _stack([], {}, D, N)
    return _stack(chosen, tables, D, N)


def wide_starts(problem: Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Past WIDE_SEGMENTS, the layouts of WIDE_MAX_GROUPS groups with each block of several
    scales from the group's shared-breakpoint optimum (seeding.union_tables; a single scale's
    block from its own optimum), as block_starts gives them."""
    N, D = problem.segments, problem.dscale.size
    if N <= WIDE_SEGMENTS:
        return _stack([], {}, D, N)
    chosen = [lay for lay in layouts(problem) if len(lay[0]) > MAX_GROUPS]
    source: dict[tuple[tuple[int, ...], int], tuple[np.ndarray, np.ndarray]] = {}
    wanted: dict[tuple[int, ...], set[int]] = {}
    for groups, sizes in chosen:
        for group, size in zip(groups, sizes):
            if len(group) > 1:
                wanted.setdefault(tuple(group), set()).add(size)
            elif (tuple(group), size) not in source:
                found = _group_table(problem, group, size)
                if found is None:
                    return _stack([], {}, D, N)
                source[(tuple(group), size)] = found
    for group, ns in wanted.items():
        for n, table in union_tables(problem, list(group), sorted(ns)).items():
            source[(group, n)] = table
    return _stack(chosen, source, D, N)


def scale_optima(problem: Problem, rows: list[int], most: int) -> np.ndarray | None:
    """optima[i, n]: scale rows[i] alone with n = 0..most free lines (its exact optimum, never
    worse with more lines); None when a scale's exact optimum is not available."""
    out = np.zeros((len(rows), most + 1))
    for i, r in enumerate(rows):
        for n in range(most + 1):
            found = scale_lines(problem, r, n)
            if found is None:
                return None
            out[i, n] = found[0]
    return out


def scale_block_sizes(optima: np.ndarray, lines: int, least: int = 1) -> tuple[float, list[int]] | None:
    """The split of `lines` free lines over the scales that minimises the summed optima, each
    scale at least `least` lines (optima[s, n]: scale s alone with n free lines, non-increasing in
    n, so using every line is never worse than leaving some; a knapsack): its cost and each
    scale's share; None when the lines do not give every scale its least."""
    S = optima.shape[0]
    if lines < least * S:
        return None
    best = np.full(lines + 1, np.inf)
    best[least:] = optima[0, least:lines + 1]
    choice = [np.arange(lines + 1)]
    for s in range(1, S):
        nxt, pick = np.full(lines + 1, np.inf), np.zeros(lines + 1, np.int64)
        for m in range((s + 1) * least, lines + 1):
            n = np.arange(least, m - s * least + 1)  # this scale's lines; the earlier ones keep their least
            total = best[m - n] + optima[s, n]
            j = int(np.argmin(total))
            nxt[m], pick[m] = total[j], n[j]
        best, choice = nxt, choice + [pick]
    shares, m = [], lines
    for s in range(S - 1, 0, -1):
        shares.append(int(choice[s][m]))
        m -= shares[-1]
    shares.append(m)
    return float(best[lines]), shares[::-1]


def scale_blocks(problem: Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The layout in which every scale owns a block (its exact optimum with its share of the
    lines, pinned tails copied into each block) and parks the others, the shares from
    `scale_block_sizes`. It shares no line, which the other layouts do; past 64 segments it is
    what still buys error: a coarse scale's optimum stops improving after a few lines, so the
    lines the N/2 layout gives it are better spent on the fine scales (gelu at 256 segments:
    2.51e-6, the 64-segment table, against 2.13e-6 for this split of 256 lines; bench.sharing_bound).
    Empty when the lines do not reach every scale or the exact optima are not available."""
    N, D = problem.segments, problem.dscale.size
    tails = N - free_segments(problem)
    rows = [int(r) for r in np.argsort(problem.dscale)]
    lines = N - D * tails
    if D < 2 or lines < D:
        return _stack([], {}, D, N)
    optima = scale_optima(problem, rows, lines)
    split = None if optima is None else scale_block_sizes(optima, lines)
    if split is None:
        return _stack([], {}, D, N)
    groups, sizes = [[r] for r in rows], tuple(n + tails for n in split[1])
    source = {((r,), size): _group_table(problem, [r], size) for r, size in zip(rows, sizes)}
    return _stack([(groups, sizes)], source, D, N)


def best_layouts(problem: Problem) -> Population:
    """Tables grown from every layout, best first: alternation confined to each layout's blocks,
    then free. Past WIDE_SEGMENTS the wide starts join, the SHORTLIST whose starts score best
    of them; at every size the one-block-per-scale layout. Empty when there is nothing to start
    from (one scale, minimax)."""
    K, B, allowed = block_starts(problem)
    if K.shape[0]:
        idx, fit = resegment(problem, K, B, allowed)
    else:
        idx, fit = np.zeros((0, problem.dscale.size, problem.segments - 1), np.int64), np.zeros(0)
    sK, sB, sallowed = scale_blocks(problem)
    if sK.shape[0]:
        sidx, sfit = resegment(problem, sK, sB, sallowed)
        K, B, allowed = np.concatenate([K, sK]), np.concatenate([B, sB]), np.concatenate([allowed, sallowed])
        idx, fit = np.concatenate([idx, sidx]), np.concatenate([fit, sfit])
    wK, wB, wallowed = wide_starts(problem)
    if wK.shape[0]:
        widx, wfit = resegment(problem, wK, wB, wallowed)
        keep = np.argsort(wfit, kind="stable")[:SHORTLIST]
        K, B, allowed = np.concatenate([K, wK[keep]]), np.concatenate([B, wB[keep]]), np.concatenate([allowed, wallowed[keep]])
        idx, fit = np.concatenate([idx, widx[keep]]), np.concatenate([fit, wfit[keep]])
    if K.shape[0] == 0:
        return Population(K, B, idx, fit)
    pop = exact_alternation(problem, Population(K, B, idx, fit), allowed=allowed)
    idx, fit = resegment(problem, pop.K, pop.B)
    pop = exact_alternation(problem, Population(pop.K, pop.B, idx, fit))
    return pop.take(np.argsort(pop.fitness, kind="stable"))

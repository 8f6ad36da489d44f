"""Deterministic starting tables: the optimal shared-breakpoint segmentation of the union grid.

With no output rounding a line's error at x does not depend on the scale x came from, and
every scale's inputs lie on one common grid. A table whose breakpoints are the same real
numbers at every scale is therefore one segmentation of that union grid, each point weighted
by the scales that see it, and an interval DP over prefix moments finds the best such
segmentation with integer lines exactly. Per-scale breakpoints (the local search) then only
improve on it. This is the deterministic route a careful engineer would try first; seeding
the GA with it means the GA can only add.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np

from gqa_lut.exact import exact_lines
from gqa_lut.linefit import best_intercepts, least_squares_slope, moment_terms, pin_tails, quadratic_error, slope_window
from gqa_lut.problem import Problem

MAX_UNION_POINTS = 640  # the interval DP is O(T^2 N) in time and O(T^2) in memory


def union_blocks(problem: Problem, max_points: int = MAX_UNION_POINTS,
                 rows: Optional[Sequence[int]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact weighted moments (T, 6) of the union grid (of the scales `rows`, all by default) in
    at most `max_points` blocks, and each block's largest x (the real breakpoint that ends a
    segment at that block)."""
    sel = problem.inside
    if rows is not None:
        sel = sel & np.isin(np.arange(sel.shape[0]), list(rows))[:, None]
    xs, ws = problem.x[sel], problem.w[sel]
    ux, inv = np.unique(xs, return_inverse=True)
    uw = np.bincount(inv, weights=ws)
    with np.errstate(all="ignore"):
        uf = problem.fn(ux)
    g = max(1, -(-ux.shape[0] // max_points))
    block = np.arange(ux.shape[0]) // g
    mom = np.stack([np.bincount(block, weights=c) for c in moment_terms(uw, ux, uf)], axis=1)
    right = ux[np.minimum((np.arange(block[-1] + 1) + 1) * g, ux.shape[0]) - 1]
    return mom, right


def _interval_costs(problem: Problem, S: np.ndarray, fixed: tuple[int, int] | None) -> np.ndarray:
    """Best integer-line cost of every interval from its moments S (6, ...)."""
    F, pmin, pmax = problem.frac_bits, problem.pmin, problem.pmax
    if fixed is not None:
        return quadratic_error(S, np.float64(fixed[0]), np.float64(fixed[1]), F)
    k, _ = least_squares_slope(S)
    best = np.full(S[0].shape, np.inf)
    for K in slope_window(k, F, pmin, pmax):
        best = np.minimum(best, quadratic_error(S, K, best_intercepts(S, K, F, pmin, pmax), F))
    return np.where(S[0] > 0, best, 0.0)


def union_breakpoints(problem: Problem) -> np.ndarray:
    """Real breakpoints (N-1,) of the optimal shared-breakpoint table (ties: x <= p goes left)."""
    mom, right = union_blocks(problem)
    cuts = _union_cuts(problem, mom, [problem.segments])[problem.segments]
    x_first = right[0] - 1.0  # empty leading segments end below every point
    return np.array([right[c - 1] if c > 0 else x_first for c in cuts], dtype=np.float64)


def union_tables(problem: Problem, rows: Sequence[int], sizes: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For each of `sizes`, the optimal shared-breakpoint table of that many lines (pinned
    tails included) for the scales `rows` alone, as lines (K, B): each segment's integer line
    is the exact one for its points pooled over those scales. One DP serves every size (a block
    of a layout, gqa_lut.blocks, whose scales share their lines)."""
    mom, _ = union_blocks(problem, rows=rows)
    P = np.vstack([np.zeros((1, 6)), np.cumsum(mom, axis=0)])
    out = {}
    for n, cuts in _union_cuts(problem, mom, sizes).items():
        bounds = [0, *cuts, mom.shape[0]]
        S = np.stack([P[b] - P[a] for a, b in zip(bounds[:-1], bounds[1:])], axis=1)  # (6, n)
        K, B, _ = exact_lines(S[:, None], problem.frac_bits, problem.pmin, problem.pmax)
        K, B = K.astype(np.int64), B.astype(np.int64)
        pin_tails(problem, K, B)
        out[n] = (K[0], B[0])
    return out


def _union_cuts(problem: Problem, mom: np.ndarray, sizes: Sequence[int]) -> dict[int, list[int]]:
    """For each N of `sizes` (>= 2), the first block of each segment after the first (N - 1) of
    the optimal segmentation of the blocks with moments `mom` into N segments, the pinned tails
    opening and closing it: one DP over segments, closed at each size."""
    T = mom.shape[0]
    P = np.vstack([np.zeros((1, 6)), np.cumsum(mom, axis=0)])  # prefix moments, (T+1, 6)
    S = (P[None, :, :] - P[:, None, :]).transpose(2, 0, 1)  # S[:, s, t] = points s..t-1
    valid = np.triu(np.ones((T + 1, T + 1), dtype=bool))
    free = np.where(valid, _interval_costs(problem, S, None), np.inf)
    left = _interval_costs(problem, S[:, 0, :], problem.left_tail) if problem.left_tail else free[0]
    right_c = (_interval_costs(problem, S[:, :, T], problem.right_tail) if problem.right_tail
               else free[:, T])
    dp = left.copy()  # dp[t]: best cost of points 0..t-1 in segments 0..i
    top = max(sizes)
    back = np.zeros((top, T + 1), dtype=np.int64)
    out: dict[int, list[int]] = {1: []} if 1 in sizes else {}
    for i in range(1, top):
        if i + 1 in sizes:  # close with the last segment here: N = i + 1 segments
            last = dp + right_c
            s = int(np.argmin(last))
            cuts = [s]
            for j in range(i - 1, 0, -1):
                s = int(back[j, s])
                cuts.append(s)
            out[i + 1] = cuts[::-1]  # cuts[j]: first block of segment j+1
        if i == top - 1:
            break
        tot = dp[:, None] + free
        back[i] = np.argmin(tot, axis=0)
        dp = tot[back[i], np.arange(T + 1)]
    return out

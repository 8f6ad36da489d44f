"""Breakpoints: decoding real genomes to integer breakpoints, and the optimal placement by DP.

With the lines fixed, the best integer breakpoints of one scale are an exact shortest-path
problem: walk the scale's positions in order, each position either stays in the current
segment or moves to the next one (strictly increasing integer breakpoints allow no bigger
jump). The DP runs over positions only; population, scales and segments are array axes.
"""
from __future__ import annotations

import numpy as np

from gqa_lut.problem import OUTSIDE_CAP, Problem


def _shifts(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    d = problem.dscale
    return np.maximum(-d, 0), np.maximum(d, 0)


def line_outputs(problem: Problem, K: np.ndarray, B: np.ndarray) -> np.ndarray:
    """(T, M, D, N) real output of every line at every position, with the spec's integer
    rounding, laid out in the order the DP sweeps (positions first), so nothing is transposed."""
    left, right = _shifts(problem)
    codes = (problem.code << left[:, None]).T[:, None, :, None]
    acc = K[None, :, None, :] * codes + (B[None, :, None, :] << right[None, None, :, None])
    return _to_real(problem, acc, right[None, None, :, None])


def assigned_outputs(problem: Problem, seg: np.ndarray, K: np.ndarray, B: np.ndarray) -> np.ndarray:
    """(M, D, T) output of each position's own segment."""
    left, right = _shifts(problem)
    m = np.arange(seg.shape[0])[:, None, None]
    acc = K[m, seg] * (problem.code << left[:, None]) + (B[m, seg] << right[:, None])
    return _to_real(problem, acc, right[:, None])


def _to_real(problem: Problem, acc: np.ndarray, right: np.ndarray) -> np.ndarray:
    s = problem.frac_bits + right
    if problem.output is None:  # times an exact power of two: the same float as ldexp, faster
        return acc.astype(np.float64) * np.ldexp(1.0, -s)
    t = s - problem.output.frac_bits
    up = np.maximum(t, 0)
    half = np.where(up > 0, np.left_shift(1, np.maximum(up - 1, 0)), 0)
    y = np.where(t > 0, (acc + half) >> up, acc << np.maximum(-t, 0))
    lo, hi = -(1 << (problem.output.bits - 1)), (1 << (problem.output.bits - 1)) - 1
    return np.ldexp(np.clip(y, lo, hi).astype(np.float64), -problem.output.frac_bits)


def position_costs(problem: Problem, outputs: np.ndarray) -> np.ndarray:
    """Cost of each position under each line, (T, M, D, N) like `outputs`.

    Inside the range: the objective's own term. Seen codes outside it: a capped tie-break
    (problem.OUTSIDE_WEIGHT). Unseen positions: 0, however far off the line is there."""
    err = outputs - problem.f.T[:, None, :, None]
    cap = np.where(problem.inside, np.inf, OUTSIDE_CAP).T[:, None, :, None]
    if problem.objective == "mse":  # w and w_out never overlap: one weight, capped outside only
        return (problem.w + problem.w_out).T[:, None, :, None] * np.minimum(err * err, cap)
    return problem.wmax.T[:, None, :, None] * np.minimum(np.abs(err), cap)


def place(cost: np.ndarray, start: np.ndarray, is_max: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Optimal breakpoint positions for each individual and scale: (M, D, N-1) indices t
    (a breakpoint after position t) and the objective they reach (M,).

    cost: (T, M, D, N), the cost of position t of scale d in segment i. start: (D,), positions
    up to start[d] are forced into segment 0. Ends in segment N-1; each step moves 0 or 1."""
    T, M, D, N = cost.shape
    dp = np.full((M, D, N), np.inf)
    dp[..., 0] = 0.0
    choice = np.zeros((T, M, D, N), dtype=bool)
    up = np.empty_like(dp)
    for t in range(T):
        up[..., 0] = np.inf
        up[..., 1:] = dp[..., :-1]
        took = up < dp
        best = np.where(took, up, dp)
        dp = np.maximum(cost[t], best) if is_max else cost[t] + best
        forced = t <= start
        if forced.any():
            dp[:, forced, 1:] = np.inf
            took[:, forced, :] = False
        choice[t] = took
    idx = np.zeros((M, D, N - 1), dtype=np.int64)
    seg = np.full((M, D), N - 1, dtype=np.int64)
    for t in range(T - 1, 0, -1):
        moved = np.take_along_axis(choice[t], seg[..., None], axis=-1)[..., 0]
        if moved.any():
            m, d = np.nonzero(moved)
            idx[m, d, seg[m, d] - 1] = t - 1
            seg = seg - moved
    per_scale = dp[..., N - 1]
    return idx, (per_scale.max(axis=1) if is_max else per_scale.sum(axis=1))


def assign(problem: Problem, idx: np.ndarray) -> np.ndarray:
    """(M, D, T) segment of every position: how many breakpoints lie before it."""
    t = np.arange(problem.num_positions)
    return (idx[:, :, None, :] < t[None, None, :, None]).sum(axis=-1)


def assign_real(problem: Problem, p: np.ndarray) -> np.ndarray:
    """(M, D, T) segments of real breakpoints p (M, N-1) shared by all scales: x <= p goes left.

    Used to fit the first lines of a genome. Not every such assignment is a valid table (at a
    coarse scale two breakpoints may fall between the same pair of codes), so the DP then
    places valid integer breakpoints for those lines; rounding and pushing breakpoints apart
    instead would shift every later segment at the coarse scales.
    """
    return (np.sort(p, axis=1)[:, None, None, :] < problem.x[None, :, :, None]).sum(axis=-1)


def encode(problem: Problem, idx: np.ndarray) -> np.ndarray:
    """Per-scale breakpoints back to one real genome: each breakpoint from the finest scale
    whose grid holds it strictly inside the range (where it is most precise)."""
    M, D, n1 = idx.shape
    rows = np.arange(D)[None, :, None]
    vals = np.ldexp(problem.pos[rows, idx].astype(np.float64), -problem.dscale[None, :, None])
    w_first = np.argmax(problem.inside, axis=1)
    w_last = problem.inside.shape[1] - 1 - np.argmax(problem.inside[:, ::-1], axis=1)
    inside = (idx >= w_first[None, :, None]) & (idx < w_last[None, :, None])
    order = np.argsort(problem.dscale)  # coarse .. fine
    pick = np.full((M, n1), order[0])
    for r in order:
        pick = np.where(inside[:, r, :], r, pick)
    out = np.take_along_axis(vals, pick[:, None, :], axis=1)[:, 0, :]
    return np.sort(out, axis=1)


def _forward_backward(cost: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For one table's costs (T, D, N): F[t, d, j], the least cost of positions 0..t with t in
    segment j, and H[t, d, j], the least cost of positions t..T-1 with t in segment j and the
    last in segment N-1 (the DP of `place` run from both ends; positions up to start[d] in
    segment 0)."""
    T, D, N = cost.shape
    F = np.full((T, D, N), np.inf)
    H = np.full((T, D, N), np.inf)
    prev = np.full((D, N), np.inf)
    prev[:, 0] = 0.0
    for t in range(T):
        up = np.concatenate([np.full((D, 1), np.inf), prev[:, :-1]], axis=1)
        prev = cost[t] + np.minimum(prev, up) if t else np.where(np.arange(N) == 0, cost[0], np.inf)
        prev[t <= start, 1:] = np.inf
        F[t] = prev
    nxt = np.full((D, N), np.inf)
    nxt[:, -1] = cost[T - 1, :, -1]
    H[T - 1] = nxt
    for t in range(T - 2, -1, -1):
        down = np.concatenate([nxt[:, 1:], np.full((D, 1), np.inf)], axis=1)
        nxt = cost[t] + np.minimum(nxt, down)
        nxt[t <= start, 1:] = np.inf
        H[t] = nxt
    return F, H


def one_line_moves(problem: Problem, K: np.ndarray, B: np.ndarray, Ks: np.ndarray, Bs: np.ndarray) -> np.ndarray:
    """The objective (M,) that optimal breakpoints reach for each of M tables that differ from
    the table (K, B) (N,) in one line each (mse objective): what `place` gives them, in
    O(T) per table and scale instead of O(T N). With the other lines unchanged, the best cost
    of the segments before line i (F) and after it (H) are the table's own, so a table's
    optimum is the best run s..e of line i between them: min over e of (its prefix sum to e
    plus H after e) plus the running min over s <= e of (F before s minus its prefix sum to s).
    The sums run in another order than `place`'s, so the values agree to float rounding."""
    T, D, N = problem.num_positions, problem.dscale.size, problem.segments
    base = position_costs(problem, line_outputs(problem, K[None], B[None]))[:, 0]  # (T, D, N)
    F, H = _forward_backward(base, problem.start)
    M = Ks.shape[0]
    if M == 0:
        return np.zeros(0)
    line = np.argmax((Ks != K[None]) | (Bs != B[None]), axis=1)  # (M,) the line each table moves
    m = np.arange(M)
    col = position_costs(problem, line_outputs(problem, Ks[m, line][:, None], Bs[m, line][:, None]))[..., 0]  # (T, M, D)
    Pc = np.concatenate([np.zeros((1, M, D)), np.cumsum(col, axis=0)])  # (T + 1, M, D): sum of positions < t
    t = np.arange(T)[:, None, None]
    before = np.full((T, M, D), np.inf)  # best cost of positions < s in the lines before i
    first = line == 0
    before[0, first] = 0.0
    later = ~first
    if later.any():
        before[1:, later] = F[:-1][:, :, line[later] - 1].transpose(0, 2, 1)
        before = np.where(later[None, :, None] & (t <= problem.start[None, None, :]), np.inf, before)
    after = np.full((T, M, D), np.inf)  # best cost of positions > e in the lines after i
    last = line == N - 1
    after[T - 1, last] = 0.0
    inner = ~last
    if inner.any():
        after[:-1, inner] = H[1:][:, :, line[inner] + 1].transpose(0, 2, 1)
    with np.errstate(invalid="ignore"):
        opening = np.minimum.accumulate(before - Pc[:-1], axis=0)
        total = np.min(Pc[1:] + after + opening, axis=0)  # (M, D)
    return total.sum(axis=1)

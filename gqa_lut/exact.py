"""Exact steps: the best integer line for a set of points, and the optimal table of one scale.

A line's weighted squared error on a set of points is a convex quadratic in its real
(k, b), known from six moments. For a fixed integer slope K the best integer intercept is the
rounded (then saturated) real optimum, because the error is a 1-D convex parabola in B. Over K,
the error minimised over a *real* b is a parabola g(K) = g* + alpha (K - K*)^2 that bounds the
integer error from below, so every K with g(K) above the best integer error found so far can
be skipped: enumerating the remaining K is exact and usually a handful of candidates.

With exact lines for every run of consecutive codes, one scale's optimal table is a DP over
runs (at most N, optionally opened and closed by the pinned tail lines): provably optimal for
the spec's mse on that scale. Summed over scales it bounds any shared multi-scale table from
below, since sharing lines across scales can only add error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

from gqa_lut.linefit import WINDOW, best_intercepts, least_squares_slope, moment_terms, quadratic_error
from gqa_lut.problem import Problem

MAX_EXACT_CODES = 1024  # one scale's interval table is O(T^2): beyond this no exact optimum


def exact_lines(S: np.ndarray, frac_bits: int, pmin: int, pmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The integer (K, B) of least quadratic error for every entry of moments S (6, ...):
    returns K, B (float arrays of integers) and the error. Entries without weight get (0, 0)."""
    S1, Sx, Sxx, Sf, Sxf, Sff = S
    shape = S1.shape
    k, _ = least_squares_slope(S)
    best_K = np.zeros(shape)
    best_B = np.zeros(shape)
    best_E = np.full(shape, np.inf)
    k0 = np.rint(np.ldexp(k, frac_bits))
    for delta in range(-WINDOW, WINDOW + 1):  # a good first candidate, then the exact range
        K = np.clip(k0 + delta, pmin, pmax)
        B = best_intercepts(S, K, frac_bits, pmin, pmax)
        E = quadratic_error(S, K, B, frac_bits)
        better = E < best_E
        best_K, best_B, best_E = np.where(better, K, best_K), np.where(better, B, best_B), np.where(better, E, best_E)
    safe = np.where(S1 > 0, S1, 1.0)
    alpha = (S1 * Sxx - Sx * Sx) / safe  # curvature of g in real k
    g_star = Sff - 2 * k * Sxf + k * k * Sxx - (Sf - k * Sx) ** 2 / safe
    # every K with g(K) <= best_E; widened for rounding in the moments (never narrowed)
    slack = np.maximum(best_E - g_star, 0.0) * (1 + 1e-6) + 1e-12 * np.maximum(np.abs(Sff), 1e-300)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        half = np.where(alpha > 0, np.ldexp(np.sqrt(slack / np.where(alpha > 0, alpha, 1.0)), frac_bits), np.inf)
    centre = np.ldexp(k, frac_bits)
    lo = np.where(np.isfinite(half), np.clip(np.floor(centre - half) - 1, pmin, pmax), pmin)
    hi = np.where(np.isfinite(half), np.clip(np.ceil(centre + half) + 1, pmin, pmax), pmax)
    width = np.where(S1 > 0, hi - lo + 1, 0).astype(np.int64).ravel()
    lo, bK, bB, bE = lo.ravel(), best_K.ravel(), best_B.ravel(), best_E.ravel()
    flat = [s.ravel() for s in S]
    for off in range(int(width.max(initial=0))):
        act = np.nonzero(width > off)[0]
        K = lo[act] + off
        Sa = np.stack([s[act] for s in flat])
        B = best_intercepts(Sa, K, frac_bits, pmin, pmax)
        E = quadratic_error(Sa, K, B, frac_bits)
        better = E < bE[act]
        sel = act[better]
        bK[sel], bB[sel], bE[sel] = K[better], B[better], E[better]
    bE = np.where(S1.ravel() > 0, bE, 0.0)
    return bK.reshape(shape), bB.reshape(shape), bE.reshape(shape)


@dataclass(frozen=True)
class ScaleOptimum:
    """The optimal table of one scale: its objective, and lines (N,) in segment order."""

    cost: float
    K: np.ndarray
    B: np.ndarray


def _prefix_moments(x: np.ndarray, w: np.ndarray, f: np.ndarray) -> np.ndarray:
    return np.vstack([np.zeros((1, 6)), np.cumsum(np.stack(moment_terms(w, x, f), axis=1), axis=0)])


@dataclass(frozen=True, eq=False)
class _Runs:
    """One scale's exact DP over runs of codes: the exact line of every run, and per number
    of free runs j the best cost of covering codes 0..t-1 (layers[j][t]) with its back-pointers."""

    K: np.ndarray
    B: np.ndarray
    layers: list
    back: list
    last: np.ndarray


@lru_cache(maxsize=128)  # a fit asks for each scale's runs for its bound and for its starts
def _runs(problem: Problem, row: int) -> Optional[_Runs]:
    sel = problem.inside[row]
    x, w, f = problem.x[row, sel], problem.w[row, sel], problem.f[row, sel]
    T = x.size
    if T > MAX_EXACT_CODES or problem.objective != "mse" or problem.output is not None:
        return None
    F = problem.frac_bits
    P = _prefix_moments(x, w, f)
    S = (P[None, :, :] - P[:, None, :]).transpose(2, 0, 1)  # S[:, s, t]: codes s..t-1
    K, B, C = exact_lines(S, F, problem.pmin, problem.pmax)
    C = np.where(np.triu(np.ones((T + 1, T + 1), dtype=bool), 1), C, np.inf)
    left, right = problem.left_tail, problem.right_tail
    # a pinned tail either opens (closes) the scale's run of segments or is parked outside it
    first = np.full(T + 1, np.inf)
    if left is not None:
        first = quadratic_error(S[:, 0, :], np.float64(left[0]), np.float64(left[1]), F)
    first[0] = 0.0
    last = np.full(T + 1, np.inf)
    if right is not None:
        last = quadratic_error(S[:, :, T], np.float64(right[0]), np.float64(right[1]), F)
    last[T] = 0.0
    layers, back = [first], []
    for _ in range(free_segments(problem)):
        total = layers[-1][:, None] + C
        back.append(np.argmin(total, axis=0))
        layers.append(np.min(total, axis=0))
    return _Runs(K, B, layers, back, last)


def free_segments(problem: Problem) -> int:
    """Segments whose line the search chooses: all but the pinned tails."""
    return problem.segments - (problem.left_tail is not None) - (problem.right_tail is not None)


def scale_lines(problem: Problem, row: int, n: int) -> Optional[tuple[float, np.ndarray, np.ndarray]]:
    """Scale `row`'s optimum with at most n free lines (besides the pinned tails): its cost and
    the n free lines (K, B) in order, unused ones as copies of a used one (they change nothing)."""
    runs = _runs(problem, row)
    if runs is None:
        return None
    n = min(n, len(runs.back))
    ends = np.array([layer + runs.last for layer in runs.layers[:n + 1]])  # j free runs, then the tail
    j, t = np.unravel_index(int(np.argmin(ends)), ends.shape)
    cost = float(ends[j, t])
    lines = []
    while j > 0:
        s = int(runs.back[j - 1][t])
        lines.append((int(runs.K[s, t]), int(runs.B[s, t]), t - s))
        t, j = s, j - 1
    lines = lines[::-1]
    while len(lines) < n:  # unused free segments: copies of the longest run's line
        i = max(range(len(lines)), key=lambda i: lines[i][2]) if lines else None
        lines.insert(0, (0, 0, 0)) if i is None else lines.insert(i + 1, lines[i])
    return cost, np.array([ln[0] for ln in lines], dtype=np.int64), np.array([ln[1] for ln in lines], dtype=np.int64)


def with_tails(problem: Problem, K: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Free lines (M, n) with the pinned tails put around them: whole tables (M, n + tails)."""
    left, right = problem.left_tail, problem.right_tail
    M = K.shape[0]

    def pad(tail: Optional[tuple[int, int]], i: int) -> list[np.ndarray]:
        return [np.full((M, 1), tail[i], dtype=np.int64)] if tail is not None else []

    return (np.concatenate([*pad(left, 0), K, *pad(right, 0)], axis=1),
            np.concatenate([*pad(left, 1), B, *pad(right, 1)], axis=1))


def scale_optimum(problem: Problem, row: int) -> Optional[ScaleOptimum]:
    """The exact optimum of scale `row` alone (mse objective, no output quantization), or None
    when its grid is too large for the O(T^2) interval table."""
    found = scale_lines(problem, row, free_segments(problem))
    if found is None:
        return None
    cost, K, B = found
    K, B = with_tails(problem, K[None], B[None])
    return ScaleOptimum(cost, K[0], B[0])


def lower_bound(problem: Problem) -> Optional[float]:
    """A bound no table of this problem goes below: each scale's own optimum, summed (the
    objective is a sum over scales). None where no exact optimum exists (minimax, output
    quantization, grids over MAX_EXACT_CODES, a subsampled problem)."""
    if not problem.full:
        return None
    total = 0.0
    for row in range(problem.dscale.size):
        opt = scale_optimum(problem, row)
        if opt is None:
            return None
        total += opt.cost
    return total


# --- minimax --------------------------------------------------------------------------------------

def _covers(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, n: int) -> int:
    """How many of [0, n) the greedy longest first run covers: the largest e such that one real
    line passes between lo and hi at x[:e]. A line fits a run iff every pair of its points
    allows it: slope k with lo_i - k x_i <= hi_j - k x_j for each pair, an interval of k for
    each pair (x sorted, distinct), so the run fits iff the largest lower end is below the
    smallest upper end; adding a point adds its pairs with the run, O(run) per point."""
    k_lo, k_hi = -np.inf, np.inf
    for e in range(1, n):
        dx = x[e] - x[:e]
        k_lo = max(k_lo, float(((lo[e] - hi[:e]) / dx).max()))
        k_hi = min(k_hi, float(((hi[e] - lo[:e]) / dx).min()))
        if k_lo > k_hi:
            return e
    return n


def _feasible(x: np.ndarray, f: np.ndarray, tol: np.ndarray, eps: float, free: int,
              left: Optional[tuple[float, float]], right: Optional[tuple[float, float]]) -> bool:
    """Whether the points can be covered with every |error| <= eps * tol: the pinned tails over
    the longest prefix and suffix they fit (taking more never hurts: what is left is a subset),
    then at most `free` runs, each the longest that fits (optimal for the same reason)."""
    i, j = 0, x.size
    band = eps * tol
    if left is not None:
        ok = np.abs(left[0] * x + left[1] - f) <= band
        i = int(np.argmin(ok)) if not ok.all() else x.size
    if right is not None:
        ok = (np.abs(right[0] * x + right[1] - f) <= band)[::-1]
        j = x.size - (int(np.argmin(ok)) if not ok.all() else x.size)
    runs = 0
    while i < j:
        runs += 1
        if runs > free:
            return False
        i += _covers(x[i:j], f[i:j] - band[i:j], f[i:j] + band[i:j], j - i)
    return True


def minimax_bound(x: np.ndarray, f: np.ndarray, w: np.ndarray, free: int,
                  left: Optional[tuple[float, float]] = None, right: Optional[tuple[float, float]] = None,
                  steps: int = 40) -> float:
    """A lower bound on max_i w_i |line(x_i) - f_i| over every table of `free` real lines on
    consecutive runs of the sorted points (plus pinned tail lines): the largest eps found
    infeasible by bisection. Real lines and free breakpoints between the points relax the
    integer table, so no integer table does better."""
    keep = w > 0
    x, f, tol = x[keep], f[keep], 1.0 / w[keep]
    if x.size == 0:
        return 0.0
    hi = float(np.abs(f).max() / tol.min()) + 1.0
    while not _feasible(x, f, tol, hi, free, left, right):
        hi *= 2.0
        if hi > 1e30:
            return float("inf")
    lo = 0.0
    if _feasible(x, f, tol, 0.0, free, left, right):
        return 0.0
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if _feasible(x, f, tol, mid, free, left, right):
            hi = mid
        else:
            lo = mid
    return lo


def minimax_lower_bound(problem: Problem) -> Optional[float]:
    """A bound no table of this problem goes below on the minimax objective (the largest
    weighted |error| over every scale's scored positions): the hardest scale's own bound.
    None with output quantization (rounding the output may move it toward the target)."""
    if problem.objective != "max" or problem.output is not None:
        return None
    F = problem.frac_bits
    tails = [None if t is None else (math.ldexp(t[0], -F), math.ldexp(t[1], -F))
             for t in (problem.left_tail, problem.right_tail)]
    best = 0.0
    for row in range(problem.dscale.size):
        valid = np.arange(problem.num_positions) >= problem.start[row]
        x, f, w = problem.x[row, valid], problem.f[row, valid], problem.wmax[row, valid]
        # every output of scale d is a multiple of 2^-(F + max(d, 0)) (the spec's ACC grid),
        # whatever the lines: the distance of each target to that grid bounds its error too
        grid = math.ldexp(1.0, -(F + max(int(problem.dscale[row]), 0)))
        on_grid = float((w * np.abs(f - np.rint(f / grid) * grid)).max(initial=0.0))
        best = max(best, on_grid, minimax_bound(x, f, w, free_segments(problem), *tails))
    return best

"""Integer slopes and intercepts for fixed segment assignments, for a whole population at once.

Given which segment every grid position belongs to, each segment's quantized error is a
convex quadratic in its integer (K, B) whose coefficients are six weighted moments of the
positions. So the least-squares line, and the best integers near it, cost O(1) per
candidate: no pass over the points per candidate. (The published GQA-LUT code rounds secant
lines to the grid; picking the best nearby integer pair is what beats it.)
"""
from __future__ import annotations

import numpy as np

from gqa_lut.problem import Problem

RIDGE = 1e-10  # pulls an ill-posed slope (one distinct x) to the function's local derivative
WINDOW = 2  # slopes tried: the rounded least-squares slope +- WINDOW


def _derivative(problem: Problem, x: np.ndarray) -> np.ndarray:
    h = 1e-4 * (problem.hi - problem.lo)
    a = np.clip(x - h, problem.lo, problem.hi)
    b = np.clip(x + h, problem.lo, problem.hi)
    with np.errstate(all="ignore"):
        g = (problem.fn(b) - problem.fn(a)) / np.where(b > a, b - a, 1.0)
    return np.where(np.isfinite(g), g, 0.0)


def moment_terms(w: np.ndarray, x: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, ...]:
    """The six weighted terms [1, x, x^2, f, x*f, f^2] whose sums determine any line's error."""
    wx, wf = w * x, w * f
    return w, wx, wx * x, wf, wx * f, wf * f


def moments(problem: Problem, seg: np.ndarray) -> np.ndarray:
    """(6, M, N) weighted sums [1, x, x^2, f, x*f, f^2] over each individual's segments."""
    M, N = seg.shape[0], problem.segments
    idx = (np.arange(M)[:, None, None] * N + seg).ravel()
    w = np.broadcast_to(problem.w, seg.shape)
    x = np.broadcast_to(problem.x, seg.shape)
    f = np.broadcast_to(problem.f, seg.shape)
    return np.stack([np.bincount(idx, weights=c.ravel(), minlength=M * N).reshape(M, N) for c in moment_terms(w, x, f)])


def least_squares_slope(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Real least-squares slope of each segment from its moments, and where it is defined (at
    least two distinct x carrying weight); 0 elsewhere."""
    S1, Sx, Sxx, Sf, Sxf, _ = S
    safe = np.where(S1 > 0, S1, 1.0)
    det = S1 * Sxx - Sx * Sx
    ok = (S1 > 0) & (det > 1e-12 * safe * safe)
    return np.where(ok, (Sxf * S1 - Sx * Sf) / np.where(ok, det, 1.0), 0.0), ok


def best_intercepts(S: np.ndarray, K: np.ndarray, frac_bits: int, pmin: int, pmax: int) -> np.ndarray:
    """For integer slopes K, each segment's best integer intercept: the error is a 1-D convex
    quadratic in B, so the rounded real optimum is exact (then saturated to P bits)."""
    S1, Sx, _, Sf, _, _ = S
    safe = np.where(S1 > 0, S1, 1.0)
    return np.clip(np.rint(np.ldexp(Sf - np.ldexp(np.asarray(K, dtype=np.float64), -frac_bits) * Sx, frac_bits)
                           / safe), pmin, pmax)


def slope_window(k: np.ndarray, frac_bits: int, pmin: int, pmax: int):
    """The integer slopes tried around real slopes k: the rounded value +- WINDOW, saturated."""
    k0 = np.rint(np.ldexp(k, frac_bits))
    for delta in range(-WINDOW, WINDOW + 1):
        yield np.clip(k0 + delta, pmin, pmax)


def quadratic_error(S: np.ndarray, K: np.ndarray, B: np.ndarray, frac_bits: int) -> np.ndarray:
    """Weighted squared error of lines (K, B) on segments with moments S, without touching points."""
    S1, Sx, Sxx, Sf, Sxf, Sff = S
    k = np.ldexp(K.astype(np.float64), -frac_bits)
    b = np.ldexp(B.astype(np.float64), -frac_bits)
    e = k * k * Sxx + 2 * k * b * Sx + b * b * S1 - 2 * k * Sxf - 2 * b * Sf + Sff
    return np.maximum(e, 0.0)


def explicit_error(problem: Problem, seg: np.ndarray, K: np.ndarray, B: np.ndarray) -> np.ndarray:
    """(M, N) per-segment error computed point by point: for output rounding and minimax."""
    from gqa_lut.segmentation import assigned_outputs

    M, N = seg.shape[0], problem.segments
    err = assigned_outputs(problem, seg, K, B) - problem.f
    idx = (np.arange(M)[:, None, None] * N + seg).ravel()
    if problem.objective == "mse":
        return np.bincount(idx, weights=(problem.w * err * err).ravel(), minlength=M * N).reshape(M, N)
    out = np.zeros(M * N)
    np.maximum.at(out, idx, (problem.wmax * np.abs(err)).ravel())
    return out.reshape(M, N)


def segment_errors(problem: Problem, S: np.ndarray, seg: np.ndarray,
                   K: np.ndarray, B: np.ndarray) -> np.ndarray:
    if problem.objective == "mse" and problem.output is None:
        return quadratic_error(S, K, B, problem.frac_bits)
    return explicit_error(problem, seg, K, B)


def total(problem: Problem, seg_err: np.ndarray) -> np.ndarray:
    return seg_err.max(axis=1) if problem.objective == "max" else seg_err.sum(axis=1)


def _fill_empty(K: np.ndarray, B: np.ndarray, empty: np.ndarray) -> None:
    """Segments no input reaches copy a neighbour's line, so the table stays continuous-looking."""
    N = K.shape[1]
    for i in range(1, N):
        m = empty[:, i] & ~empty[:, i - 1]
        K[m, i], B[m, i] = K[m, i - 1], B[m, i - 1]
        empty[m, i] = False
    for i in range(N - 2, -1, -1):
        m = empty[:, i] & ~empty[:, i + 1]
        K[m, i], B[m, i] = K[m, i + 1], B[m, i + 1]
        empty[m, i] = False


def fit_lines(problem: Problem, seg: np.ndarray, keep: tuple[np.ndarray, np.ndarray] | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best integer (K, B) per segment for assignment `seg` (M, D, T); returns K, B, errors (M, N).

    Candidates: slopes around the rounded least-squares slope, each with its best intercept
    (a 1-D convex quadratic, so the rounded conditional optimum is exact), plus the lines in
    `keep`, so that refitting after a re-segmentation can never make an individual worse.
    """
    F, pmin, pmax = problem.frac_bits, problem.pmin, problem.pmax
    S = moments(problem, seg)
    S1, Sx, Sxx, Sf, Sxf, _ = S
    empty = S1 <= 0
    safe1 = np.where(empty, 1.0, S1)
    xbar = Sx / safe1
    lam = RIDGE * safe1 * (1.0 + xbar * xbar)
    g = _derivative(problem, xbar)
    det = (Sxx + lam) * S1 - Sx * Sx
    det = np.where(det > 0, det, 1.0)
    k = np.where(empty, 0.0, ((Sxf + lam * g) * S1 - Sx * Sf) / det)
    best_K = best_B = best_E = None
    for Kf in slope_window(k, F, pmin, pmax):
        K = Kf.astype(np.int64)
        B = best_intercepts(S, K, F, pmin, pmax).astype(np.int64)
        pin_tails(problem, K, B)
        E = segment_errors(problem, S, seg, K, B)
        if best_E is None:
            best_K, best_B, best_E = K, B, E
        else:
            better = E < best_E
            best_K = np.where(better, K, best_K)
            best_B = np.where(better, B, best_B)
            best_E = np.where(better, E, best_E)
    _fill_empty(best_K, best_B, empty.copy())
    pin_tails(problem, best_K, best_B)
    best_E = segment_errors(problem, S, seg, best_K, best_B)
    if keep is not None:
        Kk, Bk = keep
        Ek = segment_errors(problem, S, seg, Kk, Bk)
        if problem.objective == "max" or problem.output is not None:
            better = (total(problem, Ek) < total(problem, best_E))[:, None]
        else:
            better = Ek < best_E  # errors are separable per segment
        best_K = np.where(better, Kk, best_K)
        best_B = np.where(better, Bk, best_B)
        best_E = np.where(better, Ek, best_E)
    return best_K, best_B, best_E


def pin_tails(problem: Problem, K: np.ndarray, B: np.ndarray) -> None:
    if problem.left_tail is not None:
        K[:, 0], B[:, 0] = problem.left_tail
    if problem.right_tail is not None:
        K[:, -1], B[:, -1] = problem.right_tail

"""The deterministic anchors our search is measured against (python -m bench.anchors).

- `round_float_pwl` + `lsb_descent`: a float PWL fit (e.g. pwlf's) rounded into the same
  integer format, then greedy +-1 LSB coordinate descent on every slope, intercept and
  per-scale breakpoint until no single move lowers the spec's mse: what a careful engineer
  would try before a genetic search.
- `direct_table_mse`: a 2^Q-entry table holding f at every input code, rounded to the ACC's
  grid: the floor for any table with that output grid.
- I-BERT's integer-friendly GELU and exp (second-order polynomials, range reduction), in float.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from gqa_lut.quantization import code_values, input_codes, int_range


def grids(lo: float, hi: float, scales: tuple[int, ...], input_bits: int) -> dict[int, np.ndarray]:
    return {d: input_codes(lo, hi, d, input_bits) for d in scales}


def union_points(lo: float, hi: float, scales: tuple[int, ...], input_bits: int) -> np.ndarray:
    """Every real input the metric scores (all scales), sorted: the data a float fit should see."""
    return np.unique(np.concatenate([code_values(c, d) for d, c in grids(lo, hi, scales, input_bits).items()]))


def batch_mse(K: np.ndarray, B: np.ndarray, P: dict[int, np.ndarray], frac_bits: int,
              g: dict[int, np.ndarray], fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Spec mse (mean over scales of mean over G_d) of C tables at once: K, B (C, N), P[d] (C, N-1)."""
    total = np.zeros(K.shape[0])
    for d, codes in g.items():
        seg = (codes[None, :, None] > P[d][:, None, :]).sum(-1)
        rows = np.arange(K.shape[0])[:, None]
        acc = K[rows, seg] * (codes << max(-d, 0))[None, :] + (B[rows, seg] << max(d, 0))
        y = np.ldexp(acc.astype(np.float64), -(frac_bits + max(d, 0)))
        total += np.mean((y - fn(code_values(codes, d))[None, :]) ** 2, axis=1)
    return total / len(g)


def _strict(p: np.ndarray) -> np.ndarray:
    j = np.arange(p.shape[0])
    return np.maximum.accumulate(p - j) + j


def round_float_pwl(breaks: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray, frac_bits: int,
                    param_bits: int, scales: tuple[int, ...],
                    left_tail: Optional[tuple[int, int]] = None, right_tail: Optional[tuple[int, int]] = None
                    ) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Round a float PWL (interior breakpoints, slopes, intercepts) into the integer format:
    parameters to the nearest 2^-F (saturating), each scale's breakpoints to floor(p * 2^d)
    (x <= p goes left), pushed apart where they collide; outer lines pinned like ours."""
    lo, hi = int_range(param_bits)
    K = np.clip(np.rint(np.ldexp(slopes, frac_bits)), lo, hi).astype(np.int64)
    B = np.clip(np.rint(np.ldexp(intercepts, frac_bits)), lo, hi).astype(np.int64)
    if left_tail is not None:
        K[0], B[0] = left_tail
    if right_tail is not None:
        K[-1], B[-1] = right_tail
    P = {d: _strict(np.floor(np.ldexp(np.asarray(breaks, np.float64), d)).astype(np.int64)) for d in scales}
    return K, B, P


def lsb_descent(K: np.ndarray, B: np.ndarray, P: dict[int, np.ndarray], frac_bits: int, param_bits: int,
                g: dict[int, np.ndarray], fn: Callable[[np.ndarray], np.ndarray],
                fixed: tuple[int, ...] = (), max_iters: int = 10_000) -> tuple[np.ndarray, np.ndarray, dict, float]:
    """Best-improvement descent over every +-1 move of one slope, intercept or breakpoint."""
    lo, hi = int_range(param_bits)
    N = K.shape[0]
    scales = list(P)
    best = float(batch_mse(K[None], B[None], {d: P[d][None] for d in scales}, frac_bits, g, fn)[0])
    for _ in range(max_iters):
        Ks, Bs, Ps = [], [], {d: [] for d in scales}

        def add(k, b, p):
            Ks.append(k), Bs.append(b)
            for d in scales:
                Ps[d].append(p[d])

        for i in range(N):
            if i in fixed:
                continue
            for arr_name in ("K", "B"):
                for step in (1, -1):
                    k, b = K.copy(), B.copy()
                    (k if arr_name == "K" else b)[i] += step
                    if lo <= k[i] <= hi and lo <= b[i] <= hi:
                        add(k, b, P)
        for d in scales:
            for j in range(N - 1):
                for step in (1, -1):
                    p = P[d].copy()
                    p[j] += step
                    if (j == 0 or p[j] > p[j - 1]) and (j == N - 2 or p[j] < p[j + 1]):
                        add(K, B, {**P, d: p})
        if not Ks:
            break
        mse = batch_mse(np.array(Ks), np.array(Bs), {d: np.array(Ps[d]) for d in scales}, frac_bits, g, fn)
        c = int(np.argmin(mse))
        if not mse[c] < best * (1 - 1e-12):
            break
        best = float(mse[c])
        K, B = Ks[c], Bs[c]
        P = {d: Ps[d][c] for d in scales}
    return K, B, P, best


def float_pwl_mse(breaks: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray, g: dict[int, np.ndarray],
                  fn: Callable[[np.ndarray], np.ndarray]) -> float:
    """The float bound: the unrounded PWL (interior breakpoints) on the same grids, same averaging."""
    per = []
    for d, codes in g.items():
        x = code_values(codes, d)
        i = np.searchsorted(np.asarray(breaks), x, side="left")
        per.append(np.mean((slopes[i] * x + intercepts[i] - fn(x)) ** 2))
    return float(np.mean(per))


def direct_table_mse(g: dict[int, np.ndarray], fn: Callable[[np.ndarray], np.ndarray], frac_bits: int) -> float:
    """A table of f at every input code, rounded to the ACC's 2^-(F + max(d, 0)) grid."""
    per = []
    for d, codes in g.items():
        x = code_values(codes, d)
        s = frac_bits + max(d, 0)
        per.append(np.mean((np.ldexp(np.rint(np.ldexp(fn(x), s)), -s) - fn(x)) ** 2))
    return float(np.mean(per))


def ibert_gelu(x: np.ndarray) -> np.ndarray:
    """I-BERT's i-GELU (Kim et al. 2021): x/2 * (1 + L(x/sqrt 2)), L a clipped 2nd-order erf."""
    a, b = -0.2888, -1.769
    z = x / math.sqrt(2.0)
    L = np.sign(z) * (a * (np.minimum(np.abs(z), -b) + b) ** 2 + 1.0)
    return 0.5 * x * (1.0 + L)


def ibert_exp(x: np.ndarray) -> np.ndarray:
    """I-BERT's i-exp for x <= 0: x = -z ln2 + p, exp(p) ~ 0.3585 (p + 1.353)^2 + 0.344, then >> z."""
    ln2 = math.log(2.0)
    z = np.floor(-x / ln2)
    p = x + z * ln2
    return (0.3585 * (p + 1.353) ** 2 + 0.344) * np.exp2(-z)

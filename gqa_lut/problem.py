"""What the search optimises, precomputed once: the input grids of every scale, targets, weights.

All scales are laid out right-aligned in one (D, T) array so that the population, the scales
and the segments are handled by whole-array numpy operations. Position t of scale d is a block
of consecutive input codes (one code unless the grid is subsampled for large input widths);
a breakpoint placed "after" a position takes the value `pos[d, t]`, the block's last code.
Each scale's sequence has a band of out-of-range codes at both ends (see build_problem).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from gqa_lut.errors import UsageError
from gqa_lut.quantization import code_values, input_codes, int_range
from gqa_lut.table import OutputFormat

if TYPE_CHECKING:  # the spec is only read here; config.py does not import this module either
    from gqa_lut.config import FitSpec

MAX_POSITIONS = 1024  # per scale; larger grids are searched in blocks, then refined in full
# Seen out-of-range codes only break ties in the DP: weight relative to the smallest in-range
# weight, squared error capped at OUTSIDE_CAP (a function may explode outside its range), so
# their total stays below 1e-6 of any in-range mse, yet far above float rounding: among
# equally good tables the DP takes the one that follows the function outside the range.
OUTSIDE_WEIGHT = 1e-12
OUTSIDE_CAP = 100.0
# A user function whose asymptotes were estimated (gqa_lut.functions.with_estimated_tails) has
# no exact tails to fall back on, so there the seen out-of-range codes count for real in the DP:
# the table then follows the function on every code the hardware can see (mish on [-4, 4], 16
# segments: max error outside 8.6 -> 0.03, in-range mse 1.5e-5 -> 2.2e-5).
ESTIMATED_TAILS_OUTSIDE_WEIGHT = 1e-4


CANONICAL_MANTISSA_BITS = 32


class Canonical:
    """The target function as the search sees it: every value's mantissa rounded to 32 bits.

    numpy's vectorised exp, tanh, ... differ in the last ulp between CPUs (AVX-512 or not).
    Rounding to 32 of the 52 mantissa bits maps both results to the same number unless a
    rounding boundary falls inside that one ulp (odds about 2^-20 per differing value), and
    everything the search does after that is IEEE-exact arithmetic (+ - * /, comparisons,
    sums in a fixed order), so its choices, and the integer table, are the same on every CPU.
    The relative change, below 2^-32, is far under any error a table can reach; metrics are
    still computed against the exact function. Picklable, for process pools."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]):
        self.fn = fn.fn if isinstance(fn, Canonical) else fn

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return canonical_values(self.fn(x))


def canonical_values(y: np.ndarray) -> np.ndarray:
    """Round each mantissa to CANONICAL_MANTISSA_BITS bits (frexp, rint and ldexp are exact)."""
    m, e = np.frexp(np.asarray(y, dtype=np.float64))
    return np.ldexp(np.rint(np.ldexp(m, CANONICAL_MANTISSA_BITS)), e - CANONICAL_MANTISSA_BITS)


@dataclass(frozen=True, eq=False)
class Problem:
    fn: Callable[[np.ndarray], np.ndarray]
    lo: float
    hi: float
    segments: int
    scales: tuple[int, ...]
    frac_bits: int
    param_bits: int
    input_bits: int
    output: Optional[OutputFormat]
    objective: str  # "mse" or "max"
    left_tail: Optional[tuple[int, int]]  # integer (K, B) pinned for segment 0
    right_tail: Optional[tuple[int, int]]
    # (D, T) arrays, right-aligned
    pos: np.ndarray  # breakpoint value if a breakpoint follows this position
    code: np.ndarray  # representative input code
    x: np.ndarray  # its real value
    f: np.ndarray  # target at x
    w: np.ndarray  # weight of the squared error inside the range (the spec's mse); 0 outside
    w_out: np.ndarray  # DP-only weight of out-of-range codes the hardware can see (capped error)
    wmax: np.ndarray  # factor on |error| for the minimax objective (1 inside the range)
    inside: np.ndarray  # position lies in the fitted range (what the metrics score)
    start: np.ndarray  # (D,) index of each scale's first position (forced into segment 0)
    dscale: np.ndarray  # (D,) scale exponent of each row
    full: bool  # every position is a single code (no subsampling)

    @property
    def num_positions(self) -> int:
        return int(self.pos.shape[1])

    @property
    def pmin(self) -> int:
        return int_range(self.param_bits)[0]

    @property
    def pmax(self) -> int:
        return int_range(self.param_bits)[1]


def _scale_weights(codes: np.ndarray, d: int, hist: Optional[np.ndarray]) -> np.ndarray:
    """Per-code weight within one scale, summing to 1: uniform, or from an activation histogram.

    `hist` is either raw samples (1-D) or (value, weight) rows (2-D). A small floor keeps
    every code in play, so a table never goes wild on inputs the sample happened to miss.
    """
    n = codes.shape[0]
    if hist is None:
        return np.full(n, 1.0 / n)
    if hist.ndim == 1:
        q = np.rint(np.ldexp(hist, d)).astype(np.int64)
        q = q[(q >= codes[0]) & (q <= codes[-1])] - codes[0]
        raw = np.bincount(q, minlength=n).astype(np.float64)
    else:
        xs = code_values(codes, d)
        order = np.argsort(hist[:, 0])
        raw = np.interp(xs, hist[order, 0], hist[order, 1], left=0.0, right=0.0)
    total = raw.sum()
    if total <= 0:
        return np.full(n, 1.0 / n)
    p = raw / total
    p = p + 1e-3 / n
    return p / p.sum()


def _seen_outside(codes: np.ndarray, band: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Positions (breakpoint value, scored code) for seen codes outside the range: the `band`
    nearest the range one by one, the rest in `band` runs, each scored at its code farthest
    from the range (where a line's extrapolation is worst)."""
    if codes.size <= 2 * band:
        return codes, codes
    near, far = (codes[-band:], codes[:-band]) if left else (codes[:band], codes[band:])
    runs = np.array_split(far, band)
    pos = np.array([r[-1] for r in runs], dtype=np.int64)
    code = np.array([r[0] if left else r[-1] for r in runs], dtype=np.int64)
    if left:
        return np.concatenate([pos, near]), np.concatenate([code, near])
    return np.concatenate([near, pos]), np.concatenate([near, code])


def build_problem(spec: "FitSpec", max_positions: int = MAX_POSITIONS) -> Problem:
    """The arrays the search works on, for a resolved spec (its frac_bits chosen)."""
    if spec.frac_bits is None:
        raise ValueError("build_problem needs a spec with frac_bits resolved")
    fn, lo, hi, segments, scales = spec.op.fn, spec.lo, spec.hi, spec.segments, spec.scales
    input_bits, param_bits, frac_bits, hist = spec.input_bits, spec.param_bits, spec.frac_bits, spec.weights
    left_tail, right_tail = spec.op.left_tail, spec.op.right_tail
    fn = Canonical(fn)
    rows = []
    for d in scales:
        codes = input_codes(lo, hi, d, input_bits)
        if codes.size == 0:
            raise UsageError(f"range [{lo:g}, {hi:g}] holds no {input_bits}-bit input code at scale {d}: "
                             f"choose finer scales with --scales or widen --range")
        wd = _scale_weights(codes, d, hist) / len(scales)
        stride = max(1, math.ceil(codes.size / max_positions))
        if stride > 1:
            # block k covers codes[k*stride : (k+1)*stride]; represented by its middle code
            starts = np.arange(0, codes.size, stride)
            ends = np.minimum(starts + stride, codes.size) - 1
            rep = codes[(starts + ends) // 2]
            bw = np.add.reduceat(wd, starts)
            bpos = codes[ends]
        else:
            rep, bw, bpos = codes, wd, codes
        # Beyond each end of the range: first the codes the hardware can still see (up to the
        # Q-bit limit), then `band` codes it never sees, where breakpoints may park segments
        # that this scale has no use for (the spec allows breakpoints outside the Q-bit range).
        # The seen codes carry a tiny weight, so the DP keeps them on lines that still follow
        # the function (the tails, or a block's copies of them) whenever that is free: a
        # table behaves like the function outside its range, not only at +-infinity.
        band = segments + 1
        qmin, qmax = int_range(input_bits)
        lpos, lcode = _seen_outside(np.arange(qmin, codes[0], dtype=np.int64), band, left=True)
        rpos, rcode = _seen_outside(np.arange(codes[-1] + 1, qmax + 1, dtype=np.int64), band, left=False)
        lpark = np.arange(min(qmin, codes[0]) - band, min(qmin, codes[0]), dtype=np.int64)
        rpark = np.arange(max(qmax, codes[-1]) + 1, max(qmax, codes[-1]) + 1 + band, dtype=np.int64)
        pos = np.concatenate([lpark, lpos, bpos, rpos, rpark])
        code = np.concatenate([lpark, lcode, rep, rcode, rpark])
        nl, nr = lpark.size + lpos.size, rpos.size + rpark.size
        inside = np.concatenate([np.zeros(nl, bool), np.ones(rep.shape[0], bool), np.zeros(nr, bool)])
        w = np.concatenate([np.zeros(nl), bw, np.zeros(nr)])
        rows.append((d, pos, code, w, stride, inside))
    T = max(r[1].shape[0] for r in rows)
    D = len(rows)
    pos = np.zeros((D, T), np.int64)
    code = np.zeros((D, T), np.int64)
    w = np.zeros((D, T))
    inside = np.zeros((D, T), bool)
    start = np.zeros(D, np.int64)
    for r, (d, p, c, wd, _, ins) in enumerate(rows):
        L = p.shape[0]
        s = T - L
        start[r] = s
        pos[r, s:], code[r, s:], w[r, s:], inside[r, s:] = p, c, wd, ins
        pos[r, :s] = p[0] - np.arange(s, 0, -1)  # padding: below the first position, weight 0
        code[r, :s] = pos[r, :s]
    dscale = np.array([r[0] for r in rows], np.int64)
    x = np.ldexp(code.astype(np.float64), -dscale[:, None])
    qmin, qmax = int_range(input_bits)
    seen = (code >= qmin) & (code <= qmax) & (np.arange(T)[None, :] >= start[:, None])
    with np.errstate(all="ignore"):
        f = fn(np.where(seen, x, (lo + hi) / 2))
    if not np.all(np.isfinite(f[inside])):
        bad = x[inside & ~np.isfinite(f)][0]
        raise UsageError(f"the function is not finite at x={bad:g} inside range [{lo:g}, {hi:g}]")
    # Outside the range the function may be undefined (rsqrt below 0): no penalty there.
    seen &= np.isfinite(f)
    f = np.where(seen, f, 0.0)
    outside = OUTSIDE_WEIGHT
    if spec.op.name.startswith("custom:") and (left_tail is not None or right_tail is not None):
        outside = ESTIMATED_TAILS_OUTSIDE_WEIGHT
    w_out = np.where(seen & ~inside, outside * float(w[inside].min()), 0.0)
    # the minimax objective leaves out codes beyond the op's domain (exp above 0: exp(127) is finite
    # but no table follows it there, and it made every --objective max fit of exp score ~1e43)
    dlo, dhi = spec.op.domain
    in_domain = (x >= dlo) & (x <= dhi)
    wmax = np.where(inside, 1.0, np.where((w_out > 0) & in_domain, outside, 0.0))

    def q(line):
        if line is None:
            return None
        k, b = line
        pmin, pmax = int_range(param_bits)
        return (int(np.clip(np.rint(math.ldexp(k, frac_bits)), pmin, pmax)),
                int(np.clip(np.rint(math.ldexp(b, frac_bits)), pmin, pmax)))

    return Problem(fn=fn, lo=lo, hi=hi, segments=segments, scales=tuple(scales), frac_bits=frac_bits,
                   param_bits=param_bits, input_bits=input_bits, output=spec.output, objective=spec.objective,
                   left_tail=q(left_tail), right_tail=q(right_tail), pos=pos, code=code, x=x, f=f, w=w,
                   w_out=w_out, wmax=wmax, inside=inside, start=start, dscale=dscale,
                   full=all(r[4] == 1 for r in rows))

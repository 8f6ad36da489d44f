"""Integer formats of docs/lut-format.md: bit-width ranges, input grids, rounding shifts."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from gqa_lut.errors import UsageError

MAX_FRAC_BITS = 24  # beyond this nothing fits int32 accumulators for useful widths


def int_range(bits: int) -> tuple[int, int]:
    """Closed range of a signed `bits`-bit integer."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def check_int(name: str, value: object, lo: int, hi: Optional[int] = None) -> None:
    """A user's integer within [lo, hi] (hi None: no upper end), else one clear UsageError."""
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo
            or (hi is not None and value > hi)):
        allowed = f"an integer from {lo} to {hi}" if hi is not None else f"{lo} or more"
        raise UsageError(f"{name} {value!r} is not allowed: use {allowed}")


def check_bits(name: str, bits: int, lo: int = 2, hi: int = 16) -> None:
    check_int(name, bits, lo, hi)


def input_codes(lo: float, hi: float, d: int, input_bits: int) -> np.ndarray:
    """G_d of the spec: every input code X in the Q-bit range with lo <= X*2^-d <= hi."""
    qmin, qmax = int_range(input_bits)
    a = max(math.ceil(_on_code_grid(lo, d, qmin, qmax)), qmin)
    b = min(math.floor(_on_code_grid(hi, d, qmin, qmax)), qmax)
    return np.arange(a, b + 1, dtype=np.int64)


def _on_code_grid(v: float, d: int, qmin: int, qmax: int) -> float:
    """v * 2^d, held within one past the Q-bit range (an end like 1e308 overflows ldexp)."""
    try:
        s = math.ldexp(v, d)
    except OverflowError:
        s = math.copysign(math.inf, v)
    return min(max(s, qmin - 1.0), qmax + 1.0)


def code_values(codes: np.ndarray, d: int) -> np.ndarray:
    """Real value X*2^-d of input codes (exact in float64)."""
    return np.ldexp(np.asarray(codes, dtype=np.float64), -d)


def round_shift(a: np.ndarray, t) -> np.ndarray:
    """floor((a + 2^(t-1)) / 2^t) for t > 0 (round half up), a * 2^-t otherwise. t: an int,
    or int64 shifts broadcasting against a (one per channel, per row)."""
    a = np.asarray(a, dtype=np.int64)
    if np.ndim(t) == 0:
        t = int(t)
        if t > 0:
            return (a + (1 << (t - 1))) >> t
        return a << (-t)
    t = np.asarray(t, dtype=np.int64)
    right = np.maximum(t, 0)
    half = np.where(t > 0, np.left_shift(np.int64(1), np.maximum(right - 1, 0)), 0)
    return np.where(t > 0, (a + half) >> right, a << np.maximum(-t, 0))


def quantize_params(values: np.ndarray, frac_bits: int, param_bits: int) -> np.ndarray:
    """Round real slopes/intercepts onto the 2^-F grid, saturating to the P-bit range."""
    lo, hi = int_range(param_bits)
    return np.clip(np.rint(np.ldexp(np.asarray(values, dtype=np.float64), frac_bits)), lo, hi).astype(np.int64)


def choose_frac_bits(values: np.ndarray, param_bits: int) -> int:
    """Largest F such that every value rounds into the P-bit range (the finest grid that fits).

    More fractional bits mean finer slopes and intercepts, so the largest F that holds the
    biggest parameter is the most accurate choice that never saturates.
    """
    values = np.asarray(values, dtype=np.float64)
    lo, hi = int_range(param_bits)
    best = None
    for f in range(0, MAX_FRAC_BITS + 1):
        q = np.rint(np.ldexp(values, f))
        if np.all((q >= lo) & (q <= hi)):
            best = f
        else:
            break
    if best is None:
        big = float(np.max(np.abs(values)))
        raise UsageError(
            f"parameters up to {big:g} do not fit {param_bits}-bit integers even with frac_bits 0: "
            f"raise --param-bits or narrow --range"
        )
    return best

"""The bounds of docs/lut-format.md section 6, and the integer widths a runtime needs for a table.

The loader enforces the bounds, so every table that loads can be evaluated in 64-bit
integers; `runtime_bits` says, per table, whether 32 bits suffice. Every runtime (torch, C)
asks this module rather than deriving its own bound, so they cannot disagree.
"""
from __future__ import annotations

from typing import Iterable, Optional

PARAM_BITS = (2, 16)
INPUT_BITS = (2, 16)
FRAC_BITS = (0, 24)
SEGMENTS = (2, 256)
SCALE = (-24, 24)
BREAKPOINT = (-(1 << 31), (1 << 31) - 1)
OUTPUT_BITS = (2, 32)
OUTPUT_FRAC_BITS = (0, 48)
SHIFTED_LIMIT = 1 << 62  # |ACC| * 2^max(0, e - s) must stay below this
INT32_LIMIT = (1 << 31) - 1


def _max_abs(values: Iterable[int]) -> int:
    return max((abs(int(v)) for v in values), default=0)


def acc_bound(slopes: Iterable[int], intercepts: Iterable[int], input_bits: int, d: int) -> int:
    """Largest |ACC| of section 3 at scale d over every input code (inputs are clamped first)."""
    k, b = _max_abs(slopes), _max_abs(intercepts)
    x = 1 << (input_bits - 1)  # |qmin|, the largest input magnitude
    return k * x * (1 << max(-d, 0)) + b * (1 << max(d, 0))


def intermediate_bound(acc: int, frac_bits: int, d: int, output: Optional[tuple[int, int]]) -> int:
    """Largest |value| a runtime holds at scale d: ACC, and with output quantization ACC plus
    the rounding half before a right shift (and 2^t itself, which a portable floor division
    forms), or ACC shifted left (before the clamp) and the factor 2^-t itself (a table whose
    ACC is always 0 still multiplies by it: 1 << 48 is undefined in 32 bits)."""
    if output is None:
        return acc
    t = frac_bits + max(d, 0) - output[1]
    return max(acc + (1 << (t - 1)), 1 << t) if t > 0 else max(acc << (-t), 1 << (-t))


def shifted_bound(acc: int, frac_bits: int, d: int, output_frac_bits: int) -> int:
    """|ACC| * 2^max(0, e - s): what section 6 keeps below 2^62."""
    return acc << max(0, output_frac_bits - (frac_bits + max(d, 0)))


def runtime_bits(slopes: Iterable[int], intercepts: Iterable[int], input_bits: int, frac_bits: int,
                 scales: Iterable[int], output: Optional[tuple[int, int]]) -> int:
    """32 when every intermediate of every scale fits int32, else 64 (always enough in bounds)."""
    slopes, intercepts = list(slopes), list(intercepts)
    worst = max(intermediate_bound(acc_bound(slopes, intercepts, input_bits, d), frac_bits, d, output)
                for d in scales)
    return 32 if worst <= INT32_LIMIT else 64

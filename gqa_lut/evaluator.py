"""The bit-exact numpy reference evaluator of docs/lut-format.md section 3, and its metrics.

Every other runtime (PyTorch, C) is tested against `evaluate_codes`. Integer math is done in
int64, which holds every accumulator a P,Q <= 16 table at |d| <= 24 can produce.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from gqa_lut import bounds
from gqa_lut.quantization import code_values, input_codes, int_range, round_shift
from gqa_lut.errors import UsageError
from gqa_lut.table import OutputFormat, Table

DENSE_POINTS = 10_001


def accumulate(slopes: np.ndarray, intercepts: np.ndarray, breakpoints: np.ndarray,
               codes: np.ndarray, d: int) -> np.ndarray:
    """ACC of section 3 for integer inputs at scale d (ties go to the left segment).

    Takes raw arrays rather than a Table so the published tables, whose breakpoints repeat
    and which therefore are not valid files, are measured by this very function too.
    """
    codes = np.asarray(codes, dtype=np.int64)
    i = np.searchsorted(np.asarray(breakpoints, dtype=np.int64), codes, side="left")
    k = np.asarray(slopes, dtype=np.int64)[i]
    b = np.asarray(intercepts, dtype=np.int64)[i]
    if d >= 0:
        return k * codes + (b << d)
    return (k * codes << (-d)) + b


def quantize_output(acc: np.ndarray, s: int, output: OutputFormat) -> np.ndarray:
    lo, hi = int_range(output.bits)
    return np.clip(round_shift(acc, s - output.frac_bits), lo, hi)


def acc_frac_bits(frac_bits: int, d: int) -> int:
    """s of section 3: fractional bits of ACC."""
    return frac_bits + max(d, 0)


def evaluate_codes(table: Table, codes: np.ndarray, d: int) -> np.ndarray:
    """The integer a runtime must produce: Y with output quantization, else ACC.

    Inputs outside the Q-bit range are clamped first, as the hardware's input quantizer would.
    """
    if d not in table.breakpoints:
        raise UsageError(f"scale {d} is not in the table: it has scales {table.scales}")
    qmin, qmax = int_range(table.input_bits)
    codes = np.clip(np.asarray(codes, dtype=np.int64), qmin, qmax)
    acc = accumulate(table.slopes, table.intercepts, table.breakpoints[d], codes, d)
    if table.output is None:
        return acc
    return quantize_output(acc, acc_frac_bits(table.frac_bits, d), table.output)


def output_frac_bits(table: Table, d: int) -> int:
    """Fractional bits of what `evaluate_codes` returns at scale d."""
    return table.output.frac_bits if table.output is not None else acc_frac_bits(table.frac_bits, d)


def evaluate(table: Table, codes: np.ndarray, d: int) -> np.ndarray:
    """Real value of the table's output for integer input codes at scale d."""
    return np.ldexp(evaluate_codes(table, codes, d).astype(np.float64), -output_frac_bits(table, d))


def max_abs_acc(table: Table) -> int:
    """Largest |ACC| any input can produce: what an integer runtime's accumulator must hold."""
    return max(bounds.acc_bound(table.slopes, table.intercepts, table.input_bits, d) for d in table.scales)


def runtime_bits(table: Table) -> int:
    """32 or 64: the integer width that holds every intermediate of this table (section 6)."""
    out = None if table.output is None else (table.output.bits, table.output.frac_bits)
    return bounds.runtime_bits(table.slopes, table.intercepts, table.input_bits, table.frac_bits,
                               table.scales, out)


def metrics(table: Table, fn: Callable[[np.ndarray], np.ndarray]) -> dict:
    """The spec's section 4 metrics of a table against the exact function."""
    return raw_metrics(table.slopes, table.intercepts, table.breakpoints, table.frac_bits,
                       table.range, table.input_bits, fn, table.output)


def raw_metrics(slopes: np.ndarray, intercepts: np.ndarray, breakpoints: dict[int, np.ndarray],
                frac_bits: int, rng: tuple[float, float], input_bits: int,
                fn: Callable[[np.ndarray], np.ndarray],
                output: Optional[OutputFormat] = None) -> dict:
    lo, hi = rng
    per_scale, dense = {}, []
    max_err = 0.0
    xs = np.linspace(lo, hi, DENSE_POINTS)
    fx = fn(xs)
    k_real = np.ldexp(np.asarray(slopes, dtype=np.float64), -frac_bits)
    b_real = np.ldexp(np.asarray(intercepts, dtype=np.float64), -frac_bits)
    for d, bp in sorted(breakpoints.items()):
        codes = input_codes(lo, hi, d, input_bits)
        if codes.size:
            acc = accumulate(slopes, intercepts, bp, codes, d)
            s = acc_frac_bits(frac_bits, d)
            if output is not None:
                y = np.ldexp(quantize_output(acc, s, output).astype(np.float64), -output.frac_bits)
            else:
                y = np.ldexp(acc.astype(np.float64), -s)
            err = y - fn(code_values(codes, d))
            per_scale[str(d)] = float(np.mean(err ** 2))
            max_err = max(max_err, float(np.max(np.abs(err))))
        # The float view of the GQA-LUT paper: real breakpoints, real parameters, no rounding.
        i = np.searchsorted(code_values(bp, d), xs, side="left")
        dense.append(float(np.mean((k_real[i] * xs + b_real[i] - fx) ** 2)))
    return {
        "mse": float(np.mean(list(per_scale.values()))) if per_scale else float("nan"),
        "mse_per_scale": per_scale,
        "max_abs_err": max_err,
        "dense_mse": float(np.mean(dense)),
    }


def outside_metrics(table: Table, fn: Callable[[np.ndarray], np.ndarray], inside_max: float) -> dict:
    """How the table does on every code its scales represent outside the fitted range, where
    hardware still sees inputs: the largest |error| there (None without such codes; codes where
    the function is undefined, rsqrt below 0, are not counted), and the open interval (a, b)
    around the range on which every code of every scale is within the in-range max error
    `inside_max` (a = -inf / b = inf where no code fails on that side)."""
    lo, hi = table.range
    qmin, qmax = int_range(table.input_bits)
    codes = np.arange(qmin, qmax + 1, dtype=np.int64)
    tol = inside_max * (1 + 1e-9) + 1e-12
    worst, a, b = None, -np.inf, np.inf
    for d in table.scales:
        x = code_values(codes, d)
        out = (x < lo) | (x > hi)
        if not out.any():
            continue
        with np.errstate(all="ignore"):
            f = np.asarray(fn(x[out]), dtype=np.float64)
        err = np.abs(evaluate(table, codes[out], d) - f)
        err = np.where(np.isfinite(f), err, 0.0)
        worst = max(worst or 0.0, float(err.max()))
        xs = x[out]
        bad = xs[err > tol]
        a = max(a, float(bad[bad < lo].max(initial=-np.inf)))
        b = min(b, float(bad[bad > hi].min(initial=np.inf)))
    return {"outside_max_abs_err": worst, "valid_interval": [a, b]}


def outside_line(table: Table, fn: Callable[[np.ndarray], np.ndarray], inside_max: float) -> str:
    """One line for the CLI: which inputs the table is good on, beyond its fitted range."""
    m = outside_metrics(table, fn, inside_max)
    if m["outside_max_abs_err"] is None:
        return "outside the fitted range: no input code of any scale lies there"
    a, b = m["valid_interval"]
    if np.isinf(a) and np.isinf(b):
        where = "every code of every scale is within the in-range max error"
    else:
        span = f"{a:g} < x < {b:g}".replace("-inf < ", "").replace(" < inf", "")
        where = f"within the in-range max error only for {span}"
    return (f"outside the fitted range: max |error| {m['outside_max_abs_err']:.4e} on the codes the scales "
            f"represent; {where}")


def covering_scale(table: Table, amax: float) -> int:
    """Finest table scale d whose input range still holds amax (no clipping), else the coarsest."""
    _, qmax = int_range(table.input_bits)
    ok = [d for d in table.scales if amax * 2.0 ** d <= qmax + 0.5]
    return max(ok) if ok else min(table.scales)

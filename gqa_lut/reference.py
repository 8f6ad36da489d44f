"""Reading the published GQA-LUT tables (their JSON layout) and converting them to ours.

Their layout: {op: {"<d>": {"breakpoints": [...reals on 2^-d...], "slopes": [...reals on
2^-6...], "intercepts": [...]}}}, one slope/intercept set shared by every scale. Their
breakpoints may repeat at coarse scales (an empty segment), which gqa-lut/1 forbids: the
conversion then places strictly increasing breakpoints that change the fewest outputs, and
reports how many input codes changed, so nobody believes a lossy conversion is exact.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gqa_lut.errors import UsageError
from gqa_lut.evaluator import accumulate
from gqa_lut.quantization import int_range
from gqa_lut.segmentation import place
from gqa_lut.table import MAX_TABLE_BYTES, Table
from gqa_lut.io import parse_json, read_text_capped

REFERENCE_FRAC_BITS = 6


def shared_dir() -> Path:
    """The project's shared folder (specs and the published tables): GQA_SHARED, else the
    `shared` folder beside the repository."""
    return Path(os.environ.get("GQA_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def reference_dir() -> Path:
    """Where the published GQA-LUT tables are (shared/reference-tables)."""
    return shared_dir() / "reference-tables"


@dataclass(frozen=True)
class ReferenceTable:
    """A published table exactly as published: integer parameters, non-decreasing breakpoints."""

    op: str
    slopes: np.ndarray
    intercepts: np.ndarray
    breakpoints: dict[int, np.ndarray]
    frac_bits: int = REFERENCE_FRAC_BITS


def _on_grid(values: list, exp: int, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    scaled = np.ldexp(arr, exp)
    if not np.all(np.isfinite(scaled)) or np.any(scaled != np.rint(scaled)):
        bad = arr[(~np.isfinite(scaled)) | (scaled != np.rint(scaled))][0]
        raise UsageError(f"{what}: value {bad!r} is not on the 2^-{exp} grid")
    return np.rint(scaled).astype(np.int64)


def read_reference(path: str | Path, op: str | None = None) -> ReferenceTable:
    p = Path(path)
    doc = parse_json(read_text_capped(p, "reference file", MAX_TABLE_BYTES), f"reference file {str(p)!r}")
    if not isinstance(doc, dict) or not doc:
        raise UsageError(f"reference file {str(p)!r}: expected an object keyed by op name")
    if op is None:
        if len(doc) != 1:
            raise UsageError(f"reference file {str(p)!r} holds ops {sorted(doc)}: choose one with --op")
        op = next(iter(doc))
    if op not in doc:
        raise UsageError(f"reference file {str(p)!r} has no op {op!r}: it has {sorted(doc)}")
    scales = doc[op]
    if not isinstance(scales, dict) or not scales:
        raise UsageError(f"reference file {str(p)!r}: op {op!r} is not an object keyed by scale")
    slopes = intercepts = None
    bps: dict[int, np.ndarray] = {}
    for key, entry in scales.items():
        try:
            d = int(key)
        except ValueError:
            raise UsageError(f"reference file {str(p)!r}: scale key {key!r} is not an integer") from None
        for field in ("breakpoints", "slopes", "intercepts"):
            if not isinstance(entry, dict) or field not in entry:
                raise UsageError(f"reference file {str(p)!r}: scale {key} has no {field!r}")
        k = _on_grid(entry["slopes"], REFERENCE_FRAC_BITS, f"{op} scale {key} slopes")
        b = _on_grid(entry["intercepts"], REFERENCE_FRAC_BITS, f"{op} scale {key} intercepts")
        if slopes is None:
            slopes, intercepts = k, b
        elif not (np.array_equal(k, slopes) and np.array_equal(b, intercepts)):
            raise UsageError(f"reference file {str(p)!r}: scale {key} has other slopes or intercepts "
                             "than the first scale; gqa-lut/1 shares them across scales")
        bp = _on_grid(entry["breakpoints"], d, f"{op} scale {key} breakpoints")
        if bp.shape[0] != k.shape[0] - 1 or np.any(np.diff(bp) < 0):
            raise UsageError(f"reference file {str(p)!r}: scale {key} breakpoints are not "
                             f"{k.shape[0] - 1} non-decreasing values")
        bps[d] = bp
    return ReferenceTable(op, slopes, intercepts, dict(sorted(bps.items())))


def strict_breakpoints(slopes: np.ndarray, intercepts: np.ndarray, bp: np.ndarray, d: int,
                       input_bits: int, lo: float, hi: float) -> np.ndarray:
    """Strictly increasing breakpoints whose outputs stay closest (least squares over every
    input code of the fitted range; codes outside it only break ties) to a table with
    repeated breakpoints.

    The same shortest-path DP the search uses; positions run from below to above the Q-bit
    range, so segments with no room inside it can hide beyond it.
    """
    n = slopes.shape[0]
    qmin, qmax = int_range(input_bits)
    codes = np.arange(qmin - n - 1, qmax + n + 2, dtype=np.int64)
    seen = (codes >= qmin) & (codes <= qmax)
    want = accumulate(slopes, intercepts, bp, codes, d)
    acc = np.stack([accumulate(slopes[i:i + 1], intercepts[i:i + 1], np.zeros(0, np.int64), codes, d)
                    for i in range(n)], axis=1)  # (T, N): every line at every code
    diff = (acc - want[:, None]).astype(np.float64)
    inside = (codes >= np.ceil(np.ldexp(lo, d))) & (codes <= np.floor(np.ldexp(hi, d)))
    cost = np.where(seen[:, None], diff * diff, 0.0) * np.where(inside, 1.0, 1e-9)[:, None]
    idx, _ = place(cost[:, None, None, :], np.zeros(1, np.int64))
    return codes[idx[0, 0]]


def convert_reference(ref: ReferenceTable, lo: float, hi: float,
                      input_bits: int = 8, param_bits: int = 8) -> tuple[Table, dict[str, int]]:
    """Our format of a published table, and for each scale how many input codes changed output."""
    pmin, pmax = int_range(param_bits)
    for name, arr in (("slopes", ref.slopes), ("intercepts", ref.intercepts)):
        if np.any(arr < pmin) or np.any(arr > pmax):
            raise UsageError(f"reference {name} do not fit {param_bits}-bit parameters")
    qmin, qmax = int_range(input_bits)
    all_codes = np.arange(qmin, qmax + 1, dtype=np.int64)
    new_bps, changes = {}, {}
    for d, bp in ref.breakpoints.items():
        fixed = bp if np.all(np.diff(bp) > 0) else strict_breakpoints(ref.slopes, ref.intercepts, bp, d, input_bits, lo, hi)
        before = accumulate(ref.slopes, ref.intercepts, bp, all_codes, d)
        after = accumulate(ref.slopes, ref.intercepts, fixed, all_codes, d)
        new_bps[d] = fixed
        changes[str(d)] = int(np.count_nonzero(before != after))
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise UsageError(f"range [{lo}, {hi}] is not a finite range with lo < hi")
    table = Table(op=ref.op, range=(float(lo), float(hi)), slopes=ref.slopes,
                  intercepts=ref.intercepts, breakpoints=new_bps, frac_bits=ref.frac_bits,
                  param_bits=param_bits, input_bits=input_bits)
    return table.validate(), changes

"""The table file of docs/lut-format.md: one dataclass and strict validation; its file IO is gqa_lut.io."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gqa_lut import bounds
from gqa_lut.errors import UsageError
from gqa_lut.functions import CUSTOM_NAME
from gqa_lut.io import parse_json, read_text_capped, write_json_atomic
from gqa_lut.quantization import int_range

FORMAT = "gqa-lut/1"
# What `op` may hold: a registry name, or custom:<name> (lut-format.md section 5). Strict, because
# the name reaches C and Verilog comments, identifiers and file names: nothing that could end a
# comment or a string there ("*/", quotes, newlines) can pass.
OP_NAME = re.compile(rf"(?:[A-Za-z_][A-Za-z0-9_]{{0,63}}|custom:{CUSTOM_NAME})")
REQUIRED_KEYS = ("format", "op", "range", "segments", "param_bits", "frac_bits", "input_bits",
                 "slopes", "intercepts", "breakpoints")


@dataclass(frozen=True)
class OutputFormat:
    bits: int
    frac_bits: int


@dataclass(frozen=True, eq=False)
class Table:
    """An integer PWL table: shared slopes/intercepts, integer breakpoints for each scale d."""

    op: str
    range: tuple[float, float]
    slopes: np.ndarray
    intercepts: np.ndarray
    breakpoints: dict[int, np.ndarray]
    frac_bits: int
    param_bits: int = 8
    input_bits: int = 8
    output: Optional[OutputFormat] = None
    metrics: Optional[dict[str, Any]] = None
    search: Optional[dict[str, Any]] = field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "slopes", np.asarray(self.slopes, dtype=np.int64))
        object.__setattr__(self, "intercepts", np.asarray(self.intercepts, dtype=np.int64))
        object.__setattr__(self, "breakpoints", {int(d): np.asarray(p, dtype=np.int64)
                                                 for d, p in sorted(self.breakpoints.items())})

    @property
    def segments(self) -> int:
        return int(self.slopes.shape[0])

    @property
    def scales(self) -> list[int]:
        return sorted(self.breakpoints)

    def with_(self, **changes: Any) -> "Table":
        return replace(self, **changes)

    def validate(self) -> "Table":
        """Raise UsageError naming the first field outside the spec (sections 5 and 6); return self."""
        check_op_name(self.op)
        _check_int("param_bits", self.param_bits, bounds.PARAM_BITS)
        _check_int("input_bits", self.input_bits, bounds.INPUT_BITS)
        _check_int("frac_bits", self.frac_bits, bounds.FRAC_BITS)
        lo, hi = self.range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise UsageError(f"key 'range': [{lo}, {hi}] is not a finite range with lo < hi")
        n = self.segments
        if not bounds.SEGMENTS[0] <= n <= bounds.SEGMENTS[1]:
            raise UsageError(f"key 'slopes': {n} segments, allowed {bounds.SEGMENTS[0]} to {bounds.SEGMENTS[1]}")
        if self.intercepts.shape != (n,):
            raise UsageError(f"key 'intercepts': {self.intercepts.shape[0]} values for {n} segments")
        pmin, pmax = int_range(self.param_bits)
        for key, arr in (("slopes", self.slopes), ("intercepts", self.intercepts)):
            bad = (arr < pmin) | (arr > pmax)
            if bad.any():
                raise UsageError(f"key '{key}': value {int(arr[bad][0])} is outside the "
                                 f"{self.param_bits}-bit range [{pmin}, {pmax}]")
        if not self.breakpoints:
            raise UsageError("key 'breakpoints': no scale given")
        for d, p in self.breakpoints.items():
            if not bounds.SCALE[0] <= d <= bounds.SCALE[1]:
                raise UsageError(f"key 'breakpoints': scale {d} is outside {bounds.SCALE[0]}..{bounds.SCALE[1]}")
            if p.shape != (n - 1,):
                raise UsageError(f"key 'breakpoints.{d}': {p.shape[0] if p.ndim else 0} breakpoints, "
                                 f"{n - 1} expected for {n} segments")
            out = (p < bounds.BREAKPOINT[0]) | (p > bounds.BREAKPOINT[1])
            if out.any():
                raise UsageError(f"key 'breakpoints.{d}': {int(p[out][0])} is outside the int32 range "
                                 f"[{bounds.BREAKPOINT[0]}, {bounds.BREAKPOINT[1]}]")
            if np.any(np.diff(p) <= 0):
                j = int(np.argmax(np.diff(p) <= 0))
                raise UsageError(f"key 'breakpoints.{d}': not strictly increasing at index {j + 1} "
                                 f"({int(p[j])} then {int(p[j + 1])})")
        if self.output is not None:
            _check_int("output.bits", self.output.bits, bounds.OUTPUT_BITS)
            _check_int("output.frac_bits", self.output.frac_bits, bounds.OUTPUT_FRAC_BITS)
            for d in self.scales:
                acc = bounds.acc_bound(self.slopes, self.intercepts, self.input_bits, d)
                if bounds.shifted_bound(acc, self.frac_bits, d, self.output.frac_bits) >= bounds.SHIFTED_LIMIT:
                    raise UsageError(f"key 'output.frac_bits': {self.output.frac_bits} shifts the largest "
                                     f"accumulator of scale {d} ({acc}) to 2^62 or beyond")
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "op": self.op,
            "range": [float(self.range[0]), float(self.range[1])],
            "segments": self.segments,
            "param_bits": self.param_bits,
            "frac_bits": self.frac_bits,
            "input_bits": self.input_bits,
            "slopes": [int(v) for v in self.slopes],
            "intercepts": [int(v) for v in self.intercepts],
            "breakpoints": {str(d): [int(v) for v in p] for d, p in self.breakpoints.items()},
            "output": None if self.output is None else {"bits": self.output.bits,
                                                        "frac_bits": self.output.frac_bits},
            "metrics": self.metrics,
            "search": self.search,
        }


def check_op_name(op: Any) -> str:
    """The table's `op` as OP_NAME allows it, else one line naming the value."""
    if not isinstance(op, str) or not OP_NAME.fullmatch(op):
        raise UsageError(f"key 'op': {op!r} is not allowed: use a registry name (letters, digits, _; "
                         "at most 64) or custom:<name> (letters, digits, _ and -; at most 64)")
    return op


def _check_int(key: str, v: Any, allowed: tuple[int, int]) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not allowed[0] <= v <= allowed[1]:
        raise UsageError(f"key '{key}': {v!r} is not an integer from {allowed[0]} to {allowed[1]}")


def _int(key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise UsageError(f"key '{key}': {v!r} is not an integer")
    return v


def _int_list(key: str, v: Any, allowed: tuple[int, int]) -> list[int]:
    """Integers within `allowed`, checked before numpy sees them (a 40-digit integer would
    otherwise overflow int64 with a traceback instead of an error naming the key)."""
    if not isinstance(v, list):
        raise UsageError(f"key '{key}': expected a list of integers, got {type(v).__name__}")
    out = [_int(f"{key}[{i}]", x) for i, x in enumerate(v)]
    for i, x in enumerate(out):
        if not allowed[0] <= x <= allowed[1]:
            raise UsageError(f"key '{key}[{i}]': {x} is outside [{allowed[0]}, {allowed[1]}]")
    return out


def table_from_json(doc: Any) -> Table:
    """Build and validate a Table from a parsed file, naming the key of the first problem."""
    if not isinstance(doc, dict):
        raise UsageError("table file: top level is not a JSON object")
    if doc.get("format") != FORMAT:
        raise UsageError(f"key 'format': {doc.get('format')!r} is not {FORMAT!r}")
    for key in REQUIRED_KEYS:
        if key not in doc:
            raise UsageError(f"key '{key}' is missing")
    rng = doc["range"]
    if (not isinstance(rng, list) or len(rng) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng)):
        raise UsageError(f"key 'range': {rng!r} is not [lo, hi]")
    if not all(abs(v) < 1e300 for v in rng):
        raise UsageError(f"key 'range': {rng!r} is not a finite range")
    check_op_name(doc["op"])
    bps = doc["breakpoints"]
    if not isinstance(bps, dict):
        raise UsageError("key 'breakpoints': expected an object keyed by scale")
    parsed: dict[int, list[int]] = {}
    for k, v in bps.items():
        try:
            d = int(k)
        except (TypeError, ValueError):
            raise UsageError(f"key 'breakpoints': scale key {k!r} is not an integer") from None
        if str(d) != k:
            raise UsageError(f"key 'breakpoints': scale key {k!r} is not an integer")
        parsed[d] = _int_list(f"breakpoints.{k}", v, bounds.BREAKPOINT)
    out = doc.get("output")
    output = None
    if out is not None:
        if not isinstance(out, dict) or "bits" not in out or "frac_bits" not in out:
            raise UsageError("key 'output': expected null or {\"bits\": R, \"frac_bits\": e}")
        output = OutputFormat(_int("output.bits", out["bits"]), _int("output.frac_bits", out["frac_bits"]))
    for key in ("metrics", "search"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            raise UsageError(f"key '{key}': expected null or an object")
    param_bits = _int("param_bits", doc["param_bits"])
    _check_int("param_bits", param_bits, bounds.PARAM_BITS)
    params = int_range(param_bits)
    slopes = _int_list("slopes", doc["slopes"], params)
    segments = _int("segments", doc["segments"])
    if segments != len(slopes):
        raise UsageError(f"key 'segments': {segments} but {len(slopes)} slopes")
    table = Table(
        op=doc["op"], range=(float(rng[0]), float(rng[1])),
        slopes=np.array(slopes, dtype=np.int64),
        intercepts=np.array(_int_list("intercepts", doc["intercepts"], params), dtype=np.int64),
        breakpoints={d: np.array(p, dtype=np.int64) for d, p in parsed.items()},
        frac_bits=_int("frac_bits", doc["frac_bits"]),
        param_bits=param_bits,
        input_bits=_int("input_bits", doc["input_bits"]),
        output=output, metrics=doc.get("metrics"), search=doc.get("search"),
    )
    return table.validate()


MAX_TABLE_BYTES = 64 << 20  # a 256-segment table of 16-bit codes at 49 scales is under 1 MB


def load_table(path: str | os.PathLike) -> Table:
    p = Path(path)
    doc = parse_json(read_text_capped(p, "table file", MAX_TABLE_BYTES), f"table file {str(p)!r}")
    try:
        return table_from_json(doc)
    except UsageError as exc:
        raise UsageError(f"{p}: {exc}") from None


FLOAT_REL_TOL = 1e-9  # floats in a table file (metrics, history) are numpy math: last-ulp noise
VOLATILE_KEYS = ("seconds", "tool_version")  # what describes the run, not the table


def differences(a: dict, b: dict, rel_tol: float = FLOAT_REL_TOL, path: str = "") -> list[str]:
    """Where two table documents (`to_json()`) differ: integers, strings and structure exactly,
    floats within `rel_tol` (metrics and search history come from vectorised numpy math whose
    last ulp depends on the CPU), wall-clock keys not at all. Empty when they match."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k in VOLATILE_KEYS:
                continue
            where = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                out.append(f"{where}: only in {'the second' if k not in a else 'the first'}")
            else:
                out += differences(a[k], b[k], rel_tol, where)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items against {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, rel_tol, f"{path}[{i}]")]
    if isinstance(a, float) or isinstance(b, float):
        if (isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
                and not isinstance(b, bool) and (math.isclose(a, b, rel_tol=rel_tol, abs_tol=0.0)
                                                 or (math.isnan(a) and math.isnan(b)))):
            return []
        return [f"{path}: {a!r} against {b!r}"]
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} against {b!r}"]


def save_table(table: Table, path: str | os.PathLike) -> None:
    write_json_atomic(path, table.validate().to_json())

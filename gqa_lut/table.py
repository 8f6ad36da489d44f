"""The table file of lut-format.md: one dataclass, strict validation, atomic JSON IO."""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gqa_lut.errors import UsageError
from gqa_lut.quantization import int_range

FORMAT = "gqa-lut/1"
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
        """Raise UsageError naming the first field that breaks the spec; return self."""
        for name, bits in (("param_bits", self.param_bits), ("input_bits", self.input_bits)):
            if not isinstance(bits, int) or not 2 <= bits <= 16:
                raise UsageError(f"key '{name}': {bits!r} is not an integer from 2 to 16")
        if not isinstance(self.frac_bits, int) or self.frac_bits < 0:
            raise UsageError(f"key 'frac_bits': {self.frac_bits!r} is not an integer >= 0")
        lo, hi = self.range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise UsageError(f"key 'range': [{lo}, {hi}] is not a finite range with lo < hi")
        n = self.segments
        if n < 2:
            raise UsageError(f"key 'slopes': {n} segments, at least 2 are needed")
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
            if p.shape != (n - 1,):
                raise UsageError(f"key 'breakpoints.{d}': {p.shape[0] if p.ndim else 0} breakpoints, "
                                 f"{n - 1} expected for {n} segments")
            if np.any(np.diff(p) <= 0):
                j = int(np.argmax(np.diff(p) <= 0))
                raise UsageError(f"key 'breakpoints.{d}': not strictly increasing at index {j + 1} "
                                 f"({int(p[j])} then {int(p[j + 1])})")
        if self.output is not None:
            if not isinstance(self.output.bits, int) or not 2 <= self.output.bits <= 32:
                raise UsageError(f"key 'output.bits': {self.output.bits!r} is not an integer from 2 to 32")
            if not isinstance(self.output.frac_bits, int):
                raise UsageError(f"key 'output.frac_bits': {self.output.frac_bits!r} is not an integer")
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


def _int(key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise UsageError(f"key '{key}': {v!r} is not an integer")
    return v


def _int_list(key: str, v: Any) -> list[int]:
    if not isinstance(v, list):
        raise UsageError(f"key '{key}': expected a list of integers, got {type(v).__name__}")
    return [_int(f"{key}[{i}]", x) for i, x in enumerate(v)]


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
    if not isinstance(doc["op"], str) or not doc["op"]:
        raise UsageError(f"key 'op': {doc['op']!r} is not a name")
    bps = doc["breakpoints"]
    if not isinstance(bps, dict):
        raise UsageError("key 'breakpoints': expected an object keyed by scale")
    parsed: dict[int, list[int]] = {}
    for k, v in bps.items():
        try:
            d = int(k)
        except (TypeError, ValueError):
            raise UsageError(f"key 'breakpoints': scale key {k!r} is not an integer") from None
        if str(d) != k.strip():
            raise UsageError(f"key 'breakpoints': scale key {k!r} is not an integer")
        parsed[d] = _int_list(f"breakpoints.{k}", v)
    out = doc.get("output")
    output = None
    if out is not None:
        if not isinstance(out, dict) or "bits" not in out or "frac_bits" not in out:
            raise UsageError("key 'output': expected null or {\"bits\": R, \"frac_bits\": e}")
        output = OutputFormat(_int("output.bits", out["bits"]), _int("output.frac_bits", out["frac_bits"]))
    slopes = _int_list("slopes", doc["slopes"])
    segments = _int("segments", doc["segments"])
    if segments != len(slopes):
        raise UsageError(f"key 'segments': {segments} but {len(slopes)} slopes")
    table = Table(
        op=doc["op"], range=(float(rng[0]), float(rng[1])),
        slopes=np.array(slopes, dtype=np.int64),
        intercepts=np.array(_int_list("intercepts", doc["intercepts"]), dtype=np.int64),
        breakpoints={d: np.array(p, dtype=np.int64) for d, p in parsed.items()},
        frac_bits=_int("frac_bits", doc["frac_bits"]),
        param_bits=_int("param_bits", doc["param_bits"]),
        input_bits=_int("input_bits", doc["input_bits"]),
        output=output, metrics=doc.get("metrics"), search=doc.get("search"),
    )
    return table.validate()


def load_table(path: str | os.PathLike) -> Table:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"table file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"table file {str(p)!r} cannot be read: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"table file {str(p)!r} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    try:
        return table_from_json(doc)
    except UsageError as exc:
        raise UsageError(f"{p}: {exc}") from None


def write_json_atomic(path: str | os.PathLike, doc: Any) -> None:
    """Write to a temporary file beside the target, then rename: never a half-written file."""
    _write_atomic(path, lambda fh: (json.dump(doc, fh, indent=2), fh.write("\n")))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    _write_atomic(path, lambda fh: fh.write(text))


def _write_atomic(path: str | os.PathLike, write: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            write(fh)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_table(table: Table, path: str | os.PathLike) -> None:
    write_json_atomic(path, table.validate().to_json())

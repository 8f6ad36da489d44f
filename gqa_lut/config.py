"""What a fit is asked for (FitConfig), and that request resolved and checked once (FitSpec).

Every check of a request lives in `validate_config`; the CLI passes values through and the
search reads only the spec. The request is recorded in the table file, so a table can be
fitted again from the file alone (`gqa-lut refit`).
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from gqa_lut import bounds
from gqa_lut.errors import UsageError
from gqa_lut.functions import CUSTOM_NAME, Op, custom_op, get_op, with_estimated_tails
from gqa_lut.quantization import check_bits, check_int
from gqa_lut.table import OutputFormat


SEED_MAX = 2 ** 32 - 1  # what numpy's and DEAP's random generators take


@dataclass
class FitConfig:
    """What a user asks `fit` for; None means the op's default. Recorded in every table file
    (`search.config`), so `gqa-lut refit` can fit the table again from the file alone."""

    segments: int = 8
    param_bits: int = 8
    input_bits: int = 8
    frac_bits: Optional[int] = None  # None: the largest that fits the parameters
    range: Optional[tuple[float, float]] = None
    scale_range: Optional[tuple[int, int]] = None  # inclusive (d0, d1)
    population: int = 40
    generations: int = 30
    seed: int = 0
    objective: str = "mse"
    weights: Optional[np.ndarray] = None  # activation samples (1-D) or (value, weight) rows
    output: Optional[OutputFormat] = None
    patience: int = 10  # generations without improvement before stopping early
    cxpb: float = 0.6
    mutpb: float = 0.5
    chunks: int = 1  # population chunks handed to toolbox.map (set to the pool's size); no effect on results
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The request as the file records it; weights by their digest (the array is the user's)."""
        return {
            "segments": self.segments, "param_bits": self.param_bits, "input_bits": self.input_bits,
            "frac_bits": self.frac_bits, "range": None if self.range is None else [float(v) for v in self.range],
            "scale_range": None if self.scale_range is None else [int(v) for v in self.scale_range],
            "population": self.population, "generations": self.generations, "seed": self.seed,
            "objective": self.objective, "patience": self.patience, "cxpb": self.cxpb, "mutpb": self.mutpb,
            "output": None if self.output is None else {"bits": self.output.bits, "frac_bits": self.output.frac_bits},
            "weights": None if self.weights is None else weights_digest(self.weights),
        }

    _RECORDED = ("segments", "param_bits", "input_bits", "frac_bits", "range", "scale_range", "population",
                 "generations", "seed", "objective", "patience", "cxpb", "mutpb")

    @classmethod
    def from_json(cls, doc: dict[str, Any], weights: Optional[np.ndarray] = None) -> "FitConfig":
        """The request recorded by `to_json`; a weighted fit needs its weights back (checked)."""
        if not isinstance(doc, dict):
            raise UsageError("search.config: expected an object")
        want = doc.get("weights")
        if want is not None and not (isinstance(want, dict) and isinstance(want.get("sha256"), str)
                                     and isinstance(want.get("samples"), int)):
            raise UsageError("search.config.weights: expected null or {\"sha256\": ..., \"samples\": N}")
        if want is not None and weights is None:
            raise UsageError(f"the table was fitted with weights ({want['samples']} samples, sha256 "
                             f"{want['sha256'][:12]}...): pass the same --weights")
        if want is not None and weights_digest(weights) != want:
            raise UsageError("the weights given are not the ones the table was fitted with (sha256 differs)")
        missing = [k for k in cls._RECORDED if k not in doc]
        if missing:
            raise UsageError(f"search.config: key {missing[0]!r} is missing")
        out = doc.get("output")
        if out is not None and not (isinstance(out, dict) and {"bits", "frac_bits"} <= set(out)):
            raise UsageError("search.config.output: expected null or {\"bits\": R, \"frac_bits\": e}")
        for key in ("range", "scale_range"):
            v = doc[key]
            if v is not None and not (isinstance(v, list) and len(v) == 2
                                      and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v)):
                raise UsageError(f"search.config.{key}: {v!r} is not null or a pair of numbers")
        return cls(segments=doc["segments"], param_bits=doc["param_bits"], input_bits=doc["input_bits"],
                   frac_bits=doc["frac_bits"], range=None if doc["range"] is None else tuple(doc["range"]),
                   scale_range=None if doc["scale_range"] is None else tuple(doc["scale_range"]),
                   population=doc["population"], generations=doc["generations"], seed=doc["seed"],
                   objective=doc["objective"], patience=doc["patience"], cxpb=doc["cxpb"], mutpb=doc["mutpb"],
                   output=None if out is None else OutputFormat(out["bits"], out["frac_bits"]),
                   weights=weights if want is not None else None)


def weights_digest(weights: np.ndarray) -> dict[str, Any]:
    arr = np.ascontiguousarray(weights, dtype=np.float64)
    return {"sha256": hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest(), "samples": int(arr.shape[0])}


@dataclass(frozen=True)
class FitSpec:
    """A FitConfig resolved against its op, once: defaults filled in, every value checked.

    `scales` is the tuple of scale exponents d the table gets; frac_bits is None until
    `fit` resolves the automatic choice."""

    op: Op
    lo: float
    hi: float
    scales: tuple[int, ...]
    segments: int
    param_bits: int
    input_bits: int
    frac_bits: Optional[int]
    output: Optional[OutputFormat]
    objective: str
    weights: Optional[np.ndarray]
    population: int
    generations: int
    patience: int
    seed: int
    cxpb: float
    mutpb: float
    chunks: int


def resolve_op(op: Op | str | Callable[[np.ndarray], np.ndarray], cfg: FitConfig) -> Op:
    if isinstance(op, Op):
        return op
    if isinstance(op, str):
        return get_op(op)
    if callable(op):
        if cfg.range is None:
            raise UsageError("a custom function needs a range: pass FitConfig(range=(lo, hi))")
        name = getattr(op, "__name__", "fn")  # a lambda's "<lambda>", or any odd name: "fn"
        return custom_op(name if isinstance(name, str) and re.fullmatch(CUSTOM_NAME, name) else "fn", op,
                         *cfg.range)
    raise UsageError(f"op {op!r} is neither an op name nor a callable")


def validate_config(op: Op, cfg: FitConfig) -> FitSpec:
    """Every check of a request, in one place, and the spec the rest of the fit reads."""
    check_bits("param bits", cfg.param_bits, *bounds.PARAM_BITS)
    check_bits("input bits", cfg.input_bits, *bounds.INPUT_BITS)
    check_int("segments", cfg.segments, *bounds.SEGMENTS)
    lo, hi = cfg.range if cfg.range is not None else op.range
    if not (math.isfinite(lo) and math.isfinite(hi) and math.isfinite(hi - lo)):
        raise UsageError(f"range [{lo}, {hi}] is not finite: its ends and its width must be finite floats")
    if not lo < hi:
        raise UsageError(f"range [{lo:g}, {hi:g}] is empty or reversed: LO must be below HI")
    op.check_range(lo, hi)
    d0, d1 = cfg.scale_range if cfg.scale_range is not None else op.scale_range
    if d0 > d1:
        raise UsageError(f"scales {d0} {d1} are reversed: give the smallest exponent first")
    if d0 < bounds.SCALE[0] or d1 > bounds.SCALE[1]:
        raise UsageError(f"scales {d0} {d1} are not allowed: exponents must lie in "
                         f"{bounds.SCALE[0]}..{bounds.SCALE[1]}")
    if cfg.frac_bits is not None:
        check_int("frac bits", cfg.frac_bits, *bounds.FRAC_BITS)
    check_int("patience", cfg.patience, 1)
    check_int("seed", cfg.seed, 0, SEED_MAX)
    for key in ("cxpb", "mutpb"):
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise UsageError(f"{key} {v!r} is not allowed: use a probability from 0 to 1")
    if cfg.output is not None:
        check_output(op, lo, hi, cfg.output)
    if cfg.weights is not None:
        check_weights(cfg.weights, lo, hi)
    check_int("population", cfg.population, 4)
    check_int("generations", cfg.generations, 0)
    check_int("chunks", cfg.chunks, 1)
    if cfg.objective not in ("mse", "max"):
        raise UsageError(f"objective {cfg.objective!r} is not allowed: use mse or max")
    op = with_estimated_tails(op, lo, hi, cfg.input_bits, d0, cfg.param_bits)
    return FitSpec(op=op, lo=float(lo), hi=float(hi), scales=tuple(range(d0, d1 + 1)), segments=cfg.segments,
                   param_bits=cfg.param_bits, input_bits=cfg.input_bits, frac_bits=cfg.frac_bits,
                   output=cfg.output, objective=cfg.objective, weights=cfg.weights, population=cfg.population,
                   generations=cfg.generations, patience=cfg.patience, seed=cfg.seed, cxpb=cfg.cxpb,
                   mutpb=cfg.mutpb, chunks=cfg.chunks)


def check_output(op: Op, lo: float, hi: float, output: OutputFormat) -> None:
    """Output bits and fractional bits within the spec, and a grid that holds the function:
    a format whose largest value is under half the function's reach saturates most outputs."""
    check_bits("output bits", output.bits, *bounds.OUTPUT_BITS)
    e = output.frac_bits
    check_int("output frac bits", e, *bounds.OUTPUT_FRAC_BITS)
    with np.errstate(all="ignore"):
        y = op.fn(np.linspace(lo, hi, 4097))
    reach = float(np.max(np.abs(y[np.isfinite(y)]), initial=0.0))
    holds = math.ldexp((1 << (output.bits - 1)) - 1, -e)
    if reach > 2 * holds:
        best = math.floor(output.bits - 1 - math.log2(reach))
        fix = (f"use --output-frac-bits {best} or fewer" if best >= 0 else
               f"raise --output-bits (at least {math.ceil(math.log2(reach)) + 1})")
        raise UsageError(f"output frac bits {e} is not allowed: {output.bits}-bit outputs with {e} fractional "
                         f"bits hold |y| <= {holds:.3g}, but {op.name} reaches {reach:.3g} on [{lo:g}, {hi:g}]: {fix}")


def check_weights(weights: np.ndarray, lo: float, hi: float) -> None:
    """An activation histogram must put some weight inside the fitted range, or the fit would
    silently be unweighted while its file says it is weighted."""
    if weights.ndim == 1:
        inside = (weights >= lo) & (weights <= hi)
        if not inside.any():
            raise UsageError(f"weights: none of the {weights.size} samples lies inside range [{lo:g}, {hi:g}] "
                             f"(they span [{weights.min():g}, {weights.max():g}])")
        return
    if not np.any(weights[:, 1] > 0):
        raise UsageError("weights: every weight is 0: give at least one positive weight")
    inside = (weights[:, 0] >= lo) & (weights[:, 0] <= hi) & (weights[:, 1] > 0)
    if not inside.any():
        raise UsageError(f"weights: no row with a positive weight lies inside range [{lo:g}, {hi:g}]")

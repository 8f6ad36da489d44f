"""The fitting half of `gqa-lut sweep`: one op over a grid of (segments, bits), every request
checked before the first fit starts, fits spread over processes, tables and a CSV written."""
from __future__ import annotations

import csv
import io
import itertools
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from gqa_lut.config import FitConfig, validate_config
from gqa_lut.functions import get_op
from gqa_lut.search import fit
from gqa_lut.table import Table, save_table
from gqa_lut.io import write_text_atomic


def grid_configs(op: str, segments: Sequence[int], bits: Sequence[int], base: FitConfig) -> list[FitConfig]:
    """One config per (bits, segments), each validated now (a bad value fails before any fit)."""
    resolved = get_op(op)
    configs = [replace(base, segments=s, param_bits=b, input_bits=b) for b, s in itertools.product(bits, segments)]
    for cfg in configs:
        validate_config(resolved, cfg)
    return configs


def _fit_one(task: tuple[str, FitConfig]) -> Table:
    return fit(*task)


def fit_grid(op: str, configs: list[FitConfig], workers: int = 1) -> list[Table]:
    tasks = [(op, cfg) for cfg in configs]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            return list(pool.map(_fit_one, tasks))
    return list(map(_fit_one, tasks))


def save_grid(tables: list[Table], out_dir: Path, log: Callable[[str], None] = print) -> list[dict]:
    """Each table as <op>_<bits>b_<segments>s.json and a sweep.csv row; returns the rows."""
    rows = []
    for t in tables:
        path = out_dir / f"{t.op.replace(':', '_')}_{t.param_bits}b_{t.segments}s.json"
        save_table(t, path)
        rows.append({"op": t.op, "segments": t.segments, "bits": t.param_bits, "frac_bits": t.frac_bits,
                     "mse": t.metrics["mse"], "max_abs_err": t.metrics["max_abs_err"],
                     "dense_mse": t.metrics["dense_mse"], "seconds": t.search["seconds"], "file": path.name})
        log(f"{t.op} {t.segments:>3} segments {t.param_bits:>2} bits: mse {t.metrics['mse']:.3e}")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out_dir / "sweep.csv", text.getvalue())
    return rows

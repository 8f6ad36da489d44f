"""Per-site tables: each activation's table fitted again to the inputs that site saw.

A shipped table spreads its error evenly over its range; an LLM's SiLU inputs sit mostly in
[-4, 3] at one or two scales. `calibrate(model, batches, fit=True)` keeps a sample of each
activation's inputs, and fits, per site, a table of the same function, segments and bits
weighted by that sample and restricted to the scales the site uses (its features' and its
tensor's). Fits run in parallel processes and are cached on disk keyed by the request and
the sample's digest, so calibrating the same model on the same batches again fits nothing.
Under torch.distributed every rank gathers every rank's samples and fits the same tables
(a fit is deterministic for a given request and seed).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from gqa_lut.config import FitConfig
from gqa_lut.functions import OPS
from gqa_lut.io import write_json_atomic
from gqa_lut.table import Table, table_from_json

SAMPLES_PER_BATCH = 16384  # per site and batch: the weights need a histogram, not every value
POPULATION, GENERATIONS = 20, 15  # the search budget of one site (about 4 s on one core for 16 segments)


def cache_dir() -> Path:
    root = os.environ.get("GQA_LUT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "gqa_lut")
    return Path(root) / "site_tables"


def site_request(table: Table, scales: list[int], samples: np.ndarray) -> Optional[FitConfig]:
    """The fit for one site: its table's function, segments and bits, over the scales in use,
    on a range that holds every code of the coarsest of them; None for a function the fitter
    does not know (a custom table's)."""
    if table.op not in OPS or samples.size == 0:
        return None
    lo = min(scales)
    reach = 2.0 ** (table.input_bits - 1 - lo)
    rng = (min(table.range[0], -reach), max(table.range[1], reach))
    return FitConfig(segments=table.segments, param_bits=table.param_bits, input_bits=table.input_bits,
                     frac_bits=table.frac_bits, range=rng, scale_range=(lo, max(scales)), population=POPULATION,
                     generations=GENERATIONS, seed=0, weights=samples)


def _key(op: str, cfg: FitConfig) -> str:
    return hashlib.sha256(json.dumps([op, cfg.to_json()], sort_keys=True).encode()).hexdigest()[:24]


def _fit_one(job: tuple[str, FitConfig]) -> dict:
    from gqa_lut.search import fit
    op, cfg = job
    return fit(op, cfg).to_json()


def fit_site_tables(requests: dict[str, tuple[str, FitConfig]], workers: Optional[int] = None) -> dict[str, Table]:
    """{site: table} for {site: (op, request)}: cached fits read back, the rest fitted, one
    process per core."""
    out: dict[str, Table] = {}
    todo: dict[str, tuple[str, FitConfig]] = {}
    folder = cache_dir()
    for name, (op, cfg) in requests.items():
        path = folder / f"{_key(op, cfg)}.json"
        if path.exists():
            try:
                out[name] = table_from_json(json.loads(path.read_text())).validate()
                continue
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache entry is fitted again
        todo[name] = (op, cfg)
    if todo:
        workers = min(len(todo), workers or os.cpu_count() or 1)
        jobs = list(todo.items())
        if workers > 1:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                docs = list(pool.map(_fit_one, [j for _, j in jobs]))
        else:
            docs = [_fit_one(j) for _, j in jobs]
        for (name, (op, cfg)), doc in zip(jobs, docs):
            out[name] = table_from_json(doc).validate()
            try:
                folder.mkdir(parents=True, exist_ok=True)
                write_json_atomic(folder / f"{_key(op, cfg)}.json", doc)
            except OSError:
                pass  # no cache where it cannot be written: the fit is still used
    return out

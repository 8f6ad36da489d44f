"""`gqa-lut sweep`: fit a grid of (segments, bits) for one op, write the tables, a CSV and a
plot of error against segments for each bit-width. Fits run in parallel over processes
through the same map hook the search uses for its fitness (here: one fit per task)."""
from __future__ import annotations

import csv
import io
import itertools
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

from gqa_lut.search import FitConfig, fit
from gqa_lut.table import Table, save_table, write_text_atomic
from plots._mpl import plt, save


def _fit_one(args: tuple) -> Table:
    op, segments, bits, base = args
    cfg = FitConfig(**{**base, "segments": segments, "param_bits": bits, "input_bits": bits})
    return fit(op, cfg)


def sweep(op: str, segments: Sequence[int], bits: Sequence[int], out_dir: Path, workers: int = 1,
          base: Optional[dict] = None, log: Callable[[str], None] = print) -> list[dict]:
    base = dict(base or {})
    tasks = [(op, s, b, base) for b, s in itertools.product(bits, segments)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            tables = list(pool.map(_fit_one, tasks))
    else:
        tables = list(map(_fit_one, tasks))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for (_, s, b, _), t in zip(tasks, tables):
        path = out_dir / f"{t.op.replace(':', '_')}_{b}b_{s}s.json"
        save_table(t, path)
        rows.append({"op": t.op, "segments": s, "bits": b, "frac_bits": t.frac_bits, "mse": t.metrics["mse"],
                     "max_abs_err": t.metrics["max_abs_err"], "dense_mse": t.metrics["dense_mse"],
                     "seconds": t.search["seconds"], "file": path.name})
        log(f"{t.op} {s:>3} segments {b:>2} bits: mse {t.metrics['mse']:.3e}")
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out_dir / "sweep.csv", text.getvalue())
    fig = sweep_figure(rows)
    save(fig, out_dir / "sweep.png")
    return rows


def sweep_figure(rows: list[dict]):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for b in sorted({r["bits"] for r in rows}):
        sel = sorted((r for r in rows if r["bits"] == b), key=lambda r: r["segments"])
        ax.plot([r["segments"] for r in sel], [r["mse"] for r in sel], marker="o", label=f"{b}-bit")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("segments")
    ax.set_ylabel("mse on the input grids")
    ax.set_title(f"{rows[0]['op']}: error against segments per bit-width")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return fig

"""The figure of `gqa-lut sweep`: error against segments, one line per bit-width (the fits
themselves are gqa_lut/sweep.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from gqa_lut.config import FitConfig
from gqa_lut.sweep import fit_grid, grid_configs, save_grid
from plots._mpl import plt, save


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


def sweep(op: str, segments: Sequence[int], bits: Sequence[int], out_dir: Path, workers: int = 1,
          base: Optional[dict] = None, log: Callable[[str], None] = print) -> list[dict]:
    """Fit the grid (gqa_lut.sweep), write the tables and sweep.csv, and draw sweep.png."""
    configs = grid_configs(op, segments, bits, FitConfig(**(base or {})))
    rows = save_grid(fit_grid(op, configs, workers), out_dir, log)
    save(sweep_figure(rows), out_dir / "sweep.png")
    return rows

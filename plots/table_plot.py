"""The exact function against one or more tables, and where the error sits.

Top panel: the exact function (dense) and each table's integer output on the input codes of
one scale, breakpoints marked. Bottom panel: table minus exact on those codes, the largest
error annotated. Several tables overlay with a legend (ours against a published table, say).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import math

import numpy as np

from gqa_lut.errors import UsageError
from gqa_lut.evaluator import evaluate
from gqa_lut.quantization import code_values, input_codes, int_range
from gqa_lut.table import Table
from plots._mpl import plt


def plot_tables(tables: Sequence[Table], fn: Callable[[np.ndarray], np.ndarray], labels: Sequence[str],
                scale: Optional[int] = None, view: Optional[tuple[float, float]] = None):
    """The figure (not saved): top axes function + tables, bottom axes errors."""
    if not tables:
        raise UsageError("no table to plot")
    common = set(tables[0].scales).intersection(*[t.scales for t in tables[1:]])
    if scale is None:
        if not common:
            raise UsageError("the tables share no scale: pass --scale for one of them")
        scale = max(common)
    for t, name in zip(tables, labels):
        if scale not in t.scales:
            raise UsageError(f"scale {scale} is not in {name}: it has scales {t.scales}")
    # the fitted range (or the view asked for), as far as this scale's input codes reach
    lo, hi = tables[0].range if view is None else view
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UsageError(f"range [{lo:g}, {hi:g}] is not finite")
    qmin, qmax = int_range(tables[0].input_bits)
    lo, hi = max(lo, qmin * 2.0 ** -scale), min(hi, qmax * 2.0 ** -scale)
    if not lo < hi:
        raise UsageError(f"range [{lo:g}, {hi:g}] is empty or reversed")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True, height_ratios=(3, 2))
    xs = np.linspace(lo, hi, 2001)
    top.plot(xs, fn(xs), color="black", lw=1.2, label="exact")
    worst = (0.0, 0.0, "")
    for t, name in zip(tables, labels):
        codes = input_codes(lo, hi, scale, t.input_bits)
        if codes.size == 0:
            raise UsageError(f"{name} has no input code in [{lo:g}, {hi:g}] at scale {scale}")
        x = code_values(codes, scale)
        y = evaluate(t, codes, scale)
        line, = top.plot(x, y, drawstyle="default", lw=1.0, marker=".", ms=3, label=f"{name} ({t.segments} seg)")
        bp = t.breakpoints[scale]
        qmin, qmax = int_range(t.input_bits)
        inside = bp[(code_values(bp, scale) >= lo) & (code_values(bp, scale) <= hi) & (bp >= qmin) & (bp <= qmax)]
        if inside.size:
            top.plot(code_values(inside, scale), evaluate(t, inside, scale), ls="none", marker="|", ms=14,
                     mew=1.5, color=line.get_color())
        err = y - fn(x)
        bottom.plot(x, err, lw=1.0, color=line.get_color(), label=name)
        i = int(np.argmax(np.abs(err)))
        if abs(err[i]) >= abs(worst[1]):
            worst = (x[i], err[i], name)
    bottom.axhline(0, color="black", lw=0.6)
    bottom.annotate(f"max |err| {abs(worst[1]):.3g} at x={worst[0]:g} ({worst[2]})", xy=(worst[0], worst[1]),
                    xytext=(0.02, 0.9), textcoords="axes fraction", fontsize=8,
                    arrowprops=dict(arrowstyle="->", lw=0.6))
    top.set_title(f"{tables[0].op}: input scale d={scale} (x = X * 2^-{scale}), breakpoints marked |")
    top.set_ylabel("output")
    top.legend(fontsize=8)
    bottom.set_ylabel("table - exact")
    bottom.set_xlabel("x")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_convergence(tables: Sequence[Table], labels: Sequence[str]):
    """Best and mean fitness per generation from each table's search history (log y), then one
    marker per phase that followed the GA."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for t, name in zip(tables, labels):
        hist = (t.search or {}).get("history")
        if not hist:
            raise UsageError(f"{name} has no search history: it was not fitted by this tool's search")
        gens = [h for h in hist if "gen" in h]
        g = [h["gen"] for h in gens]
        line, = ax.plot(g, [h["best"] for h in gens], lw=1.5, label=f"{name}: best")
        ax.plot(g, [h["mean"] for h in gens], lw=1.0, ls="--", color=line.get_color(), label=f"{name}: population mean")
        # the phases after the GA (alternation, polish, exact starts, ...) as markers past it
        phases = [h for h in hist if "phase" in h]
        x0 = (g[-1] if g else 0) + 1
        for i, h in enumerate(phases):
            ax.plot([x0 + i], [h["best"]], marker="o", ms=4, color=line.get_color())
            ax.annotate(h["phase"], (x0 + i, h["best"]), fontsize=6, rotation=45, xytext=(2, 2),
                        textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("generation")
    ax.set_ylabel(f"objective ({(tables[0].search or {}).get('objective', 'mse')})")
    ax.set_title("search convergence")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

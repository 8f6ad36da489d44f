"""The RetNet study's figures: test bpc against bit width per quantizer (mean, spread bars),
and the sensitivity rows as bars of their cost over float."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from plots._mpl import plt, save

_BITS = re.compile(r"W(\d+)A(\d+) all-lut, ([a-z]+)")


def study_figure(summary: list[dict], title: str = "RetNet quantization study"):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.6]})
    series: dict[str, list[tuple[str, float, float]]] = {}
    for s in summary:
        m = _BITS.fullmatch(s["row"])
        if m:
            series.setdefault(m.group(3), []).append((f"W{m.group(1)}A{m.group(2)}", s["mean_bpc"], s["spread"]))
    order = ["W8A8", "W6A6", "W4A8", "W4A4"]
    for method, pts in sorted(series.items()):
        pts.sort(key=lambda p: order.index(p[0]) if p[0] in order else 99)
        x = [order.index(p[0]) for p in pts]
        ax1.errorbar(x, [p[1] for p in pts], yerr=[p[2] / 2 for p in pts], marker="o", capsize=3, label=method)
    for s in summary:
        if s["row"] in ("float", "float + same fine-tune"):
            ax1.axhline(s["mean_bpc"], ls="--" if s["row"] == "float" else ":", color="gray", lw=0.8)
            ax1.text(0, s["mean_bpc"], s["row"], fontsize=7, color="gray", va="bottom")
    ax1.set_xticks(range(len(order)), order)
    ax1.set_ylabel("test bits/char (mean of seeds; bars: spread)")
    ax1.set_title("after QAT, every LUT op in place")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    sens = [s for s in summary if s["group"] == "sensitivity"]
    ax2.barh(np.arange(len(sens)), [100 * s["vs_float"] for s in sens], color="tab:orange")
    ax2.set_yticks(np.arange(len(sens)), [s["row"] for s in sens], fontsize=7)
    ax2.invert_yaxis()
    ax2.axvline(0, color="black", lw=0.6)
    ax2.set_xlabel("test bits/char vs float (%), before any fine-tune")
    ax2.set_title("sensitivity")
    ax2.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def study_chart(summary: list[dict], out: Path, title: str = "RetNet quantization study") -> str:
    return save(study_figure(summary, title), out)

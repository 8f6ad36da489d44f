"""The RetNet study's figures: each quantizer's cost against the float model fine-tuned as long,
per bit width, and the sensitivity rows as bars of their cost over float; the error bars are the
range across the trained models (lowest to highest), the costs paired per model as in the table."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from plots._mpl import plt, save

_BITS = re.compile(r"W(\d+)A(\d+) all-lut, ([a-z]+)")


def _span(s: dict, key: str) -> tuple[float, float]:
    """Distances (in %) from the mean down to the lowest model and up to the highest."""
    r = s.get(key + "_range")
    if not r:
        return 0.0, 0.0
    return 100 * (s[key] - r[0]), 100 * (r[1] - s[key])


def study_figure(summary: list[dict], title: str = "RetNet quantization study"):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.6]})
    series: dict[str, list[tuple[str, float, float, float]]] = {}
    for s in summary:
        m = _BITS.fullmatch(s["row"])
        if m:
            lo, hi = _span(s, "vs_float_finetuned")
            series.setdefault(m.group(3), []).append((f"W{m.group(1)}A{m.group(2)}", 100 * s["vs_float_finetuned"],
                                                      lo, hi))
    order = ["W8A8", "W6A6", "W4A8", "W4A4"]
    for k, (method, pts) in enumerate(sorted(series.items())):
        pts.sort(key=lambda p: order.index(p[0]) if p[0] in order else 99)
        x = [order.index(p[0]) + 0.06 * (k - 2) for p in pts]  # side by side, so the bars do not hide each other
        ax1.errorbar(x, [p[1] for p in pts], yerr=[[p[2] for p in pts], [p[3] for p in pts]], marker="o",
                     capsize=3, label=method, ls="none" if len(pts) == 1 else "-")
    for s in summary:
        if s["row"] in ("float", "float + same fine-tune"):
            y = 100 * s["vs_float_finetuned"]
            ax1.axhline(y, ls="--" if s["row"] == "float" else ":", color="gray", lw=0.8)
            ax1.text(0, y, s["row"], fontsize=7, color="gray", va="bottom")
    ax1.set_xticks(range(len(order)), order)
    # W4A4 costs ten times the rest: cut the axis above the others and write its value
    values = sorted(p[1] + p[3] for pts in series.values() for p in pts)
    if len(values) > 2 and values[-1] > 3 * values[-2] > 0:
        top = 1.25 * values[-2]
        ax1.set_ylim(top=top)
        for method, pts in series.items():
            for p in pts:
                if p[1] > top:
                    ax1.annotate(f"{p[0]} {method}: {p[1]:+.1f}% (off scale)", (order.index(p[0]), top),
                                 xytext=(-4, -12), textcoords="offset points", ha="right", fontsize=7)
    ax1.set_ylabel("test bits/char vs float fine-tuned as long (%)\n(mean of models; bars: lowest to highest)")
    ax1.set_title("after QAT, every LUT op in place")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    sens = [s for s in summary if s["group"] == "sensitivity"]
    spans = np.array([_span(s, "vs_float") for s in sens]).T.reshape(2, -1)
    ax2.barh(np.arange(len(sens)), [100 * s["vs_float"] for s in sens], xerr=spans, capsize=2, color="tab:orange")
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

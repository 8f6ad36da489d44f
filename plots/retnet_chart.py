"""Bar chart of the RetNet's test bits per character for every quantization step."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from plots._mpl import plt, save


def retnet_figure(docs: list[dict]):
    steps = [r["step"] for r in docs[0]["rows"]]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(docs)
    for i, d in enumerate(docs):
        vals = [next((r["rel_to_float"] * 100 for r in d["rows"] if r["step"] == s), np.nan) for s in steps]
        ax.bar(np.arange(len(steps)) + i * width - 0.4 + width / 2, vals, width,
               label=f"{d['preset']} ({d['device_name']}): float {d['rows'][0]['test_bpc']:.3f} bpc")
    ax.axhline(0, color="black", lw=0.6)
    ax.axhline(1, color="gray", lw=0.6, ls="--")
    ax.axhline(2, color="gray", lw=0.6, ls=":")
    ax.set_xticks(np.arange(len(steps)), steps, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("test bits/char vs float (%)")
    ax.set_title("RetNet on fortunes: what each quantization step costs")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def retnet_chart(docs: list[dict], out: Path) -> str:
    return save(retnet_figure(docs), out)

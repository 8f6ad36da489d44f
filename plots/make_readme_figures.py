"""Regenerate the README's figures: `python -m plots.make_readme_figures`.

docs/figures/gelu_vs_published.png  our 8-segment GELU table against the published GQA-LUT one
docs/figures/swish.png              our shipped 16-segment swish table and its error
docs/figures/convergence.png        the search's best/mean fitness per generation
docs/figures/retnet.png             the RetNet's cost of each quantization step
Needs ../shared/reference-tables (or GQA_SHARED) for the published table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from gqa_lut.reference import convert_reference, read_reference, reference_dir
from gqa_lut.search import FitConfig, fit
from gqa_lut.functions import get_op
from ops.tables import default_table
from plots._mpl import save
from plots.retnet_chart import retnet_figure
from plots.table_plot import plot_convergence, plot_tables

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "figures"


def main() -> int:
    gelu = fit("gelu", FitConfig(segments=8, frac_bits=6, range=(-4.0, 4.0), scale_range=(0, 6)))
    ref, _ = convert_reference(read_reference(reference_dir() / "gelu_pwl_7.json"), -4.0, 4.0)
    print(save(plot_tables([gelu, ref], get_op("gelu").fn, ["ours", "GQA-LUT published"], scale=4),
               OUT / "gelu_vs_published.png"))
    swish = default_table("swish")
    print(save(plot_tables([swish], get_op("swish").fn, ["ours (shipped)"], scale=4), OUT / "swish.png"))
    print(save(plot_convergence([gelu, swish], ["gelu 8 seg", "swish 16 seg"]), OUT / "convergence.png"))
    results = ROOT / "bench" / "results" / "retnet.json"
    if results.exists():
        print(save(retnet_figure(json.loads(results.read_text())["runs"]), OUT / "retnet.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fit the RetNet's decay table: `python -m retnet_integration.make_tables [--check]`.

exp(-x) on [0, 8] like the registry's decay op, 16 segments, 8-bit params and inputs, but with
scales 0..18: gamma_h = 1 - 2^(-5-h) has x = -ln(gamma_h) down to 2^-12, which needs scales up
to 18 to be an 8-bit code of 64..127 (anything coarser rounds gamma to 1 for the slow heads).
"""
from __future__ import annotations

import sys

from gqa_lut.search import FitConfig, fit
from gqa_lut.table import load_table, save_table
from ops.make_default_tables import mismatch
from retnet_integration.quantize import DECAY_TABLE

CONFIG = FitConfig(segments=16, param_bits=8, input_bits=8, scales=(0, 18), seed=0)


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    table = fit("decay", CONFIG)
    if check:
        diff = mismatch(load_table(DECAY_TABLE), table)
        print("decay: reproduced" if not diff else "decay: DIFFERS at " + "; ".join(diff[:3]))
        return 1 if diff else 0
    save_table(table, DECAY_TABLE)
    print(f"decay: mse {table.metrics['mse']:.3e} max_abs_err {table.metrics['max_abs_err']:.3e} -> {DECAY_TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

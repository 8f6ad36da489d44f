"""Fit the tables shipped in ops/tables/: `python -m ops.make_default_tables [--check]`.

Each registry op with its default range and scales, 16 segments, 8-bit parameters and inputs,
seed 0. --check refits and compares with the shipped files (all but the timing) instead.
"""
from __future__ import annotations

import argparse
import sys

from gqa_lut.search import FitConfig, fit
from gqa_lut.table import Table, differences, load_table, save_table
from ops.registry import OPS
from ops.tables import TABLE_DIR

CONFIG = dict(segments=16, param_bits=8, input_bits=8, seed=0)


def default_ops() -> list[str]:
    return [name for name, op in OPS.items() if op.name == name]


def fit_default(op: str) -> Table:
    return fit(op, FitConfig(**CONFIG))


def mismatch(shipped: Table, refitted: Table) -> list[str]:
    """Integers exactly, floats within gqa_lut.table.FLOAT_REL_TOL, timings ignored."""
    return differences(shipped.to_json(), refitted.to_json())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("ops", nargs="*", default=default_ops())
    args = ap.parse_args(argv)
    bad = 0
    for op in args.ops:
        table = fit_default(op)
        path = TABLE_DIR / f"{op}.json"
        if args.check:
            diff = mismatch(load_table(path), table)
            bad += bool(diff)
            print(f"{op}: reproduced" if not diff else f"{op}: DIFFERS at " + "; ".join(diff[:3]))
        else:
            save_table(table, path)
            print(f"{op}: mse {table.metrics['mse']:.3e} max_abs_err {table.metrics['max_abs_err']:.3e} -> {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

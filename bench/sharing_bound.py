"""Why the printed lower bound is the per-scale one: the bound that gives each scale its own
lines ("no sharing") is not a bound. Run: python -m bench.sharing_bound

A table's N lines serve every input scale (each scale has its own breakpoints, lines in the same
order). The per-scale bound lets every scale use all N lines as it likes: each scale's exact
optimum, summed. A tighter bound has been proposed: hand each scale (or block of scales) its
own group of lines, at most N in all, and minimise the summed optima over the split. This
benchmark computes that allocation value exactly (each scale's optimum for every line count,
then a knapsack over the scales) next to the tables `bench.segments` fitted: where a real table
goes below the allocation value, the allocation value is not a lower bound, because real tables
share lines between scales. Letting a block of scales share its group does not help either: the
summed optima of a block given n lines fall as n grows, so one block of all scales with all N
lines (the per-scale bound) is always the smallest split.

    python -m bench.sharing_bound [--ops gelu exp] [--segments 8 16]
"""
from __future__ import annotations

import argparse
import json

from bench._common import RESULTS, machine, print_table, write_results
from gqa_lut.blocks import scale_block_sizes, scale_optima
from gqa_lut.config import FitConfig, resolve_op, validate_config
from gqa_lut.exact import free_segments, lower_bound
from gqa_lut.problem import build_problem

OPS = ["gelu", "swish", "exp", "rsqrt"]
SEGMENTS = [8, 16, 32, 64, 256]


def one(op: str, n: int, frac_bits: int) -> dict:
    cfg = FitConfig(segments=n, param_bits=8, input_bits=8, frac_bits=frac_bits)
    problem = build_problem(validate_config(resolve_op(op, cfg), cfg))
    free = free_segments(problem)
    # no line shared, the tails counted once: every scale 0..free free lines, free in all
    optima = scale_optima(problem, list(range(problem.dscale.size)), free)
    return {"op": op, "segments": n, "frac_bits": frac_bits, "scales": int(problem.dscale.size),
            "per_scale_bound": lower_bound(problem), "no_sharing_allocation": scale_block_sizes(optima, free, least=0)[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sharing_bound", description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    ap.add_argument("--segments", nargs="+", type=int, default=SEGMENTS)
    args = ap.parse_args(argv)
    fitted = {(r["op"], r["segments"]): r for r in json.loads((RESULTS / "segments.json").read_text())["rows"]}
    rows = []
    for op in args.ops:
        for n in args.segments:
            if (op, n) not in fitted:
                ap.error(f"no fitted {op} table at {n} segments in bench/results/segments.json: run bench.segments")
            r = one(op, n, fitted[(op, n)]["frac_bits"])
            r["fitted_mse"] = fitted[(op, n)]["mse"]
            r["fitted_over_allocation"] = r["fitted_mse"] / r["no_sharing_allocation"]
            rows.append(r)
            print(f"{op} {n}: fitted {r['fitted_mse']:.3e}, per-scale bound {r['per_scale_bound']:.3e}, "
                  f"no-sharing allocation {r['no_sharing_allocation']:.3e}", flush=True)
    print_table(["op", "segments", "fitted mse", "per-scale bound", "no-sharing allocation", "fitted / allocation"],
                [[r["op"], str(r["segments"]), f"{r['fitted_mse']:.3e}", f"{r['per_scale_bound']:.3e}",
                  f"{r['no_sharing_allocation']:.3e}", f"{r['fitted_over_allocation']:.3g}"] for r in rows])
    below = [r for r in rows if r["fitted_mse"] < r["no_sharing_allocation"]]
    doc = {"benchmark": "sharing_bound", "machine": machine(), "command": "python -m bench.sharing_bound",
           "fitted_from": "bench/results/segments.json", "rows": rows,
           "fitted_below_allocation": [f"{r['op']} {r['segments']}" for r in below]}
    print(f"fitted tables below the no-sharing allocation value (so it is no bound): {len(below)} of {len(rows)}")
    print(f"-> {write_results('sharing_bound.json', doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

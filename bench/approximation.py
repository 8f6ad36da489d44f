"""Our tables against the published GQA-LUT tables, on the same evaluator. Run: python -m bench.approximation

For each of the six published configurations, fit with default settings (frac_bits 6 like
the published tables, and again with frac_bits chosen automatically), evaluate the published
table with its own semantics (repeated breakpoints allowed) by the same evaluator, and report
mse, dense_mse and max_abs_err for both, their ratios and the fit time.

    python -m bench.approximation [--seed 0] [--quick]
"""
from __future__ import annotations

import argparse
import time

from bench._common import peak_rss_mb, PUBLISHED, geomean, machine, print_table, write_results

from gqa_lut.evaluator import raw_metrics
from gqa_lut.reference import read_reference, reference_dir
from gqa_lut.search import FitConfig, fit
from gqa_lut.functions import get_op

TARGET_RATIO, TARGET_GEOMEAN, TARGET_SECONDS = 0.5, 0.3, 10.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="first configuration only")
    args = ap.parse_args()
    rows, out = [], []
    for stem, op_name, rng, segments in PUBLISHED[:1] if args.quick else PUBLISHED:
        op = get_op(op_name)
        ref = read_reference(reference_dir() / f"{stem}.json")
        theirs = raw_metrics(ref.slopes, ref.intercepts, ref.breakpoints, ref.frac_bits, rng, 8, op.fn)
        for frac in (6, None):
            t0 = time.perf_counter()
            table = fit(op, FitConfig(segments=segments, range=rng, scale_range=(0, 6), frac_bits=frac,
                                      param_bits=8, input_bits=8, seed=args.seed))
            seconds = time.perf_counter() - t0
            ours = table.metrics
            lb = table.search["lower_bound"]
            rec = {"config": stem, "op": op_name, "range": list(rng), "segments": segments,
                   "frac_bits": table.frac_bits, "frac_bits_mode": "fixed" if frac is not None else "auto",
                   "ours": ours, "published": theirs, "fit_seconds": seconds,
                   "mse_ratio": ours["mse"] / theirs["mse"],
                   "dense_mse_ratio": ours["dense_mse"] / theirs["dense_mse"],
                   "max_abs_err_ratio": ours["max_abs_err"] / theirs["max_abs_err"],
                   "lower_bound": lb, "ratio_to_bound": table.search["objective_value"] / lb,
                   "peak_rss_mb": peak_rss_mb()}
            out.append(rec)
            rows.append([stem, f"{table.frac_bits}{'' if frac is not None else ' (auto)'}",
                         f"{ours['mse']:.3e}", f"{theirs['mse']:.3e}", f"{rec['mse_ratio']:.3f}",
                         f"{ours['dense_mse']:.2e}", f"{theirs['dense_mse']:.2e}", f"{rec['dense_mse_ratio']:.2f}",
                         f"{ours['max_abs_err']:.3f}", f"{theirs['max_abs_err']:.3f}", f"{lb:.2e}",
                         f"{rec['ratio_to_bound']:.2f}", f"{seconds:.2f}", f"{rec['peak_rss_mb']:.0f}"])
    print_table(["config", "F", "mse ours", "mse pub", "ratio", "dense ours", "dense pub", "ratio",
                 "maxerr ours", "maxerr pub", "bound", "ours/bound", "fit s", "peak MB"], rows)
    fixed = [r for r in out if r["frac_bits_mode"] == "fixed"]
    summary = {
        "geomean_mse_ratio_frac6": geomean([r["mse_ratio"] for r in fixed]),
        "worst_mse_ratio_frac6": max(r["mse_ratio"] for r in fixed),
        "geomean_mse_ratio_auto": geomean([r["mse_ratio"] for r in out if r["frac_bits_mode"] == "auto"]),
        "max_fit_seconds": max(r["fit_seconds"] for r in out),
    }
    summary["targets_met"] = (summary["worst_mse_ratio_frac6"] <= TARGET_RATIO
                              and summary["geomean_mse_ratio_frac6"] <= TARGET_GEOMEAN
                              and summary["max_fit_seconds"] < TARGET_SECONDS)
    print(f"\nmse ratio ours/published (frac_bits 6): geomean {summary['geomean_mse_ratio_frac6']:.3f} "
          f"(target <= {TARGET_GEOMEAN}), worst {summary['worst_mse_ratio_frac6']:.3f} (target <= {TARGET_RATIO}); "
          f"auto frac_bits geomean {summary['geomean_mse_ratio_auto']:.3f}; "
          f"slowest fit {summary['max_fit_seconds']:.2f}s (target < {TARGET_SECONDS:g}s)")
    path = write_results("approximation.json", {"benchmark": "approximation", "seed": args.seed,
                                                "machine": machine(), "rows": out, "summary": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

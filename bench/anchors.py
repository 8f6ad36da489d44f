"""Our search against every anchor, on one evaluator. Run: python -m bench.anchors

For gelu [-4,4], swish [-8,8], hswish [-4,4], exp [-8,0] (scales 0..6) and rsqrt [1,4) (scale 5)
and reciprocal [1,2) (scale 6), the ranges and scales the range-reduced drop-ins use; 8 and 16
segments; 8-bit params and inputs; frac_bits 6 and automatic. Per row:
1. ours: default settings, 5 seeds (median and best mse; median fit seconds);
2. the pwlf baseline: pwlf's differential-evolution float fit on the inputs the metric scores,
   rounded into the format (same pinned tails as ours), then +-1 LSB coordinate descent on
   every slope, intercept and breakpoint (fit seconds: pwlf + descent); and a stronger variant
   ("pwlf+DP+LSB") whose per-scale breakpoints are first placed optimally for the rounded lines
   (our DP), since plain rounding collides breakpoints on coarse grids;
3. the float bound: pwlf's unrounded fit on the same grids;
4. the published GQA-LUT table where one exists (its own semantics);
5. a direct 2^Q-entry table with outputs on the ACC's grid (the floor);
6. I-BERT's GELU and exp polynomials, in float.
pwlf's fits are slow (minutes at 16 segments) and deterministic per seed, so they are cached
in bench/results/pwlf_cache.json; delete it to refit. --quick writes *_quick.json files
(git-ignored), so the test suite never touches the committed results.

    python -m bench.anchors [--quick] [--seeds 5]
    python -m bench.anchors --minimax [--quick]    the --objective max fits: ours, the bound the
        fit prints, and the float minimax with free breakpoints (anchors_minimax.json)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from bench._common import peak_rss_mb, RESULTS, geomean, machine, print_table, write_results

from bench.baselines import (direct_table_mse, float_pwl_mse, grids, ibert_exp, ibert_gelu, lsb_descent,
                               round_float_pwl, union_points)
from gqa_lut.evaluator import raw_metrics
from gqa_lut.exact import minimax_bound
from gqa_lut.localsearch import resegment
from gqa_lut.problem import build_problem
from gqa_lut.quantization import choose_frac_bits
from gqa_lut.reference import read_reference, reference_dir
from gqa_lut.config import FitConfig, validate_config
from gqa_lut.search import fit
from gqa_lut.functions import get_op

CONFIGS = [("gelu", (-4.0, 4.0), (0, 6)), ("swish", (-8.0, 8.0), (0, 6)), ("hswish", (-4.0, 4.0), (0, 6)),
           ("exp", (-8.0, 0.0), (0, 6)), ("rsqrt", (1.0, 4.0), (5, 5)), ("reciprocal", (1.0, 2.0), (6, 6))]
PUBLISHED = {("gelu", 8): "gelu_pwl_7", ("gelu", 16): "gelu_pwl_15", ("hswish", 8): "hswish_pwl_7",
             ("hswish", 16): "hswish_pwl_15", ("exp", 8): "exp_pwl_7", ("exp", 16): "exp_pwl_15"}
IBERT = {"gelu": ibert_gelu, "exp": ibert_exp}
def pwlf_fit(op: str, rng, scales, segments: int, seed: int, quick: bool) -> dict:
    """pwlf's differential-evolution fit on the union of the scored inputs, cached."""
    import pwlf

    CACHE = RESULTS / ("pwlf_cache_quick.json" if quick else "pwlf_cache.json")
    x = union_points(*rng, tuple(range(scales[0], scales[1] + 1)), 8)
    key = f"{op}|{rng[0]}|{rng[1]}|{scales[0]}..{scales[1]}|{segments}|{seed}|{x.size}|{'quick' if quick else 'full'}"
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    if key not in cache:
        model = pwlf.PiecewiseLinFit(x, get_op(op).fn(x), seed=seed)
        t0 = time.perf_counter()
        kw = {"maxiter": 30, "popsize": 5} if quick else {}
        breaks = model.fit(segments, **kw)
        cache[key] = {"breaks": breaks.tolist(), "slopes": model.slopes.tolist(),
                      "intercepts": model.intercepts.tolist(), "seconds": time.perf_counter() - t0, "points": int(x.size)}
        write_results(CACHE.name, cache)
    return cache[key]


def baseline(op_name: str, rng, scales, segments: int, frac_bits, pw: dict) -> dict:
    op = get_op(op_name)
    sc = tuple(range(scales[0], scales[1] + 1))
    breaks, k, b = np.array(pw["breaks"][1:-1]), np.array(pw["slopes"]), np.array(pw["intercepts"])
    tails = [t for t in (op.left_tail, op.right_tail) if t is not None]
    F = frac_bits if frac_bits is not None else choose_frac_bits(np.concatenate([k, b, *map(np.array, tails)]), 8)
    prob = build_problem(validate_config(op, FitConfig(segments=segments, range=tuple(rng), scale_range=tuple(scales),
                                                       frac_bits=F)))
    t0 = time.perf_counter()
    K0, B0, P0 = round_float_pwl(breaks, k, b, F, 8, sc, prob.left_tail, prob.right_tail)
    g = grids(*rng, sc, 8)
    fixed = tuple(i for i, t in ((0, op.left_tail), (segments - 1, op.right_tail)) if t is not None)
    K, B, P, mse = lsb_descent(K0, B0, P0, F, 8, g, op.fn, fixed)
    m = raw_metrics(K, B, P, F, rng, 8, op.fn)
    seconds = pw["seconds"] + time.perf_counter() - t0
    t1 = time.perf_counter()
    idx, _ = resegment(prob, K0[None], B0[None])
    Pdp = {int(d): prob.pos[r, idx[0, r]] for r, d in enumerate(prob.dscale)}
    K2, B2, P2, _ = lsb_descent(K0, B0, Pdp, F, 8, g, op.fn, fixed)
    m2 = raw_metrics(K2, B2, P2, F, rng, 8, op.fn)
    return {"mse": m["mse"], "max_abs_err": m["max_abs_err"], "frac_bits": F, "seconds": seconds,
            "pwlf_seconds": pw["seconds"], "float_bound_mse": float_pwl_mse(breaks, k, b, g, op.fn),
            "dp_mse": m2["mse"], "dp_max_abs_err": m2["max_abs_err"],
            "dp_seconds": pw["seconds"] + time.perf_counter() - t1}


MINIMAX_POINTS = 16385  # the dense grid of the float minimax (converged to 3 digits: 4097 points are ~1% low)


def float_minimax(op_name: str, rng: tuple[float, float], segments: int, points: int = MINIMAX_POINTS) -> float:
    """The best max |error| of any `segments` real lines with free breakpoints on [lo, hi]
    (continuous target, no integer grid): gqa_lut.exact.minimax_bound on a dense grid."""
    x = np.linspace(rng[0], rng[1], points)
    return minimax_bound(x, get_op(op_name).fn(x), np.ones_like(x), segments)


def minimax_rows(quick: bool, seeds: int) -> None:
    """`--minimax`: --objective max fits (8-bit, frac_bits 6, scales 0..6) against the bound the
    fit prints (gqa_lut.exact.minimax_lower_bound: the hardest scale's best real lines and its
    output grid) and against the float minimax with free breakpoints at the same segments."""
    plan = ([("gelu", (-4.0, 4.0), (4, 6), 4)] if quick else
            [(op, rng, sc, n) for op, rng, sc in CONFIGS[:4] for n in (8, 16)])
    out, rows = [], []
    for op_name, rng, scales, segments in plan:
        ours = []
        for seed in range(seeds):
            t0 = time.perf_counter()
            t = fit(op_name, FitConfig(segments=segments, range=rng, scale_range=scales, frac_bits=6, seed=seed,
                                       objective="max"))
            ours.append((t.search["objective_value"], t.metrics["max_abs_err"], t.metrics["mse"],
                         time.perf_counter() - t0, t.search["lower_bound"]))
        t0 = time.perf_counter()
        fm = float_minimax(op_name, rng, segments, 2049 if quick else MINIMAX_POINTS)
        rec = {"op": op_name, "range": list(rng), "scales": list(scales), "segments": segments, "frac_bits": 6,
               "seeds": seeds, "ours_max_err_median": statistics.median(o[0] for o in ours),
               "ours_max_err_best": min(o[0] for o in ours),
               "ours_in_range_max_abs_err_median": statistics.median(o[1] for o in ours),
               "ours_mse_median": statistics.median(o[2] for o in ours),
               "ours_seconds_median": statistics.median(o[3] for o in ours), "lower_bound": ours[0][4],
               "float_minimax": fm, "float_minimax_seconds": time.perf_counter() - t0}
        rec["ratio_to_bound"] = rec["ours_max_err_median"] / rec["lower_bound"]
        rec["ratio_to_float_minimax"] = rec["ours_max_err_median"] / fm
        out.append(rec)
        rows.append([op_name, str(segments), f"{rec['ours_max_err_median']:.3e}", f"{rec['ours_max_err_best']:.3e}",
                     f"{rec['lower_bound']:.3e}", f"{rec['ratio_to_bound']:.2f}", f"{fm:.3e}",
                     f"{rec['ratio_to_float_minimax']:.2f}", f"{rec['ours_seconds_median']:.1f}"])
        print(" | ".join(rows[-1]), flush=True)
    print_table(["op", "seg", "ours max err med", "best", "bound", "/bound", "float minimax", "/float minimax",
                 "ours s"], rows)
    name = "anchors_minimax_quick.json" if quick else "anchors_minimax.json"
    print(f"wrote {write_results(name, {'benchmark': 'anchors --minimax', 'quick': quick, 'machine': machine(), 'rows': out})}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small row (gelu, 4 segments, scales 4..6)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--minimax", action="store_true", help="the --objective max rows instead (3 seeds by default)")
    args = ap.parse_args()
    if args.minimax:
        return minimax_rows(args.quick, 2 if args.quick else min(args.seeds, 3))
    rows, out = [], []
    plan = ([("gelu", (-4.0, 4.0), (4, 6), 4, 6)] if args.quick else
            [(op, rng, sc, n, F) for op, rng, sc in CONFIGS for n in (8, 16) for F in (6, None)])
    seeds = 2 if args.quick else args.seeds
    for op_name, rng, scales, segments, F in plan:
        op = get_op(op_name)
        sc = tuple(range(scales[0], scales[1] + 1))
        g = grids(*rng, sc, 8)
        ours = []
        for seed in range(seeds):
            t0 = time.perf_counter()
            t = fit(op, FitConfig(segments=segments, range=rng, scale_range=scales, frac_bits=F, seed=seed))
            ours.append((t.metrics["mse"], t.metrics["max_abs_err"], time.perf_counter() - t0, t.frac_bits,
                         t.search["lower_bound"]))
        mses = [o[0] for o in ours]
        base = baseline(op_name, rng, scales, segments, F, pwlf_fit(op_name, rng, scales, segments, 0, args.quick))
        Fo = ours[0][3]
        rec = {"op": op_name, "range": list(rng), "scales": list(scales), "segments": segments,
               "frac_bits_mode": "fixed" if F is not None else "auto", "frac_bits": Fo,
               "ours_median_mse": statistics.median(mses), "ours_best_mse": min(mses),
               "ours_max_abs_err_median": statistics.median(o[1] for o in ours),
               "ours_seconds_median": statistics.median(o[2] for o in ours), "ours_seeds": seeds,
               "lower_bound": ours[0][4], "peak_rss_mb": peak_rss_mb(),
               "baseline_mse": base["mse"], "baseline_max_abs_err": base["max_abs_err"],
               "baseline_frac_bits": base["frac_bits"], "baseline_seconds": base["seconds"],
               "pwlf_seconds": base["pwlf_seconds"], "float_bound_mse": base["float_bound_mse"],
               "baseline_dp_mse": base["dp_mse"], "baseline_dp_max_abs_err": base["dp_max_abs_err"],
               "baseline_dp_seconds": base["dp_seconds"],
               "direct_table_mse": direct_table_mse(g, op.fn, Fo)}
        pub = PUBLISHED.get((op_name, segments))
        if pub and F == 6 and scales == (0, 6) and (reference_dir()).is_dir():
            ref = read_reference(reference_dir() / f"{pub}.json")
            pm = raw_metrics(ref.slopes, ref.intercepts, ref.breakpoints, ref.frac_bits, rng, 8, op.fn)
            rec.update(published_mse=pm["mse"], published_max_abs_err=pm["max_abs_err"])
        if op_name in IBERT:
            per = [np.mean((IBERT[op_name](x) - op.fn(x)) ** 2) for x in
                   (np.ldexp(c.astype(np.float64), -d) for d, c in g.items())]
            rec["ibert_mse"] = float(np.mean(per))
        rec["ratio_to_bound"] = rec["ours_median_mse"] / rec["lower_bound"]
        rec["ratio_to_baseline"] = rec["ours_median_mse"] / rec["baseline_mse"]
        rec["ratio_to_baseline_dp"] = rec["ours_median_mse"] / rec["baseline_dp_mse"]
        rec["ratio_to_published"] = rec["ours_median_mse"] / rec["published_mse"] if "published_mse" in rec else None
        rec["targets_met"] = (rec["ratio_to_baseline"] <= 1.0 and rec["ours_seconds_median"] <= rec["baseline_seconds"]
                              and (rec["ratio_to_published"] is None or rec["ratio_to_published"] <= 0.5))
        out.append(rec)
        fmt = lambda v: "-" if v is None else f"{v:.2e}"  # noqa: E731
        rows.append([op_name, str(segments), f"{Fo}{'' if F is not None else ' a'}", fmt(rec["ours_median_mse"]),
                     fmt(rec["ours_best_mse"]), fmt(rec["baseline_mse"]), fmt(rec["baseline_dp_mse"]),
                     fmt(rec["float_bound_mse"]),
                     fmt(rec.get("published_mse")), fmt(rec["direct_table_mse"]), fmt(rec.get("ibert_mse")),
                     f"{rec['ratio_to_baseline']:.2f}", f"{rec['ratio_to_baseline_dp']:.2f}",
                     "-" if rec["ratio_to_published"] is None else f"{rec['ratio_to_published']:.2f}",
                     f"{rec['ours_seconds_median']:.1f}", f"{rec['baseline_seconds']:.0f}", fmt(rec["lower_bound"]),
                     f"{rec['ratio_to_bound']:.2f}", f"{rec['peak_rss_mb']:.0f}", "yes" if rec["targets_met"] else "NO"])
        print(" | ".join(rows[-1]), flush=True)
    print()
    print_table(["op", "seg", "F", "ours med", "ours best", "pwlf+LSB", "pwlf+DP+LSB", "float bound", "published",
                 "direct", "I-BERT", "/pwlf", "/pwlf+DP", "/pub", "ours s", "pwlf s", "bound", "/bound", "peak MB",
                 "met"], rows)
    summary = {"rows": len(out), "targets_met_rows": sum(r["targets_met"] for r in out),
               "geomean_ratio_to_baseline": geomean([r["ratio_to_baseline"] for r in out]),
               "worst_ratio_to_baseline": max(r["ratio_to_baseline"] for r in out),
               "geomean_ratio_to_baseline_dp": geomean([r["ratio_to_baseline_dp"] for r in out]),
               "worst_ratio_to_baseline_dp": max(r["ratio_to_baseline_dp"] for r in out)}
    print(f"\nours/pwlf+LSB median mse: geomean {summary['geomean_ratio_to_baseline']:.3f}, worst "
          f"{summary['worst_ratio_to_baseline']:.3f}; ours/pwlf+DP+LSB: geomean "
          f"{summary['geomean_ratio_to_baseline_dp']:.3f}, worst {summary['worst_ratio_to_baseline_dp']:.3f}; "
          f"targets met on {summary['targets_met_rows']}/{len(out)} rows")
    name = "anchors_quick.json" if args.quick else "anchors.json"
    print(f"wrote {write_results(name, {'benchmark': 'anchors', 'quick': args.quick, 'machine': machine(), 'rows': out, 'summary': summary})}")


if __name__ == "__main__":
    main()

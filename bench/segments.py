"""mse, fit time and peak memory against the number of segments. Run: python -m bench.segments

gelu, swish, exp and rsqrt (their registry ranges and scales), 8-bit parameters and inputs,
4 to 256 segments, seed 0. Each fit runs in a fresh process, so its peak resident memory is
its own. Prints a table, writes bench/results/segments.json and docs/figures/segments.png (the README's).

    python -m bench.segments [--ops gelu exp] [--segments 4 8 16] [--workers 2] [--quick]
"""
from __future__ import annotations

import argparse
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from bench._common import RESULTS, machine, print_table, write_results
from gqa_lut.config import FitConfig
from gqa_lut.search import fit

OPS = ["gelu", "swish", "exp", "rsqrt"]
SEGMENTS = [4, 8, 16, 32, 64, 128, 256]


def _one(task: tuple[str, int]) -> dict:
    op, n = task
    t0 = time.perf_counter()
    table = fit(op, FitConfig(segments=n, param_bits=8, input_bits=8, seed=0))
    seconds = time.perf_counter() - t0
    s = table.search
    return {"op": op, "segments": n, "mse": table.metrics["mse"], "max_abs_err": table.metrics["max_abs_err"],
            "lower_bound": s["lower_bound"], "ratio_to_bound": s["objective_value"] / s["lower_bound"]
            if s["lower_bound"] else None, "optimal": s["optimal"], "frac_bits": table.frac_bits,
            "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def figure(rows: list[dict], path) -> None:
    from plots._mpl import plt, save

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for op in dict.fromkeys(r["op"] for r in rows):
        sel = [r for r in rows if r["op"] == op]
        line, = a.plot([r["segments"] for r in sel], [r["mse"] for r in sel], marker="o", label=op)
        a.plot([r["segments"] for r in sel], [r["lower_bound"] for r in sel], ls=":", color=line.get_color())
        b.plot([r["segments"] for r in sel], [r["seconds"] for r in sel], marker="o", label=op)
    for ax, label in ((a, "mse (dotted: lower bound)"), (b, "fit seconds")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("segments")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    a.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="+", default=OPS)
    ap.add_argument("--segments", nargs="+", type=int, default=SEGMENTS)
    ap.add_argument("--workers", type=int, default=2, help="processes (each fit in a fresh one)")
    ap.add_argument("--quick", action="store_true", help="gelu at 4 and 8 segments, results *_quick.json")
    args = ap.parse_args(argv)
    ops, segs = (["gelu"], [4, 8]) if args.quick else (args.ops, args.segments)
    tasks = [(op, n) for op in ops for n in segs]
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        rows = list(pool.map(_one, tasks))
    print_table(["op", "seg", "mse", "lower bound", "ratio", "F", "fit s", "peak MB"],
                [[r["op"], str(r["segments"]), f"{r['mse']:.3e}", f"{r['lower_bound']:.3e}",
                  f"{r['ratio_to_bound']:.2f}", str(r["frac_bits"]), f"{r['seconds']:.1f}", f"{r['peak_rss_mb']:.0f}"]
                 for r in rows])
    worse = [(r["op"], r["segments"]) for a, r in zip(rows, rows[1:])
             if a["op"] == r["op"] and r["mse"] > a["mse"] * (1 + 1e-6)]
    print(f"mse non-increasing in segments: {'yes' if not worse else 'NO at ' + str(worse)}; "
          f"slowest fit {max(r['seconds'] for r in rows):.1f}s; largest peak {max(r['peak_rss_mb'] for r in rows):.0f} MB")
    name = "segments_quick" if args.quick else "segments"
    print(f"wrote {write_results(name + '.json', {'benchmark': 'segments', 'machine': machine(), 'rows': rows})}")
    if not args.quick:
        figure(rows, RESULTS.parents[1] / "docs" / "figures" / "segments.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

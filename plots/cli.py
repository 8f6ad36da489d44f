"""The figure commands of `gqa-lut`: plot and sweep (registered by gqa_lut.cli). matplotlib is
imported only when one of them runs."""
from __future__ import annotations

import argparse
from pathlib import Path

from gqa_lut.cli_support import MAX_WORKERS, examples
from gqa_lut.config import FitConfig
from gqa_lut.errors import UsageError
from gqa_lut.quantization import check_int
from gqa_lut.table import load_table
from gqa_lut.io import check_writable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot tables against the exact function, or the search's convergence",
                       epilog=examples("gqa-lut plot gelu_8b_8s.json gelu_8b_16s.json --out gelu.png --scale 4",
                                       "gqa-lut plot --convergence gelu_8b_16s.json --out conv.svg"))
    p.add_argument("tables", nargs="+", help="table files of one op")
    p.add_argument("--out", required=True, help="figure file, written exactly as named")
    p.add_argument("--scale", type=int, help="input scale d to plot (default: the finest the tables share)")
    p.add_argument("--range", nargs=2, type=float, metavar=("LO", "HI"), help="x range to show, within the inputs the scale represents (default: the table's)")
    p.add_argument("--format", help="png, svg or pdf (default: from --out's suffix, else png)")
    p.add_argument("--convergence", action="store_true", help="plot best/mean fitness per generation")
    p.add_argument("--label", action="append", help="legend label per table, repeated (default: file name)")
    p.set_defaults(handler=cmd_plot)

    p = sub.add_parser("sweep", help="fit a grid of segments x bits and plot error against segments",
                       epilog=examples("gqa-lut sweep --op gelu --segments 4 8 16 32 --bits 6 8 10 --workers 2",
                                       "gqa-lut sweep --op exp --segments 8 16 --bits 8 --out-dir exp_sweep"))
    p.add_argument("--op", required=True, help="registry op (see `gqa-lut ops`)")
    p.add_argument("--segments", nargs="+", type=int, required=True, help="segment counts, each 2..256")
    p.add_argument("--bits", nargs="+", type=int, required=True, help="bit-widths (param and input), each 2..16")
    p.add_argument("--out-dir", default="sweep", help="folder for the tables, sweep.csv and sweep.png")
    p.add_argument("--workers", type=int, default=1, help="processes, one fit each")
    p.add_argument("--generations", type=int, default=FitConfig.generations, help="GA generations per fit")
    p.add_argument("--seed", type=int, default=FitConfig.seed, help="random seed of every fit")
    p.set_defaults(handler=cmd_sweep)


def cmd_plot(args: argparse.Namespace) -> int:
    from gqa_lut.expr import target_function
    from plots._mpl import figure_format, save
    from plots.table_plot import plot_convergence, plot_tables

    figure_format(args.out, args.format)
    check_writable(args.out)
    tables = [load_table(p) for p in args.tables]
    labels = args.label or [Path(p).stem for p in args.tables]
    if len(labels) != len(tables):
        raise UsageError(f"{len(labels)} --label for {len(tables)} tables: give one per table or none")
    if args.convergence:
        fig = plot_convergence(tables, labels)
    else:
        ops = {t.op for t in tables}
        if len(ops) > 1:
            raise UsageError(f"tables approximate different functions ({', '.join(sorted(ops))}): plot them separately")
        fig = plot_tables(tables, target_function(tables[0]), labels, args.scale,
                          tuple(args.range) if args.range else None)
    print(save(fig, args.out, args.format))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from gqa_lut.sweep import grid_configs
    from plots.sweep import sweep

    base = {"generations": args.generations, "seed": args.seed}
    grid_configs(args.op, args.segments, args.bits, FitConfig(**base))  # every mistake before any fit
    check_int("workers", args.workers, 1, MAX_WORKERS)
    check_writable(Path(args.out_dir) / "sweep.csv", "--out-dir")
    sweep(args.op, args.segments, args.bits, Path(args.out_dir), args.workers, base)
    print(f"-> {args.out_dir}/sweep.csv, {args.out_dir}/sweep.png")
    return 0

"""The `gqa-lut` command line: fit, eval, ops, import-reference.

Every user mistake is a UsageError, printed as one line `gqa-lut: error: ...` with exit code
2, and no output file is left behind (files are written atomically, and only at the end).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from gqa_lut import __version__
from gqa_lut.errors import UsageError
from gqa_lut.table import OutputFormat, Table, check_writable, load_table, save_table

EXIT_USAGE = 2


# A number with a leading minus is a value, not an option: argparse alone only knows -1 and -.5
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kw)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        raise UsageError(message)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; every option's default shown unless its help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" not in text and action.option_strings and action.default is not None
                and action.default is not False and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _add_fit_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--op", help="registry op (see `gqa-lut ops`)")
    src.add_argument("--expr", help='a formula in x with numpy math, e.g. "x*tanh(log1p(exp(x)))"')
    p.add_argument("--name", default="expr", help="name of an --expr function (table op custom:NAME)")
    p.add_argument("--bits", type=int, help="param and input bits together, 2..16 (default 8)")
    p.add_argument("--param-bits", type=int, help="bits of every slope and intercept (default: --bits)")
    p.add_argument("--input-bits", type=int, help="bits of the integer input (default: --bits)")
    p.add_argument("--segments", type=int, default=8, help="number of segments, 2..256")
    p.add_argument("--range", nargs=2, type=float, metavar=("LO", "HI"),
                   help="fitted range (default: the op's, see `gqa-lut ops`; -4 4 for --expr)")
    p.add_argument("--scales", nargs=2, type=int, metavar=("D0", "D1"),
                   help="inclusive range of input scale exponents d, x = X * 2^-d, within -24..24 "
                        "(default: the op's; 0 6 for --expr)")
    p.add_argument("--frac-bits", type=int, help="fractional bits of slopes/intercepts, 0..24 "
                                                 "(default: the largest that fits the parameters)")
    p.add_argument("--output-bits", type=int, help="quantize the output to this many bits, 2..32 "
                                                   "(default: no output quantization)")
    p.add_argument("--output-frac-bits", type=int, help="fractional bits of the quantized output, 0..48 "
                                                        "(with --output-bits)")
    p.add_argument("--population", type=int, default=40, help="GA population size, >= 4")
    p.add_argument("--generations", type=int, default=30, help="GA generations, >= 0")
    p.add_argument("--patience", type=int, default=10, help="stop after this many generations without gain, >= 1")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same table")
    p.add_argument("--objective", default="mse", help="mse or max (minimax)")
    p.add_argument("--weights", help="activation histogram .npy: raw samples (1-D) or (value, weight) "
                                     "rows; see the README for recording one from a model (default: uniform)")
    p.add_argument("--workers", type=int, default=1, help="processes for the fitness (toolbox.map)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gqa-lut", description="Quantization-aware piecewise-linear LUTs for integer hardware.",
                     epilog=_examples("gqa-lut fit --op swish --bits 8", "gqa-lut eval swish_8b_8s.json",
                                      "gqa-lut <command> --help"))
    parser.add_argument("--version", action="version", version=f"gqa-lut {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("fit", help="fit a table with the genetic search", description="Fit a table with the "
                       "quantization-aware genetic search and write it as a gqa-lut/1 file.",
                       epilog=_examples("gqa-lut fit --op swish --bits 8            # -> swish_8b_8s.json",
                                        "gqa-lut fit --op gelu --segments 16 --objective max --out gelu_max.json",
                                        'gqa-lut fit --expr "x*tanh(log1p(exp(x)))" --name mish --range -4 4'))
    _add_fit_args(p)
    p.add_argument("--out", help="output file (default <op>_<bits>b_<segments>s.json; param and input bits, "
                                 "a minimax objective and output quantization are spelled out when they differ)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--json", action="store_true", help="print the table's metrics as JSON")

    p = sub.add_parser("eval", help="metrics of a table file, per scale",
                       description="Evaluate a table file on the spec's input grids against the exact function.",
                       epilog=_examples("gqa-lut eval gelu_8b_16s.json", "gqa-lut eval mish.json --expr "
                                        '"x*tanh(log1p(exp(x)))" --json'))
    p.add_argument("table", help="a gqa-lut/1 table file")
    p.add_argument("--expr", help="the function of a custom table, if the file does not carry it")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")

    p = sub.add_parser("export", help="export a table as a C header",
                       epilog=_examples("gqa-lut export ops/tables/gelu.json --c gelu.h",
                                        "gqa-lut export swish_8b_8s.json --c swish.h --name act_swish"))
    p.add_argument("table", help="a gqa-lut/1 table file")
    p.add_argument("--c", required=True, metavar="OUT.h", help="header file to write")
    p.add_argument("--name", help="C identifier prefix (default lut_<op>)")

    p = sub.add_parser("plot", help="plot tables against the exact function, or the search's convergence",
                       epilog=_examples("gqa-lut plot gelu_8b_8s.json gelu_8b_16s.json --out gelu.png --scale 4",
                                        "gqa-lut plot --convergence gelu_8b_16s.json --out conv.svg"))
    p.add_argument("tables", nargs="+", help="table files of one op")
    p.add_argument("--out", required=True, help="figure file, written exactly as named")
    p.add_argument("--scale", type=int, help="input scale d to plot (default: the finest the tables share)")
    p.add_argument("--range", nargs=2, type=float, metavar=("LO", "HI"), help="x range to show (default: the table's)")
    p.add_argument("--format", help="png, svg or pdf (default: from --out's suffix, else png)")
    p.add_argument("--convergence", action="store_true", help="plot best/mean fitness per generation")
    p.add_argument("--label", action="append", help="legend label per table, repeated (default: file name)")

    p = sub.add_parser("sweep", help="fit a grid of segments x bits and plot error against segments",
                       epilog=_examples("gqa-lut sweep --op gelu --segments 4 8 16 32 --bits 6 8 10 --workers 2",
                                        "gqa-lut sweep --op exp --segments 8 16 --bits 8 --out-dir exp_sweep"))
    p.add_argument("--op", required=True, help="registry op (see `gqa-lut ops`)")
    p.add_argument("--segments", nargs="+", type=int, required=True, help="segment counts, each 2..256")
    p.add_argument("--bits", nargs="+", type=int, required=True, help="bit-widths (param and input), each 2..16")
    p.add_argument("--out-dir", default="sweep", help="folder for the tables, sweep.csv and sweep.png")
    p.add_argument("--workers", type=int, default=1, help="processes, one fit each")
    p.add_argument("--generations", type=int, default=30, help="GA generations per fit")
    p.add_argument("--seed", type=int, default=0, help="random seed of every fit")

    p = sub.add_parser("retnet", help="the quantized RetNet: train, eval, report",
                       epilog=_examples("gqa-lut retnet train --preset cpu", "gqa-lut retnet eval"))
    rsub = p.add_subparsers(dest="retnet_command", required=True, parser_class=_Parser)
    r = rsub.add_parser("train", help="train a float RetNet on the fortunes corpus",
                        epilog=_examples("gqa-lut retnet train --preset tiny --out runs/tiny.pt",
                                         "gqa-lut retnet train --preset gpu --out runs/retnet_gpu.pt --device cuda"))
    r.add_argument("--preset", default="cpu", help="tiny, cpu or gpu")
    r.add_argument("--out", default="runs/retnet_cpu.pt", help="checkpoint file")
    r.add_argument("--steps", type=int, help="override the preset's training steps")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r = rsub.add_parser("eval", help="test bits per character of every quantization step",
                        epilog=_examples("gqa-lut retnet eval",
                                         "gqa-lut retnet eval --checkpoint runs/tiny.pt --out tiny.json"))
    r.add_argument("--checkpoint", default="runs/retnet_cpu.pt", help="checkpoint from `retnet train`")
    r.add_argument("--out", default="bench/results/retnet_cpu.json", help="results file")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r = rsub.add_parser("report", help="combine results into bench/results/retnet.json and a table",
                        epilog=_examples("gqa-lut retnet report bench/results/retnet_cpu.json",
                                         "gqa-lut retnet report bench/results/retnet_cpu.json "
                                         "bench/results/retnet_gpu.json --plot"))
    r.add_argument("results", nargs="*", default=["bench/results/retnet_cpu.json"],
                   help="results files of `retnet eval` (default: bench/results/retnet_cpu.json)")
    r.add_argument("--out", default="bench/results/retnet.json", help="combined results file")
    r.add_argument("--markdown", default="bench/results/retnet.md", help="markdown table file")
    r.add_argument("--plot", nargs="?", const="bench/results/retnet.png",
                   help="also draw a chart (PNG path; bench/results/retnet.png when given alone)")

    p = sub.add_parser("ops", help="list the registry's ops",
                       epilog=_examples("gqa-lut ops", "gqa-lut ops --json"))
    p.add_argument("--json", action="store_true", help="print the registry as JSON")

    p = sub.add_parser("import-reference", help="convert a published GQA-LUT table to gqa-lut/1",
                       epilog=_examples("gqa-lut import-reference ../shared/reference-tables/gelu_pwl_7.json "
                                        "--op gelu --range -4 4",
                                        "gqa-lut import-reference exp_pwl_15.json --op exp --range -8 0 --out exp16.json"))
    p.add_argument("file", help="a published table (JSON layout of the GQA-LUT code)")
    p.add_argument("--op", required=True, help="registry op the table approximates")
    p.add_argument("--range", nargs=2, type=float, metavar=("LO", "HI"), required=True, help="its fitted range")
    p.add_argument("--input-bits", type=int, default=8, help="input bits, 2..16")
    p.add_argument("--param-bits", type=int, default=8, help="parameter bits, 2..16")
    p.add_argument("--out", help="output file (default <file stem>.gqa.json)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return parser


def default_fit_name(file_op: str, param_bits: int, input_bits: int, segments: int, objective: str,
                     output: Optional[OutputFormat]) -> str:
    """<op>_<bits>b_<segments>s.json, with whatever else tells two fits apart spelled out."""
    bits = f"{param_bits}b" if param_bits == input_bits else f"p{param_bits}b_i{input_bits}b"
    name = f"{file_op}_{bits}_{segments}s"
    if objective != "mse":
        name += f"_{objective}"
    if output is not None:
        name += f"_o{output.bits}e{output.frac_bits}"
    return name + ".json"


# --- helpers -------------------------------------------------------------------------------

def _function_for(table: Table, expr: Optional[str]) -> Callable[[np.ndarray], np.ndarray]:
    from ops.registry import get_op

    if table.op.startswith("custom:"):
        text = expr or (table.search or {}).get("expr")
        if not text:
            raise UsageError(f"table op {table.op!r} is a custom function and the file carries no "
                             "expression: pass --expr")
        from gqa_lut.expr import Expression
        return Expression(text)
    return get_op(table.op).fn


def _load_weights(path: Optional[str]) -> Optional[np.ndarray]:
    if path is None:
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"weights file {path!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"weights file {path!r} is not a numpy .npy array: {exc}") from None
    arr = np.asarray(arr, dtype=np.float64) if np.issubdtype(np.asarray(arr).dtype, np.number) else None
    if arr is None or not (arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 2)) or arr.size == 0:
        raise UsageError(f"weights file {path!r}: expected a 1-D array of samples or (value, weight) rows")
    if not np.all(np.isfinite(arr)) or (arr.ndim == 2 and np.any(arr[:, 1] < 0)):
        raise UsageError(f"weights file {path!r}: values must be finite and weights >= 0")
    return arr


def _metrics_rows(table: Table, m: dict) -> list[str]:
    lines = [f"{'scale d':>8} {'codes':>6} {'mse':>11}"]
    from gqa_lut.quantization import input_codes
    for d in table.scales:
        n = input_codes(table.range[0], table.range[1], d, table.input_bits).size
        v = m["mse_per_scale"].get(str(d), float("nan"))
        lines.append(f"{d:>8} {n:>6} {v:>11.4e}")
    lines.append(f"mse {m['mse']:.4e}   max_abs_err {m['max_abs_err']:.4e}   dense_mse {m['dense_mse']:.4e}")
    return lines


def _summary(table: Table, out: Path) -> str:
    s = table.search or {}
    head = (f"{table.op}: {table.segments} segments, param {table.param_bits} bits (frac {table.frac_bits}), "
            f"input {table.input_bits} bits, scales {table.scales[0]}..{table.scales[-1]}, "
            f"range [{table.range[0]:g}, {table.range[1]:g}]")
    tail = f"fitted in {s.get('seconds', 0):.2f}s ({s.get('generations', 0)} generations) -> {out}"
    rows = _metrics_rows(table, table.metrics or {})
    if s.get("weighted"):
        rows.append(f"weighted {s.get('objective', 'mse')} {s.get('objective_value', float('nan')):.4e} "
                    "(the objective: errors weighted by the activation histogram, all scales)")
    return "\n".join([head, *rows, tail])


# --- commands ------------------------------------------------------------------------------

def cmd_fit(args: argparse.Namespace) -> int:
    from gqa_lut.expr import Expression
    from gqa_lut.progress import ProgressBar
    from gqa_lut.quantization import check_bits
    from gqa_lut.search import FitConfig, fit
    from ops.registry import custom_op, get_op

    bits = args.bits if args.bits is not None else 8
    check_bits("bits", bits)
    pbits = args.param_bits if args.param_bits is not None else bits
    ibits = args.input_bits if args.input_bits is not None else bits
    extra = {}
    if args.expr is not None:
        if not args.name.replace("_", "").replace("-", "").isalnum():
            raise UsageError(f"name {args.name!r} is not allowed: use letters, digits, - and _")
        fn = Expression(args.expr)
        rng = tuple(args.range) if args.range else (-4.0, 4.0)
        op = custom_op(args.name, fn, *rng)
        extra["expr"] = fn.text
        file_op = f"custom_{args.name}"
    else:
        op = get_op(args.op)
        file_op = op.name
    output = None
    if (args.output_bits is None) != (args.output_frac_bits is None):
        raise UsageError("--output-bits and --output-frac-bits go together: give both or neither")
    if args.output_bits is not None:
        output = OutputFormat(args.output_bits, args.output_frac_bits)
    if args.workers < 1:
        raise UsageError(f"workers {args.workers} is not allowed: use 1 or more")
    cfg = FitConfig(segments=args.segments, param_bits=pbits, input_bits=ibits, frac_bits=args.frac_bits,
                    range=tuple(args.range) if args.range else None,
                    scales=tuple(args.scales) if args.scales else None,
                    population=args.population, generations=args.generations, patience=args.patience,
                    seed=args.seed, objective=args.objective, weights=_load_weights(args.weights),
                    output=output, chunks=args.workers, extra=extra)
    out = check_writable(args.out or default_fit_name(file_op, pbits, ibits, args.segments, args.objective, output))
    bar = ProgressBar(f"fit {op.name}", enabled=None if not (args.quiet or args.json) else False)
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            table = fit(op, cfg, map_fn=pool.map, progress=bar)
    else:
        table = fit(op, cfg, progress=bar)
    bar.close()
    save_table(table, out)
    if args.json:
        print(json.dumps({"file": str(out), "op": table.op, "segments": table.segments,
                          "frac_bits": table.frac_bits, "metrics": table.metrics,
                          "seconds": table.search["seconds"]}, indent=2))
    elif not args.quiet:
        print(_summary(table, out))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from gqa_lut.evaluator import max_abs_acc, metrics

    table = load_table(args.table)
    m = metrics(table, _function_for(table, args.expr))
    if args.json:
        print(json.dumps({"file": args.table, "op": table.op, "metrics": m,
                          "max_abs_acc": max_abs_acc(table)}, indent=2))
        return 0
    print(f"{args.table}: {table.op}, {table.segments} segments, frac_bits {table.frac_bits}, "
          f"range [{table.range[0]:g}, {table.range[1]:g}], largest |ACC| {max_abs_acc(table)}")
    print("\n".join(_metrics_rows(table, m)))
    return 0


def cmd_ops(args: argparse.Namespace) -> int:
    from ops.registry import OPS

    rows = []
    for name, op in OPS.items():
        if op.name != name:
            continue
        aliases = [a for a, o in OPS.items() if o is op and a != name]
        rows.append({"op": name, "aliases": aliases, "range": list(op.range), "scales": list(op.scales),
                     "left_tail": op.left_tail, "right_tail": op.right_tail, "description": op.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'op':<13} {'range':<9} {'scales':<7} description")
    for r in rows:
        name = r["op"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else "")
        rng = f"[{r['range'][0]:g}, {r['range'][1]:g}]"
        print(f"{name:<13} {rng:<9} {r['scales'][0]}..{r['scales'][1]:<4} {r['description']}")
    return 0


def cmd_import_reference(args: argparse.Namespace) -> int:
    from gqa_lut.evaluator import metrics, raw_metrics
    from gqa_lut.quantization import check_bits
    from gqa_lut.reference import convert_reference, read_reference
    from ops.registry import get_op

    check_bits("input bits", args.input_bits)
    check_bits("param bits", args.param_bits)
    op = get_op(args.op)
    out = check_writable(args.out or Path(args.file).stem + ".gqa.json")
    lo, hi = args.range
    if not lo < hi:
        raise UsageError(f"range [{lo:g}, {hi:g}] is empty or reversed: LO must be below HI")
    ref = read_reference(args.file, op.name if args.op else None)
    table, changes = convert_reference(ref, lo, hi, args.input_bits, args.param_bits)
    published = raw_metrics(ref.slopes, ref.intercepts, ref.breakpoints, ref.frac_bits, (lo, hi),
                            args.input_bits, op.fn)
    m = metrics(table, op.fn)
    table = table.with_(op=op.name, metrics=m, search={"imported_from": Path(args.file).name,
                                                       "changed_codes_per_scale": changes,
                                                       "published_metrics": published,
                                                       "tool_version": __version__})
    save_table(table, out)
    if args.json:
        print(json.dumps({"file": str(out), "metrics": m, "published_metrics": published,
                          "changed_codes_per_scale": changes}, indent=2))
        return 0
    print(f"published table, its own semantics (repeated breakpoints allowed): mse {published['mse']:.4e}, "
          f"max_abs_err {published['max_abs_err']:.4e}, dense_mse {published['dense_mse']:.4e}")
    changed = sum(changes.values())
    if changed:
        print(f"gqa-lut/1 needs strictly increasing breakpoints: {changed} input codes changed output "
              f"({', '.join(f'd={d}: {n}' for d, n in changes.items() if n)})")
    else:
        print("converted without loss")
    print("\n".join(_metrics_rows(table, m)))
    print(f"-> {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gqa_lut.export_c import export_c
    from gqa_lut.table import write_text_atomic

    if not args.c.endswith(".h"):
        raise UsageError(f"--c {args.c!r} is not a .h file name")
    check_writable(args.c, "--c")
    table = load_table(args.table)
    write_text_atomic(args.c, export_c(table, args.name))
    print(f"{args.table} -> {args.c}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
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
        fig = plot_tables(tables, _function_for(tables[0], None), labels, args.scale,
                          tuple(args.range) if args.range else None)
    print(save(fig, args.out, args.format))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from plots.sweep import sweep
    from gqa_lut.quantization import check_bits
    from ops.registry import get_op

    get_op(args.op)
    for b in args.bits:
        check_bits("bits", b)
    for s in args.segments:
        if not 2 <= s <= 256:
            raise UsageError(f"segments {s} is not allowed: use an integer from 2 to 256")
    if args.workers < 1:
        raise UsageError(f"workers {args.workers} is not allowed: use 1 or more")
    if args.generations < 0:
        raise UsageError(f"generations {args.generations} is not allowed: use 0 or more")
    check_writable(Path(args.out_dir) / "sweep.csv", "--out-dir")
    sweep(args.op, args.segments, args.bits, Path(args.out_dir), args.workers,
          {"generations": args.generations, "seed": args.seed})
    print(f"-> {args.out_dir}/sweep.csv, {args.out_dir}/sweep.png")
    return 0


def cmd_retnet(args: argparse.Namespace) -> int:
    from retnet_integration import pipeline

    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.retnet_command in ("train", "eval"):
        check_writable(args.out)
    else:
        for target in (args.out, args.markdown, args.plot):
            if target is not None:
                check_writable(target)
    if args.retnet_command == "train":
        pipeline.run_train(args.preset, Path(args.out), args.device, args.steps, log)
    elif args.retnet_command == "eval":
        pipeline.run_eval(Path(args.checkpoint), Path(args.out), args.device, log,
                          command="gqa-lut retnet eval " + " ".join(sys.argv[3:]))
    else:
        pipeline.run_report([Path(p) for p in args.results], Path(args.out), Path(args.markdown),
                            Path(args.plot) if args.plot else None, log)
    return 0


COMMANDS = {"fit": cmd_fit, "eval": cmd_eval, "ops": cmd_ops, "import-reference": cmd_import_reference,
            "export": cmd_export, "plot": cmd_plot, "sweep": cmd_sweep, "retnet": cmd_retnet}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"gqa-lut: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gqa-lut: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

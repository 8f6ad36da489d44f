"""The `gqa-lut` command line, and its composition root.

This module owns the commands of the core (fit, refit, eval, export, import-reference, ops)
and registers the other packages' commands (plots: plot, sweep; retnet_integration: retnet),
importing them only when the parser is built. Every user mistake is a UsageError, printed as
one line `gqa-lut: error: ...` with exit code 2, and no output file is left behind (targets are
checked before any work, files are written atomically, and only at the end).
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from gqa_lut import __version__
from gqa_lut.cli_support import EXIT_USAGE, MAX_WORKERS, Parser, examples
from gqa_lut.config import FitConfig, validate_config
from gqa_lut.errors import UsageError
from gqa_lut.quantization import check_int
from gqa_lut.table import OutputFormat, Table, load_table, save_table
from gqa_lut.io import check_readable, check_writable


def add_fit_args(p: argparse.ArgumentParser) -> None:
    """The options of a fit; defaults come from FitConfig, checks from gqa_lut.config."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--op", help="registry op (see `gqa-lut ops`)")
    src.add_argument("--expr", help='a formula in x with numpy math, e.g. "x*tanh(log1p(exp(x)))"')
    p.add_argument("--name", default="expr", help="name of an --expr function (table op custom:NAME)")
    p.add_argument("--bits", type=int, help=f"param and input bits together, 2..16 (default {FitConfig.param_bits})")
    p.add_argument("--param-bits", type=int, help="bits of every slope and intercept (default: --bits)")
    p.add_argument("--input-bits", type=int, help="bits of the integer input (default: --bits)")
    p.add_argument("--segments", type=int, default=FitConfig.segments, help="number of segments, 2..256")
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
    p.add_argument("--population", type=int, default=FitConfig.population, help="GA population size, >= 4")
    p.add_argument("--generations", type=int, default=FitConfig.generations, help="GA generations, >= 0")
    p.add_argument("--patience", type=int, default=FitConfig.patience,
                   help="stop after this many generations without gain, >= 1")
    p.add_argument("--seed", type=int, default=FitConfig.seed, help="random seed: the same seed gives the same table")
    p.add_argument("--objective", default=FitConfig.objective, help="mse or max (minimax)")
    p.add_argument("--weights", help="activation histogram .npy: raw samples (1-D) or (value, weight) "
                                     "rows; see the README for recording one from a model (default: uniform)")
    p.add_argument("--workers", type=int, default=1, help="processes for the fitness (toolbox.map)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gqa-lut", description="Quantization-aware piecewise-linear LUTs for integer hardware.",
                    epilog=examples("gqa-lut fit --op swish --bits 8", "gqa-lut eval swish_8b_8s.json",
                                    "gqa-lut <command> --help"))
    parser.add_argument("--version", action="version", version=f"gqa-lut {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("fit", help="fit a table with the genetic search", description="Fit a table with the "
                       "quantization-aware genetic search and write it as a gqa-lut/1 file.",
                       epilog=examples("gqa-lut fit --op swish --bits 8            # -> swish_8b_8s.json",
                                       "gqa-lut fit --op gelu --segments 16 --objective max --out gelu_max.json",
                                       'gqa-lut fit --expr "x*tanh(log1p(exp(x)))" --name mish --range -4 4'))
    add_fit_args(p)
    p.add_argument("--out", help="output file (default <op>_<bits>b_<segments>s.json; param and input bits, "
                                 "a minimax objective and output quantization are spelled out when they differ)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--json", action="store_true", help="print the table's metrics as JSON")
    p.set_defaults(handler=cmd_fit)

    p = sub.add_parser("refit", help="fit tables again from what their files record",
                       description="Fit each table again from the request its file records (search.config) "
                                   "and write it back, or with --check compare: integers exactly, floats "
                                   "within 1e-9 relative. Exit 1 when a check finds a difference.",
                       epilog=examples("gqa-lut refit ops/tables/*.json --check",
                                       "gqa-lut refit gelu_8b_16s.json            # rewrites the file"))
    p.add_argument("tables", nargs="+", help="gqa-lut/1 table files written by `fit`")
    p.add_argument("--check", action="store_true", help="compare instead of rewriting")
    p.add_argument("--weights", help="the activation histogram a weighted table was fitted with")
    p.set_defaults(handler=cmd_refit)

    p = sub.add_parser("eval", help="metrics of a table file, per scale",
                       description="Evaluate a table file on the spec's input grids against the exact function.",
                       epilog=examples("gqa-lut eval gelu_8b_16s.json", "gqa-lut eval mish.json --expr "
                                       '"x*tanh(log1p(exp(x)))" --json'))
    p.add_argument("table", help="a gqa-lut/1 table file")
    p.add_argument("--expr", help="the function of a custom table, if the file does not carry it")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("export", help="export a table as a C header or a Verilog module",
                       epilog=examples("gqa-lut export ops/tables/gelu.json --c gelu.h",
                                       "gqa-lut export swish_8b_8s.json --c swish.h --name act_swish",
                                       "gqa-lut export ops/tables/gelu.json --verilog gelu.v --top gelu_pwl --pipeline"))
    p.add_argument("table", help="a gqa-lut/1 table file")
    p.add_argument("--c", metavar="OUT.h", help="header file to write")
    p.add_argument("--name", help="C identifier prefix (default lut_<op>)")
    p.add_argument("--verilog", metavar="OUT.v", help="Verilog-2005 module to write (synthesizable)")
    p.add_argument("--top", help="the Verilog module's name (default lut_<op>)")
    p.add_argument("--pipeline", action="store_true", help="add clk and two register stages (latency 2)")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("rtl-area", help="cell area of a table's Verilog unit (yosys + abc, sky130 cells)",
                       description="Synthesize the table's PWL unit (`export --verilog`) with yosys, map it with "
                                   "abc onto an area-only Liberty (default: ../shared/rtl/"
                                   "sky130_fd_sc_hd_area.lib) and print cells and area in um^2; with "
                                   "--no-liberty a transistor-count estimate of generic CMOS gates instead.",
                       epilog=examples("gqa-lut rtl-area ops/tables/gelu.json",
                                       "gqa-lut rtl-area ops/tables/gelu.json --pipeline --json"))
    p.add_argument("table", help="a gqa-lut/1 table file")
    p.add_argument("--pipeline", action="store_true", help="the pipelined unit (two register stages)")
    p.add_argument("--liberty", help="Liberty file to map onto (default: the shared sky130 area library)")
    p.add_argument("--no-liberty", action="store_true", help="no mapping: estimate transistors instead")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_rtl_area)

    p = sub.add_parser("ops", help="list the registry's ops", epilog=examples("gqa-lut ops", "gqa-lut ops --json"))
    p.add_argument("--json", action="store_true", help="print the registry as JSON")
    p.set_defaults(handler=cmd_ops)

    p = sub.add_parser("import-reference", help="convert a published GQA-LUT table to gqa-lut/1",
                       epilog=examples("gqa-lut import-reference ../shared/reference-tables/gelu_pwl_7.json "
                                       "--op gelu --range -4 4",
                                       "gqa-lut import-reference exp_pwl_15.json --op exp --range -8 0 --out exp16.json"))
    p.add_argument("file", help="a published table (JSON layout of the GQA-LUT code)")
    p.add_argument("--op", required=True, help="registry op the table approximates")
    p.add_argument("--range", nargs=2, type=float, metavar=("LO", "HI"), required=True, help="its fitted range")
    p.add_argument("--input-bits", type=int, default=8, help="input bits, 2..16")
    p.add_argument("--param-bits", type=int, default=8, help="parameter bits, 2..16")
    p.add_argument("--out", help="output file (default <file stem>.gqa.json)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(handler=cmd_import_reference)

    # the composition root: the packages above gqa_lut add their own commands
    from plots import cli as plots_cli
    from retnet_integration import cli as retnet_cli
    plots_cli.register(sub)
    retnet_cli.register(sub)
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

def _load_weights(path: Optional[str]) -> Optional[np.ndarray]:
    if path is None:
        return None
    check_readable(path, "weights file")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, EOFError, BadZipFile...: one line
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UsageError(f"weights file {path!r} is not a numpy .npy array: {why}") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise UsageError(f"weights file {path!r} is not a numpy .npy array (an .npz archive?)")
    real = np.issubdtype(arr.dtype, np.number) and not np.issubdtype(arr.dtype, np.complexfloating)
    if not real or not (arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 2)) or arr.size == 0:
        raise UsageError(f"weights file {path!r}: expected a 1-D array of real samples or (value, weight) rows, "
                         f"got {arr.dtype} of shape {arr.shape}")
    arr = np.asarray(arr, dtype=np.float64)
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
    from gqa_lut.evaluator import outside_line
    from gqa_lut.expr import target_function

    s = table.search or {}
    head = (f"{table.op}: {table.segments} segments, param {table.param_bits} bits (frac {table.frac_bits}), "
            f"input {table.input_bits} bits, scales {table.scales[0]}..{table.scales[-1]}, "
            f"range [{table.range[0]:g}, {table.range[1]:g}]")
    tail = f"fitted in {s.get('seconds', 0):.2f}s ({s.get('generations_run', 0)} generations) -> {out}"
    rows = _metrics_rows(table, table.metrics or {})
    rows.append(outside_line(table, target_function(table), (table.metrics or {})["max_abs_err"]))
    rows.append(bound_line(s))
    if s.get("weighted"):
        rows.append(f"weighted {s.get('objective', 'mse')} {s.get('objective_value', float('nan')):.4e} "
                    "(the objective: errors weighted by the activation histogram, all scales)")
    return "\n".join([head, *rows, tail])


def bound_line(search: dict) -> str:
    """How far the fit is from what any table could reach on its grids."""
    lb, value = search.get("lower_bound"), search.get("objective_value")
    if search.get("optimal"):
        return f"optimal: the exact optimum of its scale ({search.get('objective', 'mse')} {value:.4e})"
    if lb is None or value is None:
        return ("lower bound: none here (bounds need no output quantization; for mse also every code of "
                "grids of at most 1024 codes)")
    how = ("the hardest scale's best real lines with free breakpoints, and its output grid"
           if search.get("objective") == "max" else "each scale's exact optimum, summed")
    return (f"lower bound {lb:.4e} ({how}): the objective is "
            f"{value / lb:.2f}x it" if lb > 0 else f"lower bound 0: objective {value:.4e}")


@contextmanager
def fitness_map(workers: int) -> Iterator[Callable]:
    """The map the GA's fitness runs through: builtin map, or a process pool's."""
    check_int("workers", workers, 1, MAX_WORKERS)
    if workers == 1:
        yield map
        return
    with ProcessPoolExecutor(workers) as pool:
        yield pool.map


# --- commands ------------------------------------------------------------------------------

def cmd_fit(args: argparse.Namespace) -> int:
    from gqa_lut.expr import Expression
    from gqa_lut.functions import custom_op, get_op
    from gqa_lut.progress import ProgressBar
    from gqa_lut.search import fit

    bits = args.bits if args.bits is not None else FitConfig.param_bits
    pbits = args.param_bits if args.param_bits is not None else bits
    ibits = args.input_bits if args.input_bits is not None else bits
    extra = {}
    if args.expr is not None:
        fn = Expression(args.expr)
        op = custom_op(args.name, fn, *(args.range or (-4.0, 4.0)))
        extra["expr"] = fn.text
        file_op = f"custom_{args.name}"
    else:
        op = get_op(args.op)
        file_op = op.name
    if (args.output_bits is None) != (args.output_frac_bits is None):
        raise UsageError("--output-bits and --output-frac-bits go together: give both or neither")
    output = None if args.output_bits is None else OutputFormat(args.output_bits, args.output_frac_bits)
    cfg = FitConfig(segments=args.segments, param_bits=pbits, input_bits=ibits, frac_bits=args.frac_bits,
                    range=tuple(args.range) if args.range else None,
                    scale_range=tuple(args.scales) if args.scales else None,
                    population=args.population, generations=args.generations, patience=args.patience,
                    seed=args.seed, objective=args.objective, weights=_load_weights(args.weights),
                    output=output, chunks=args.workers, extra=extra)
    check_int("workers", args.workers, 1, MAX_WORKERS)
    validate_config(op, cfg)  # every mistake reported before the target is even looked at
    out = check_writable(args.out if args.out is not None else
                         default_fit_name(file_op, pbits, ibits, args.segments, args.objective, output))
    bar = ProgressBar(f"fit {op.name}", enabled=None if not (args.quiet or args.json) else False)
    with fitness_map(args.workers) as map_fn:
        table = fit(op, cfg, map_fn=map_fn, progress=bar)
    bar.close()
    save_table(table, out)
    if args.json:
        from gqa_lut.evaluator import outside_metrics
        from gqa_lut.expr import target_function
        outside = outside_metrics(table, target_function(table), table.metrics["max_abs_err"])
        print(json.dumps({"file": str(out), "op": table.op, "segments": table.segments,
                          "frac_bits": table.frac_bits, "metrics": table.metrics, "outside": outside,
                          "lower_bound": table.search["lower_bound"], "optimal": table.search["optimal"],
                          "seconds": table.search["seconds"]}, indent=2))
    elif not args.quiet:
        print(_summary(table, out))
    return 0


def cmd_refit(args: argparse.Namespace) -> int:
    from gqa_lut.refit import recorded_request, refit
    from gqa_lut.table import differences

    weights = _load_weights(args.weights)
    tables = [(path, load_table(path)) for path in args.tables]
    # every file, its request and its target checked before the first fit, and every file
    # written only after the last: one bad file among many changes none of them
    for path, table in tables:
        try:
            validate_config(*recorded_request(table, weights))
        except UsageError as exc:
            raise UsageError(f"{path}: {exc}") from None
        if not args.check:
            check_writable(path)
    differ = 0
    fitted = []
    for path, table in tables:
        new = refit(table, weights)
        if args.check:
            diff = differences(table.to_json(), new.to_json())
            differ += bool(diff)
            print(f"{path}: reproduced" if not diff else f"{path}: DIFFERS at " + "; ".join(diff[:3]))
        else:
            fitted.append((path, new))
    for path, new in fitted:
        save_table(new, path)
        print(f"{path}: mse {new.metrics['mse']:.4e}, max_abs_err {new.metrics['max_abs_err']:.4e} "
              f"({new.search['seconds']:.2f}s)")
    return 1 if differ else 0


def cmd_eval(args: argparse.Namespace) -> int:
    from gqa_lut.evaluator import max_abs_acc, metrics, outside_line, outside_metrics
    from gqa_lut.expr import target_function

    table = load_table(args.table)
    fn = target_function(table, args.expr)
    m = metrics(table, fn)
    if args.json:
        search = table.search or {}
        print(json.dumps({"file": args.table, "op": table.op, "metrics": m,
                          "outside": outside_metrics(table, fn, m["max_abs_err"]),
                          "max_abs_acc": max_abs_acc(table), "lower_bound": search.get("lower_bound"),
                          "objective": search.get("objective"), "objective_value": search.get("objective_value")},
                         indent=2))
        return 0
    print(f"{args.table}: {table.op}, {table.segments} segments, frac_bits {table.frac_bits}, "
          f"range [{table.range[0]:g}, {table.range[1]:g}], largest |ACC| {max_abs_acc(table)}")
    print("\n".join(_metrics_rows(table, m)))
    print(outside_line(table, fn, m["max_abs_err"]))
    if table.search and args.expr is None:  # the fit's own bound, for the function it was fitted to
        print(bound_line(table.search))
    return 0


def cmd_ops(args: argparse.Namespace) -> int:
    from gqa_lut.functions import OPS

    rows = []
    for name, op in OPS.items():
        if op.name != name:
            continue
        aliases = [a for a, o in OPS.items() if o is op and a != name]
        rows.append({"op": name, "aliases": aliases, "range": list(op.range), "scale_range": list(op.scale_range),
                     "left_tail": op.left_tail, "right_tail": op.right_tail, "description": op.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'op':<13} {'range':<9} {'scales':<7} description")
    for r in rows:
        name = r["op"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else "")
        rng = f"[{r['range'][0]:g}, {r['range'][1]:g}]"
        print(f"{name:<13} {rng:<9} {r['scale_range'][0]}..{r['scale_range'][1]:<4} {r['description']}")
    return 0


def cmd_import_reference(args: argparse.Namespace) -> int:
    from gqa_lut.evaluator import metrics, raw_metrics
    from gqa_lut.functions import get_op
    from gqa_lut.quantization import check_bits
    from gqa_lut.reference import convert_reference, read_reference

    check_bits("input bits", args.input_bits)
    check_bits("param bits", args.param_bits)
    op = get_op(args.op)
    out = check_writable(args.out if args.out is not None else Path(args.file).stem + ".gqa.json")
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
    from gqa_lut.export_verilog import export_verilog
    from gqa_lut.io import write_text_atomic

    if args.c is None and args.verilog is None:
        raise UsageError("nothing to export: give --c OUT.h and/or --verilog OUT.v")
    if args.c is not None and not args.c.endswith(".h"):
        raise UsageError(f"--c {args.c!r} is not a .h file name")
    if args.verilog is not None and not args.verilog.endswith(".v"):
        raise UsageError(f"--verilog {args.verilog!r} is not a .v file name")
    if (args.top is not None or args.pipeline) and args.verilog is None:
        raise UsageError("--top and --pipeline are options of --verilog")
    if args.name is not None and args.c is None:
        raise UsageError("--name is an option of --c")
    for target, what in ((args.c, "--c"), (args.verilog, "--verilog")):
        if target is not None:
            check_writable(target, what)
    table = load_table(args.table)
    texts = []  # every text made before any file is written: one bad option writes none
    if args.c is not None:
        texts.append((args.c, export_c(table, args.name)))
    if args.verilog is not None:
        texts.append((args.verilog, export_verilog(table, args.top, args.pipeline)))
    for target, text in texts:
        write_text_atomic(target, text)
    print(f"{args.table} -> {', '.join(target for target, _ in texts)}")
    return 0


def cmd_rtl_area(args: argparse.Namespace) -> int:
    from gqa_lut.export_verilog import export_verilog, verilog_identifier
    from gqa_lut.rtl_area import default_liberty, synthesize, yosys

    if args.liberty is not None and args.no_liberty:
        raise UsageError("--liberty and --no-liberty exclude each other")
    liberty = None if args.no_liberty else check_readable(args.liberty or default_liberty(), "Liberty file")
    yosys()  # installed, before anything else is done
    table = load_table(args.table)
    top = verilog_identifier(table.op)
    result = synthesize(export_verilog(table, top, args.pipeline), top, liberty)
    if args.json:
        print(json.dumps({"file": args.table, "op": table.op, "segments": table.segments,
                          "pipeline": args.pipeline, "liberty": None if liberty is None else str(liberty),
                          **result}, indent=2))
        return 0
    kind = "pipelined (latency 2)" if args.pipeline else "combinational"
    size = (f"{result['area_um2']:.1f} um^2 on {liberty.name}" if liberty is not None
            else f"about {result['transistors']} transistors (generic CMOS gates, no Liberty)")
    print(f"{args.table}: {table.op}, {table.segments} segments, {len(table.scales)} scales, {kind}: "
          f"{result['cells']} cells ({result['flip_flops']} flip-flops), {size}; yosys {result['seconds']:.1f} s")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv  # what the user typed, for results that record their command
        return args.handler(args)
    except UsageError as exc:
        print(f"gqa-lut: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gqa-lut: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`gqa-lut retnet train|eval|report` (registered by gqa_lut.cli; `python -m retnet_integration`
runs the same). torch is imported only when a command runs."""
from __future__ import annotations

import argparse
from pathlib import Path

from gqa_lut.cli_support import Parser, examples
from gqa_lut.table import check_writable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retnet", help="the quantized RetNet: train, eval, report",
                       epilog=examples("gqa-lut retnet train --preset cpu", "gqa-lut retnet eval"))
    rsub = p.add_subparsers(dest="retnet_command", required=True, parser_class=Parser)
    r = rsub.add_parser("train", help="train a float RetNet on the fortunes corpus",
                        epilog=examples("gqa-lut retnet train --preset tiny --out runs/tiny.pt",
                                        "gqa-lut retnet train --preset gpu --out runs/retnet_gpu.pt --device cuda"))
    r.add_argument("--preset", default="cpu", help="tiny, cpu or gpu")
    r.add_argument("--out", default="runs/retnet_cpu.pt", help="checkpoint file")
    r.add_argument("--steps", type=int, help="override the preset's training steps")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r.set_defaults(handler=cmd_train)
    r = rsub.add_parser("eval", help="test bits per character of every quantization step",
                        epilog=examples("gqa-lut retnet eval",
                                        "gqa-lut retnet eval --checkpoint runs/tiny.pt --out tiny.json"))
    r.add_argument("--checkpoint", default="runs/retnet_cpu.pt", help="checkpoint from `retnet train`")
    r.add_argument("--out", default="bench/results/retnet_cpu.json", help="results file")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r.set_defaults(handler=cmd_eval)
    r = rsub.add_parser("report", help="combine results into bench/results/retnet.json and a table",
                        epilog=examples("gqa-lut retnet report bench/results/retnet_cpu.json",
                                        "gqa-lut retnet report bench/results/retnet_cpu.json "
                                        "bench/results/retnet_gpu.json --plot"))
    r.add_argument("results", nargs="*", default=["bench/results/retnet_cpu.json"],
                   help="results files of `retnet eval` (default: bench/results/retnet_cpu.json)")
    r.add_argument("--out", default="bench/results/retnet.json", help="combined results file")
    r.add_argument("--markdown", default="bench/results/retnet.md", help="markdown table file")
    r.add_argument("--plot", nargs="?", const="bench/results/retnet.png",
                   help="also draw a chart (PNG path; bench/results/retnet.png when given alone)")
    r.set_defaults(handler=cmd_report)


def _log(line: str) -> None:
    print(line, flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    from retnet_integration import pipeline

    check_writable(args.out)
    pipeline.run_train(args.preset, Path(args.out), args.device, args.steps, _log)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from retnet_integration import pipeline

    check_writable(args.out)
    pipeline.run_eval(Path(args.checkpoint), Path(args.out), args.device, _log,
                      command="gqa-lut " + " ".join(args.argv))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from retnet_integration import pipeline

    for target in (args.out, args.markdown, args.plot):
        if target is not None:
            check_writable(target)
    combined = pipeline.run_report([Path(p) for p in args.results], Path(args.out), Path(args.markdown), _log)
    if args.plot is not None:
        from plots.retnet_chart import retnet_chart
        retnet_chart(combined["runs"], Path(args.plot))
        _log(f"chart -> {args.plot}")
    return 0

"""`gqa-lut retnet train|eval|report|study|qat-int|export-c|check-int` (registered by gqa_lut.cli;
`python -m retnet_integration` runs the same). torch is imported only when a command runs."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from gqa_lut.cli_support import Parser, examples
from gqa_lut.io import check_writable, write_json_atomic


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retnet", help="the quantized RetNet: train, eval, report, study, qat-int, export-c, check-int",
                       epilog=examples("gqa-lut retnet train --preset cpu", "gqa-lut retnet eval"))
    rsub = p.add_subparsers(dest="retnet_command", required=True, parser_class=Parser)
    r = rsub.add_parser("train", help="train a float RetNet on the preset's corpus (fortunes, or gcide for gpu)",
                        epilog=examples("gqa-lut retnet train --preset tiny --out runs/tiny.pt",
                                        "gqa-lut retnet train --preset cpu --seed 1 --out runs/retnet_cpu_s1.pt",
                                        "gqa-lut retnet train --preset gpu --out runs/retnet_gpu.pt --device cuda"))
    r.add_argument("--preset", default="cpu", help="tiny, cpu, gpu or gpu10 (~10 minutes on one H100)")
    r.add_argument("--out", default="runs/retnet_cpu.pt", help="checkpoint file")
    r.add_argument("--steps", type=int, help="override the preset's training steps")
    r.add_argument("--seed", type=int, help="training seed: initialisation and data order (default 0)")
    r.add_argument("--corpus", choices=("fortunes", "gcide"), help="override the preset's corpus")
    r.add_argument("--max-seconds", type=float, help="override the preset's training time budget")
    _device(r)
    r.set_defaults(handler=cmd_train)
    r = rsub.add_parser("eval", help="test bits per character of every quantization step",
                        epilog=examples("gqa-lut retnet eval",
                                        "gqa-lut retnet eval --checkpoint runs/tiny.pt --out tiny.json"))
    r.add_argument("--checkpoint", default="runs/retnet_cpu.pt", help="checkpoint from `retnet train`")
    r.add_argument("--out", default="runs/retnet_cpu.json", help="results file")
    _device(r)
    r.set_defaults(handler=cmd_eval)
    r = rsub.add_parser("report", help="combine results into runs/retnet.json and a table",
                        epilog=examples("gqa-lut retnet report runs/retnet_cpu.json",
                                        "gqa-lut retnet report runs/retnet_cpu.json runs/retnet_gpu.json --plot"))
    r.add_argument("results", nargs="*", default=["runs/retnet_cpu.json"],
                   help="results files of `retnet eval` (default: runs/retnet_cpu.json)")
    r.add_argument("--out", default="runs/retnet.json", help="combined results file")
    r.add_argument("--markdown", default="runs/retnet.md", help="markdown table file")
    r.add_argument("--plot", nargs="?", const="runs/retnet.png",
                   help="also draw a chart (PNG path; runs/retnet.png when given alone)")
    r.set_defaults(handler=cmd_report)

    r = rsub.add_parser("qat-int", help="fine-tune through the integer graph (what export-c writes)",
                        epilog=examples("gqa-lut retnet qat-int --checkpoint runs/retnet_cpu.pt --out runs/retnet_cpu_int.pt"))
    r.add_argument("--checkpoint", default="runs/retnet_cpu.pt", help="float checkpoint from `retnet train`")
    r.add_argument("--out", default="runs/retnet_cpu_int.pt", help="integer checkpoint")
    r.add_argument("--steps", type=int, help="QAT steps (default: the preset's qat_steps)")
    _device(r)
    r.set_defaults(handler=cmd_qat_int)
    r = rsub.add_parser("export-c", help="write the integer RetNet as a self-contained C99 program",
                        epilog=examples("gqa-lut retnet export-c --checkpoint runs/retnet_cpu_int.pt --out retnet_c",
                                        "cc -O2 -std=c99 -Wall -Werror -o retnet_c/retnet retnet_c/retnet.c"))
    r.add_argument("--checkpoint", default="runs/retnet_cpu_int.pt",
                   help="integer checkpoint from `retnet qat-int` (a float one is calibrated, not fine-tuned)")
    r.add_argument("--out", required=True, help="folder for the library (retnet.h, retnet.c, model.h, tables.h), "
                   "its example program (main.c), a Cortex-M image (firmware.c), README.txt, model.json")
    r.set_defaults(handler=cmd_export_c)
    r = rsub.add_parser("check-int", help="float vs fake-quant vs integer reference (vs the C program)",
                        epilog=examples("gqa-lut retnet check-int --checkpoint runs/retnet_cpu_int.pt",
                                        "gqa-lut retnet check-int --checkpoint runs/retnet_cpu_int.pt --c retnet_c "
                                        "--json runs/retnet_int_cpu.json"))
    r.add_argument("--checkpoint", default="runs/retnet_cpu_int.pt", help="integer (or float) checkpoint")
    r.add_argument("--c", dest="c_dir", help="a folder written by `retnet export-c`: built and run on every window")
    r.add_argument("--windows", type=int, help="test windows (default: the preset's; all for cpu and gpu)")
    r.add_argument("--arm", action="store_true", help="with --c: also build the library for 32-bit ARM Linux and run "
                   "it on every window under qemu-arm, and size its Cortex-M4 image (arm-none-eabi-size)")
    r.add_argument("--json", help="write the results object here")
    r.set_defaults(handler=cmd_check_int)
    r = rsub.add_parser("study", help="the quantization study: quantizers, bit widths, sensitivity, seeds",
                        epilog=examples("gqa-lut retnet study --checkpoint runs/retnet_cpu.pt",
                                        "gqa-lut retnet study --checkpoint runs/s0.pt runs/s1.pt runs/s2.pt --plot",
                                        "gqa-lut retnet study --rows quantizer retention --seeds 1 --windows 512"))
    r.add_argument("--checkpoint", nargs="+", default=["runs/retnet_cpu.pt"],
                   help="float checkpoints from `retnet train`, one per training seed (one preset)")
    r.add_argument("--out", default="runs/retnet_study_cpu.json",
                   help="results (resumed when it holds runs of the same checkpoints); a .md beside it")
    r.add_argument("--seeds", type=int, help="QAT seeds per row and model (default 3 for one checkpoint, 1 for more)")
    r.add_argument("--windows", type=int, help="test windows, evenly spaced over the test text (default: all)")
    r.add_argument("--rows", nargs="*", help="row names or groups (quantizer, bits, schedule, retention, sensitivity); "
                   "default: all")
    _device(r)
    r.add_argument("--plot", nargs="?", const="", help="also draw the figures (PNG; default: beside --out)")
    r.add_argument("--merge", nargs="+", metavar="STUDY_JSON",
                   help="run nothing: combine studies of other training seeds (run side by side) into --out")
    r.set_defaults(handler=cmd_study)


def _device(r: argparse.ArgumentParser) -> None:
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")


def _log(line: str) -> None:
    print(line, flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    from retnet_integration.experiments import pipeline

    check_writable(args.out)
    pipeline.run_train(args.preset, Path(args.out), args.device, args.steps, _log, seed=args.seed,
                       corpus_name=args.corpus, max_seconds=args.max_seconds)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from retnet_integration.experiments import pipeline

    check_writable(args.out)
    pipeline.run_eval(Path(args.checkpoint), Path(args.out), args.device, _log,
                      command=shlex.join(["gqa-lut", *args.argv]))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from retnet_integration.experiments import pipeline

    for target in (args.out, args.markdown, args.plot):
        if target is not None:
            check_writable(target)
    combined = pipeline.run_report([Path(p) for p in args.results], Path(args.out), Path(args.markdown), _log)
    if args.plot is not None:
        from plots.retnet_chart import retnet_chart
        retnet_chart(combined["runs"], Path(args.plot))
        _log(f"chart -> {args.plot}")
    return 0


def cmd_qat_int(args: argparse.Namespace) -> int:
    from retnet_integration.experiments import commands as int_commands

    check_writable(args.out)
    int_commands.run_qat(Path(args.checkpoint), Path(args.out), args.device, args.steps, _log)
    return 0


def cmd_export_c(args: argparse.Namespace) -> int:
    from retnet_integration.integer import c_export
    from retnet_integration.experiments import commands as int_commands

    c_export.check_program_folder(Path(args.out))  # before the model is loaded: a bad --out costs nothing
    int_commands.run_export(Path(args.checkpoint), Path(args.out), _log)
    return 0


def cmd_check_int(args: argparse.Namespace) -> int:
    from retnet_integration.experiments import commands as int_commands

    if args.json:
        check_writable(args.json, "--json")
    doc = int_commands.run_check(Path(args.checkpoint), Path(args.c_dir) if args.c_dir else None, args.windows, _log,
                                 arm=args.arm)
    if args.json:
        write_json_atomic(args.json, doc)
        _log(f"wrote {args.json}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from retnet_integration.experiments import study

    out = check_writable(args.out)
    plot = None if args.plot is None else Path(args.plot or out.with_suffix(".png"))
    for target in (out, out.with_suffix(".md"), plot):
        if target is not None:
            check_writable(target)
    if args.merge:
        doc = study.merge_studies([Path(p) for p in args.merge], out, _log)
    else:
        doc = study.run_study([Path(c) for c in args.checkpoint], out, args.seeds, args.windows, args.rows, args.device, _log,
                              command=shlex.join(["gqa-lut", *args.argv]))
    if plot is not None:
        from plots.study_chart import study_chart
        study_chart(doc["summary"], plot, f"RetNet quantization study ({doc['preset']} preset)")
        _log(f"figures -> {plot}")
    return 0

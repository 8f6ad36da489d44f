"""The integer RetNet as a C library: flash and RAM of its Cortex-M4 image for each preset, the
library against the integer reference on every test window natively and under 32-bit ARM
emulation, and tokens/s of the library vs the numpy reference vs the first C program's
arithmetic, in one run.

    python -m bench.c_library [--presets cpu,gpu,gpu10] [--windows N] [--reps 3]

Test windows: every one of the cpu preset's; the first 64 of the gpu presets' (DEFAULT_WINDOWS).

Each preset's model is built at its shape with the seed-0 initialisation and calibrated on
real training text (IntSim.calibrate on 8 windows): sizes depend on the shapes alone, and the
bit-exactness check needs a model whose integers exercise every stage, not a trained one (a
trained checkpoint is checked the same way by `gqa-lut retnet check-int --c DIR --arm`).
"First program" is the library built with -DRETNET_INT64 -DRETNET_PIECEWISE: every shift in
int64 and each lookup a scan of the segments, as the program before the library did. Writes
bench/results/c_library.json. Needs cc; gcc-arm-none-eabi, gcc-arm-linux-gnueabihf and
qemu-user for the ARM columns (a one-line message and exit 2 without them).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import machine, names_in, positive_int, print_table, write_results
from gqa_lut.errors import UsageError
from retnet_integration.data import eval_windows, load_corpus
from retnet_integration.experiments.pipeline import PRESETS, get_preset
from retnet_integration.integer import c_export
from retnet_integration.integer import reference as ref
from retnet_integration.integer.export import export_integer
from retnet_integration.integer.simulation import IntSim
from retnet_integration.model import RetNet

FIRST_PROGRAM = ("-DRETNET_INT64", "-DRETNET_PIECEWISE")
# test windows per preset without --windows: every one of the cpu preset's (131k positions); the
# first 64 of the gpu presets' (16k positions: their models cost 8-16x the cpu one's per token,
# and qemu-arm runs all of theirs in tens of minutes)
DEFAULT_WINDOWS = {"cpu": None, "gpu": 64, "gpu10": 64}


def build_model(preset: str) -> tuple[ref.IntegerModel, torch.Tensor, int]:
    """(integer model, test windows, window length) of a preset, calibrated on training text."""
    cfg, tcfg = get_preset(preset)
    torch.manual_seed(0)
    sim = IntSim(RetNet(cfg).eval()).eval()
    corpus = load_corpus()
    sim.calibrate([eval_windows(corpus.train, tcfg.seq_len, 8)[:, :-1]])
    return export_integer(sim), eval_windows(corpus.test, tcfg.seq_len, tcfg.eval_windows)[:, :-1], tcfg.seq_len


def reference_logits(m: ref.IntegerModel, windows: np.ndarray) -> np.ndarray:
    return np.concatenate([ref.run(m, windows[i:i + 64]) for i in range(0, len(windows), 64)])


def measure(preset: str, folder: Path, windows: int | None, reps: int, arm: bool) -> dict:
    m, test, seq_len = build_model(preset)
    windows = windows or DEFAULT_WINDOWS.get(preset)
    x = test.numpy()[:windows] if windows else test.numpy()
    c_export.write_program(m, folder)
    row: dict = {"preset": preset, "windows": int(x.shape[0]), "test_windows": int(test.shape[0]),
                 "positions": int(x.size),
                 "weights_bytes": m.weights_bytes(), "state_bytes": m.state_bytes(),
                 "stages": c_export.stage_arithmetic(m, c_export.table_outputs(m))}
    want = reference_logits(m, x)
    lib = [str(c_export.build(folder, name="retnet_lib"))]
    first = [str(c_export.build(folder, FIRST_PROGRAM, name="retnet_first"))]
    got, _ = c_export.run_logits(lib, x, m.vocab)
    row["c_vs_int_logits_equal"] = float((got == want).all(-1).mean())
    if arm:
        got_arm, _ = c_export.run_logits(c_export.arm_linux_build(folder), x, m.vocab)
        row["arm_vs_int_logits_equal"] = float((got_arm == want).all(-1).mean())
        row["cortex_m4"] = c_export.cortex_m_sizes(folder)
    # speed: one stream, one token at a time, the steps alone; the C builds interleaved, best of reps
    speed_windows = x[: min(len(x), 64)]
    t_lib, t_first = [], []
    for _ in range(reps):
        t_lib.append(c_export.run_logits(lib, speed_windows, m.vocab)[1])
        t_first.append(c_export.run_logits(first, speed_windows, m.vocab)[1])
    t0 = time.perf_counter()
    ref.run(m, x[:1])
    row["int_tokens_per_s"] = x.shape[1] / (time.perf_counter() - t0)
    row["lib_tokens_per_s"] = speed_windows.size / min(t_lib)
    row["first_program_tokens_per_s"] = speed_windows.size / min(t_first)
    row["lib_vs_reference"] = row["lib_tokens_per_s"] / row["int_tokens_per_s"]
    row["lib_vs_first_program"] = row["lib_tokens_per_s"] / row["first_program_tokens_per_s"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", type=names_in(tuple(p for p in PRESETS if p != "tiny")), default="cpu,gpu,gpu10")
    ap.add_argument("--windows", type=positive_int, help="test windows per preset (default: all of the cpu "
                    "preset's, the first 64 of the gpu presets')")
    ap.add_argument("--reps", type=positive_int, default=3)
    ap.add_argument("--no-arm", action="store_true", help="skip the ARM build, emulation and sizes")
    args = ap.parse_args(argv)
    try:
        c_export.find_cc()
        if not args.no_arm:
            for tool, package in (("arm-none-eabi-gcc", "gcc-arm-none-eabi libnewlib-arm-none-eabi"),
                                  ("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf"), ("qemu-arm", "qemu-user")):
                c_export._tool(tool, package)
        rows = []
        for preset in args.presets:
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(measure(preset, Path(tmp), args.windows, args.reps, not args.no_arm))
    except UsageError as exc:
        print(f"bench.c_library: {exc}", file=sys.stderr)
        return 2
    table = []
    for r in rows:
        img = r.get("cortex_m4", {}).get("image", {})
        table.append([r["preset"], str(r["positions"]), f"{r['c_vs_int_logits_equal']:.4f}",
                      f"{r['arm_vs_int_logits_equal']:.4f}" if "arm_vs_int_logits_equal" in r else "-",
                      str(img.get("flash", "-")), str(img.get("ram", "-")), f"{r['int_tokens_per_s']:.0f}",
                      f"{r['first_program_tokens_per_s']:.0f}", f"{r['lib_tokens_per_s']:.0f}",
                      f"{r['lib_vs_reference']:.1f}x", f"{r['lib_vs_first_program']:.2f}x"])
    print_table(["preset", "positions", "C == ref", "ARM == ref", "M4 flash B", "M4 RAM B", "ref tok/s",
                 "first program tok/s", "library tok/s", "library/ref", "library/first"], table)
    path = write_results("c_library.json", {"machine": machine(), "results": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cell area of a Verilog module: yosys synthesis, abc mapping onto an area-only Liberty.

The flow is the one ../shared/rtl/README.md states (synth, dfflibmap, abc -liberty, stat
-liberty) on the open sky130 high-density cells, so numbers compare designs with each other on
one library and flow; they are cell area only (no wires, no timing). Without a Liberty, yosys'
`stat -tech cmos` gives a transistor-count estimate of the generic gates instead.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from gqa_lut.errors import UsageError
from gqa_lut.reference import shared_dir

YOSYS_TIMEOUT = 600


def default_liberty() -> Path:
    return shared_dir() / "rtl" / "sky130_fd_sc_hd_area.lib"


def yosys() -> str:
    exe = shutil.which("yosys")
    if exe is None:
        raise UsageError("yosys is not installed: apt-get install yosys")
    return exe


def synthesize(verilog: str, top: str, liberty: Optional[Path] = None) -> dict:
    """{"area_um2", "cells", "cell_types", "flip_flops", "seconds"} with a Liberty, or
    {"transistors", "cells", ...} without one (liberty=None)."""
    exe = yosys()
    with tempfile.TemporaryDirectory(prefix="gqa-lut-rtl-") as tmp:
        src, report = Path(tmp) / "unit.v", Path(tmp) / "stat.txt"
        src.write_text(verilog)
        if liberty is not None:
            lib = str(liberty)
            script = (f"read_verilog {src}; synth -top {top}; dfflibmap -liberty {lib}; abc -liberty {lib}; "
                      f"tee -q -o {report} stat -liberty {lib}")
        else:
            script = f"read_verilog {src}; synth -top {top}; abc -g cmos2; tee -q -o {report} stat -tech cmos"
        t0 = time.perf_counter()
        try:
            run = subprocess.run([exe, "-q", "-p", script], capture_output=True, text=True, timeout=YOSYS_TIMEOUT,
                                 env={**os.environ, "TMPDIR": tmp})
        except subprocess.TimeoutExpired:
            raise UsageError(f"yosys did not finish {top} in {YOSYS_TIMEOUT} s") from None
        seconds = time.perf_counter() - t0
        if run.returncode != 0 or not report.exists():
            why = (run.stderr.strip() or run.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise UsageError(f"yosys failed on {top}: {why[0][:200]}")
        text = report.read_text()
    return {**parse_stat(text, liberty is not None), "seconds": round(seconds, 2)}


def parse_stat(text: str, with_liberty: bool) -> dict:
    """What `stat` printed: cell count, each cell type's count, area or transistors."""
    cells = re.search(r"Number of cells:\s+(\d+)", text)
    types = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s+(\S+)\s+(\d+)\s*$", text, re.M)}
    out = {"cells": int(cells.group(1)) if cells else 0, "cell_types": types,
           "flip_flops": sum(n for name, n in types.items() if "df" in name.lower())}
    if with_liberty:
        area = re.search(r"Chip area for module '[^']*':\s+([0-9.]+)", text)
        if area is None:
            raise UsageError("yosys printed no chip area: is the Liberty an area library?")
        out["area_um2"] = float(area.group(1))
    else:
        tr = re.search(r"Estimated number of transistors:\s+(\d+)", text)
        out["transistors"] = int(tr.group(1)) if tr else None
    return out

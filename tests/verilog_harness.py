"""Simulate exported Verilog on every (scale, code) pair with Icarus Verilog and Verilator, many
tables per build (a Verilator build costs seconds), and read back each table's outputs."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from gqa_lut.export_verilog import export_verilog, ports
from gqa_lut.quantization import int_range

IVERILOG = shutil.which("iverilog") and shutil.which("vvp")
VERILATOR = shutil.which("verilator")


def _modules(tables, folder: Path, pipeline: bool) -> list[str]:
    names = [f"t{k}" for k in range(len(tables))]
    (folder / "units.v").write_text("".join(export_verilog(t, n, pipeline) for t, n in zip(tables, names)))
    return names


def _split(text: str, tables) -> list[dict[int, np.ndarray]]:
    vals = np.array(text.split(), dtype=np.int64)
    out, at = [], 0
    for t in tables:
        qmin, qmax = int_range(t.input_bits)
        n = qmax - qmin + 1
        out.append({d: vals[at + i * n: at + (i + 1) * n] for i, d in enumerate(t.scales)})
        at += n * len(t.scales)
    assert at == vals.size, (at, vals.size)
    return out


def iverilog_outputs(tables, folder: Path, pipeline: bool = False) -> list[dict[int, np.ndarray]]:
    names = _modules(tables, folder, pipeline)
    lines = ["`timescale 1ns/1ps", "module tb;", "    reg clk = 1'b0;", "    integer i, s;"]
    for k, (t, name) in enumerate(zip(tables, names)):
        q, sb, r = ports(t)
        lines += [f"    reg signed [{q - 1}:0] x{k};", f"    reg [{sb - 1}:0] s{k};", f"    wire signed [{r - 1}:0] y{k};",
                  f"    {name} u{k} (" + (".clk(clk), " if pipeline else "") + f".x(x{k}), .scale(s{k}), .y(y{k}));"]
    lines.append("    initial begin")
    for k, t in enumerate(tables):
        qmin, qmax = int_range(t.input_bits)
        step = ("x{k} = i; s{k} = s; #1 clk = 1; #1 clk = 0; #1 clk = 1; #1 clk = 0;" if pipeline
                else "x{k} = i; s{k} = s; #1;").format(k=k)
        lines.append(f"        for (s = 0; s < {len(t.scales)}; s = s + 1) for (i = {qmin}; i <= {qmax}; i = i + 1) "
                     f"begin {step} $display(\"%0d\", y{k}); end")
    lines += ["        $finish;", "    end", "endmodule"]
    (folder / "tb.v").write_text("\n".join(lines) + "\n")
    exe = folder / "tb.vvp"
    subprocess.run(["iverilog", "-g2005", "-Wall", "-o", str(exe), str(folder / "tb.v"), str(folder / "units.v")],
                   check=True, capture_output=True, text=True)
    run = subprocess.run(["vvp", "-n", str(exe)], capture_output=True, text=True, check=True)
    text = "\n".join(ln for ln in run.stdout.splitlines() if not ln.startswith(("VCD", "tb.v")))
    return _split(text, tables)


def verilator_outputs(tables, folder: Path, pipeline: bool = False) -> list[dict[int, np.ndarray]]:
    names = _modules(tables, folder, pipeline)
    q = [ports(t) for t in tables]
    wrapper = ["module top(" + ("input wire clk, " if pipeline else "")
               + ", ".join(f"input wire signed [{qq - 1}:0] x{k}, input wire [{sb - 1}:0] s{k}, "
                           f"output wire signed [{r - 1}:0] y{k}" for k, (qq, sb, r) in enumerate(q)) + ");"]
    wrapper += [f"    {n} u{k} (" + (".clk(clk), " if pipeline else "") + f".x(x{k}), .scale(s{k}), .y(y{k}));"
                for k, n in enumerate(names)]
    wrapper.append("endmodule")
    (folder / "top.v").write_text("\n".join(wrapper) + "\n")
    calls = []
    for k, (t, (qq, sb, r)) in enumerate(zip(tables, q)):
        qmin, qmax = int_range(t.input_bits)
        tick = "m->clk = 1; m->eval(); m->clk = 0; m->eval(); m->clk = 1; m->eval(); m->clk = 0; m->eval();" \
            if pipeline else "m->eval();"
        calls.append(
            f"  for (int s = 0; s < {len(t.scales)}; s++) for (long i = {qmin}; i <= {qmax}; i++) {{\n"
            f"    m->x{k} = (uint64_t)i & {(1 << qq) - 1}ULL; m->s{k} = s; {tick}\n"
            f"    uint64_t v = (uint64_t)m->y{k} & {(1 << r) - 1}ULL;\n"
            f"    long long y = (v & {1 << (r - 1)}ULL) ? (long long)(v | ~{(1 << r) - 1}ULL) : (long long)v;\n"
            f"    printf(\"%lld\\n\", y);\n  }}")
    (folder / "main.cpp").write_text("#include <cstdio>\n#include <cstdint>\n#include \"Vtop.h\"\n"
                                     "#include \"verilated.h\"\nint main(int argc, char **argv) {\n"
                                     "  Verilated::commandArgs(argc, argv);\n  Vtop *m = new Vtop;\n"
                                     + ("  m->clk = 0; m->eval();  // a first rising edge needs a low clock seen\n"
                                        if pipeline else "")
                                     + "\n".join(calls) + "\n  m->final();\n  delete m;\n  return 0;\n}\n")
    obj = folder / "obj"
    subprocess.run(["verilator", "--cc", "--exe", "--build", "-j", "2", "-Wall", "-Wno-DECLFILENAME",
                    "-Wno-UNUSEDSIGNAL", "-Wno-UNUSED", "--top-module", "top", "-Mdir", str(obj),
                    str(folder / "top.v"), str(folder / "units.v"), str(folder / "main.cpp"),
                    "-CFLAGS", "-O0"], check=True, capture_output=True, text=True)
    run = subprocess.run([str(obj / "Vtop")], capture_output=True, text=True, check=True)
    return _split(run.stdout, tables)

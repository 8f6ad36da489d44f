"""A synthesizable Verilog-2005 module for a table: section 3 of docs/lut-format.md in hardware.

    module <top>(input wire signed [Q-1:0] x, input wire [S-1:0] scale, output wire signed [R-1:0] y)

`scale` is the index of the input scale d in the table's own order (`table.scales`; S = 1 and
ignored for one scale); `y` is the spec's integer output, ACC or, with output quantization, Y
(R = the output bits), else ACC in as many bits as its largest value needs. The datapath is what
an INT8 PWL unit is: per scale a comparator against each breakpoint (the segment is the number
of breakpoints below x), the segment's slope and intercept as constants, one multiplier, one
adder, the rounding shift and the saturation. `pipeline=True` adds `clk` and two register stages
(after the multiplier, at the output): latency 2 cycles, stated in the header.

Every width comes from gqa_lut.bounds, so no intermediate overflows for any spec-valid table.
No string from the table reaches the text except `op`, which the loader allows only as an
identifier-like name (gqa_lut.table.OP_NAME); the module name is checked to be a Verilog
identifier.
"""
from __future__ import annotations

import re

import numpy as np

from gqa_lut import bounds
from gqa_lut.errors import UsageError
from gqa_lut.quantization import int_range
from gqa_lut.table import Table

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# words a module may not be named (Verilog-2005 and SystemVerilog keywords that tools reject)
KEYWORDS = frozenset("""always and assign automatic begin buf bufif0 bufif1 case casex casez cell cmos config
deassign default defparam design disable edge else end endcase endconfig endfunction endgenerate endmodule
endprimitive endspecify endtable endtask event for force forever fork function generate genvar highz0 highz1
if ifnone incdir include initial inout input instance integer join large liblist library localparam
macromodule medium module nand negedge nmos nor noshowcancelled not notif0 notif1 or output parameter pmos
posedge primitive pull0 pull1 pulldown pullup pulsestyle_onevent pulsestyle_ondetect rcmos real realtime reg
release repeat rnmos rpmos rtran rtranif0 rtranif1 scalared showcancelled signed small specify specparam
strong0 strong1 supply0 supply1 table task time tran tranif0 tranif1 tri tri0 tri1 triand trior trireg
unsigned use uwire vectored wait wand weak0 weak1 while wire wor xnor xor logic bit byte int shortint
longint class interface package program property sequence""".split())


def verilog_identifier(op: str) -> str:
    return "lut_" + re.sub(r"[^0-9A-Za-z_]", "_", op.replace("custom:", "")).lower()


def _lit(value: int, width: int) -> str:
    """A signed `width`-bit literal of value, two's complement in hex (no unary minus)."""
    return f"{width}'sh{value & ((1 << width) - 1):x}"


def _sext(name: str, have: int, want: int) -> str:
    """name (signed, `have` bits) sign-extended to `want` bits, written out (lint-clean)."""
    return name if want == have else f"$signed({{{{{want - have}{{{name}[{have - 1}]}}}}, {name}}})"


def ports(table: Table) -> tuple[int, int, int]:
    """(Q, S, R): input bits, scale-index bits, output bits of the module."""
    q = table.input_bits
    s = max(1, (len(table.scales) - 1).bit_length())
    if table.output is not None:
        return q, s, table.output.bits
    acc = max(bounds.acc_bound(table.slopes, table.intercepts, q, d) for d in table.scales)
    return q, s, acc.bit_length() + 1


def _case(sel: str, bits: int, statements: list[str]) -> list[str]:
    """A combinational case over an index: statement i for index i, the first one for any other
    index (a scale index past the last scale computes the first scale, throughout)."""
    return (["    always @*", f"        case ({sel})"]
            + [f"            {bits}'d{i}: {st}" for i, st in enumerate(statements)]
            + [f"            default: {statements[0]}", "        endcase"])


def check_top(top: str) -> str:
    if not isinstance(top, str) or not IDENTIFIER.fullmatch(top) or top in KEYWORDS:
        raise UsageError(f"--top {top!r} is not a Verilog identifier (letters, digits and _, not a keyword)")
    return top


def export_verilog(table: Table, top: str | None = None, pipeline: bool = False) -> str:
    table.validate()
    return pwl_module(table, check_top(top or verilog_identifier(table.op)), pipeline)


def widened(table: Table, bits: int = 32, fn=None) -> Table:
    """The same PWL at `bits`-bit inputs, parameters and arithmetic (the INT32 alternative a
    designer compares against): codes X * 2^(bits-Q) at scale d + bits - Q, the same breakpoints.
    Without `fn` the parameters are the table's, shifted up (identical outputs, but constants
    with bits - P zero bits, which synthesis exploits); with `fn` each segment's line is fitted
    again by least squares to fn on the codes it serves and quantized to `bits` bits (the
    float line in 32-bit fixed point: what an INT32 unit would hold). Outside the spec's 16-bit
    bounds, so unvalidated: for area comparisons, not for files."""
    from gqa_lut.quantization import choose_frac_bits, code_values, input_codes
    if table.output is not None:
        raise UsageError("the widened (INT32) variant is for tables without output quantization")
    up_x, up_p = bits - table.input_bits, bits - table.param_bits
    slopes, intercepts, frac = table.slopes << up_p, table.intercepts << up_p, table.frac_bits + up_p
    if fn is not None:
        k = table.slopes * 2.0 ** -table.frac_bits
        b = table.intercepts * 2.0 ** -table.frac_bits
        xs, segs = [], []
        for d, bp in table.breakpoints.items():
            codes = input_codes(table.range[0], table.range[1], d, table.input_bits)
            xs.append(code_values(codes, d))
            segs.append(np.searchsorted(bp, codes, side="left"))
        x, seg = np.concatenate(xs), np.concatenate(segs)
        y = np.asarray(fn(x), dtype=np.float64)
        for i in range(table.segments):
            sel = seg == i
            if np.unique(x[sel]).size >= 2:
                k[i], b[i] = np.polyfit(x[sel], y[sel], 1)
        frac = choose_frac_bits(np.concatenate([k, b]), bits)
        slopes, intercepts = np.rint(np.ldexp(k, frac)).astype(np.int64), np.rint(np.ldexp(b, frac)).astype(np.int64)
    return Table(op=table.op, range=table.range, slopes=slopes, intercepts=intercepts,
                 breakpoints={d + up_x: bp << up_x  # the same codes on either side of each
                              for d, bp in table.breakpoints.items()},
                 frac_bits=frac, param_bits=bits, input_bits=bits)


def rom_module(table: Table, top: str) -> str:
    """The alternative to a PWL unit: every output precomputed, one constant per (scale, code),
    selected by a case over {scale, x} (a ROM that synthesis turns into logic)."""
    from gqa_lut.evaluator import evaluate_codes
    table.validate()
    q, sbits, r = ports(table)
    qmin, qmax = int_range(q)
    codes = np.arange(qmin, qmax + 1)
    lines = [f"// {check_top(top)}: every output of the gqa-lut/1 table for {table.op} as a constant "
             f"({len(table.scales)} scales x {codes.size} codes); combinational.",
             f"module {top} (", f"    input  wire signed [{q - 1}:0] x,", f"    input  wire [{sbits - 1}:0] scale,",
             f"    output reg signed [{r - 1}:0] y", ");", "    always @* begin", "        case ({scale, x})"]
    for i, d in enumerate(table.scales):
        for c, v in zip(codes, evaluate_codes(table, codes, d)):
            lines.append(f"            {sbits + q}'h{(i << q) | (int(c) & ((1 << q) - 1)):x}: y = {_lit(int(v), r)};")
    lines += [f"            default: y = {_lit(0, r)};", "        endcase", "    end", "endmodule"]
    return "\n".join(lines) + "\n"


def multiplier_module(table: Table, top: str) -> str:
    """The unit's multiplier alone (P x Q bits, signed): where a designer's area goes."""
    p, q = table.param_bits, table.input_bits
    return (f"module {check_top(top)} (input wire signed [{p - 1}:0] a, input wire signed [{q - 1}:0] b,\n"
            f"    output wire signed [{p + q - 1}:0] y);\n    assign y = a * b;\nendmodule\n")


def pwl_module(table: Table, top: str, pipeline: bool = False, segment_only: bool = False) -> str:
    """The PWL unit's text for a table (validated by the caller, or `widened`); segment_only:
    just the comparators and the scale's choice, the segment index as the output (for the area
    breakdown)."""
    q, sbits, r = ports(table)
    if segment_only:
        r = max(1, (table.segments - 1).bit_length())
    n = table.segments
    p = table.param_bits
    qmin, qmax = int_range(q)
    output = None if table.output is None else (table.output.bits, table.output.frac_bits)
    widest = max(bounds.intermediate_bound(bounds.acc_bound(table.slopes, table.intercepts, q, d),
                                           table.frac_bits, d, output) for d in table.scales)
    w = max(widest.bit_length() + 2, p + q + 1, r + 1)  # one width for the datapath, sign included
    segw = max(1, (n - 1).bit_length())
    bw = q + 1  # breakpoints clamped to [qmin - 1, qmax]: they separate the same codes
    latency = 2 if pipeline else 0
    head = [
        f"// {top}: gqa-lut/1 table for {table.op}, {n} segments, range [{table.range[0]:g}, {table.range[1]:g}],",
        f"// {len(table.scales)} input scales d = {', '.join(map(str, table.scales))} (input `scale` is the index).",
        f"// x: {q}-bit input code (real value x * 2^-d); y: the spec's integer output "
        + ("Y, " + f"{table.output.bits} bits with {table.output.frac_bits} fractional bits" if table.output
           else f"ACC in {r} bits, frac_bits + max(d, 0) fractional bits") + ".",
        f"// Slopes/intercepts: {p}-bit, {table.frac_bits} fractional bits. Datapath width {w} bits "
        "(gqa_lut.bounds: no intermediate overflows).",
        f"// Latency: {latency} clock cycle{'s' if latency != 1 else ''}"
        + (" (registers after the multiplier and at the output)." if pipeline else " (combinational)."),
        "// Generated by gqa-lut (docs/lut-format.md section 3); Verilog-2005, synthesizable.",
    ]
    io = [f"    input  wire signed [{q - 1}:0] x,", f"    input  wire [{sbits - 1}:0] scale,",
          f"    output wire signed [{r - 1}:0] y"]
    if pipeline:
        io.insert(0, "    input  wire clk,")
    body = [f"module {top} (", *io, ");"]
    # the segment: number of breakpoints below x, per scale, then chosen by the scale index
    body.append(f"    wire signed [{bw - 1}:0] xc = {_sext('x', q, bw)};")
    body.append(f"    reg [{segw - 1}:0] seg;")
    for i, d in enumerate(table.scales):
        bp = [min(max(int(v), qmin - 1), qmax) for v in table.breakpoints[d]]
        terms = " + ".join(f"{{{{{segw - 1}{{1'b0}}}}, (xc > {_lit(v, bw)})}}" if segw > 1 else f"(xc > {_lit(v, bw)})"
                           for v in bp)
        body.append(f"    wire [{segw - 1}:0] seg_{i} = {terms};  // scale d = {d}")
    body += _case("scale", sbits, [f"seg = seg_{i};" for i in range(len(table.scales))])
    if segment_only:
        return "\n".join(head + body + ["    assign y = seg;", "endmodule"]) + "\n"
    # slope and intercept of the segment: constants
    body += [f"    reg signed [{p - 1}:0] k;", f"    reg signed [{p - 1}:0] b;"]
    body += _case("seg", segw, [f"begin k = {_lit(int(k), p)}; b = {_lit(int(c), p)}; end"
                                for k, c in zip(table.slopes, table.intercepts)])
    # one multiplier; per scale the product and the intercept shifted by constants, one adder
    body += [f"    wire signed [{w - 1}:0] xw = {_sext('x', q, w)};", f"    wire signed [{w - 1}:0] kw = {_sext('k', p, w)};",
             f"    wire signed [{w - 1}:0] bw = {_sext('b', p, w)};", f"    wire signed [{w - 1}:0] prod = kw * xw;",
             f"    reg signed [{w - 1}:0] lhs;", f"    reg signed [{w - 1}:0] rhs;"]
    body += _case("scale", sbits, [f"begin lhs = {f'prod <<< {-d}' if d < 0 else 'prod'}; "
                                   f"rhs = {f'bw <<< {d}' if d > 0 else 'bw'}; end" for d in table.scales])
    sel = "scale"
    if pipeline:
        body += [f"    reg signed [{w - 1}:0] lhs_r;", f"    reg signed [{w - 1}:0] rhs_r;",
                 f"    reg [{sbits - 1}:0] scale_r;",
                 "    always @(posedge clk) begin", "        lhs_r <= lhs;", "        rhs_r <= rhs;",
                 "        scale_r <= scale;", "    end"]
        body.append(f"    wire signed [{w - 1}:0] acc = lhs_r + rhs_r;")
        sel = "scale_r"
    else:
        body.append(f"    wire signed [{w - 1}:0] acc = lhs + rhs;")
    if table.output is None:
        result = "acc"
    else:
        # round half up: add 2^(t-1), arithmetic shift right by t (t > 0); shift left (t <= 0)
        shifts = [table.frac_bits + max(d, 0) - table.output.frac_bits for d in table.scales]
        body += [f"    reg signed [{w - 1}:0] half;", f"    reg signed [{w - 1}:0] shifted;"]
        body += _case(sel, sbits, [f"half = {_lit(1 << (t - 1), w) if t > 0 else _lit(0, w)};" for t in shifts])
        body.append(f"    wire signed [{w - 1}:0] rounded = acc + half;")
        body += _case(sel, sbits, [f"shifted = {f'rounded >>> {t}' if t > 0 else (f'acc <<< {-t}' if t < 0 else 'acc')};"
                                   for t in shifts])
        lo, hi = int_range(r)
        body += [f"    wire signed [{r - 1}:0] sat = (shifted < {_lit(lo, w)}) ? {_lit(lo, r)} :",
                 f"                                   (shifted > {_lit(hi, w)}) ? {_lit(hi, r)} : shifted[{r - 1}:0];"]
        result = "sat"
    if pipeline:
        body += [f"    reg signed [{r - 1}:0] y_r;", "    always @(posedge clk) y_r <= " + (
            f"{result}[{r - 1}:0];" if result == "acc" else f"{result};"), "    assign y = y_r;"]
    else:
        body.append(f"    assign y = {result}[{r - 1}:0];" if result == "acc" else f"    assign y = {result};")
    body.append("endmodule")
    return "\n".join(head + body) + "\n"

"""`gqa-lut retnet export-c`: the integer RetNet as a self-contained C99 program.

Four files: `tables.h` (the gelu, swish and rsqrt tables exactly as `gqa-lut export` writes
them), `model.h` (every weight a const int8 array, biases int32, the shifts, gamma's fixed
point, the Q14 sine table), `retnet.c` (the recurrent step of reference.py, statement for
statement, and `main`), `README.txt` (how to build and run). libc only; every right shift
of a signed value shifts a value first made non-negative (C99 leaves >> of negatives to the
implementation, and << of negatives undefined: left shifts are multiplications), so UBSan has
nothing to report.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gqa_lut.errors import UsageError
from gqa_lut.evaluator import evaluate_codes
from gqa_lut.export_c import export_c
from gqa_lut.quantization import int_range
from retnet_integration.integer.spec import NORM_FRAC, PHASE_BITS, ROT_FRAC, SIN_ENTRIES, phase_steps, sine_table
from retnet_integration.integer.reference import IntegerModel, IntLinear, IntNorm, accumulator_bounds, linear_bound

CFLAGS = ["-O2", "-std=c99", "-Wall", "-Werror"]
SHIFT_RANGE = (-30, 62)  # what retnet.c's rshift takes: left by at most 30, right by at most 62
VALUE_LIMIT = 2 ** 61  # every value rshift sees stays below this (accumulator_bounds)


def find_cc() -> str:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise UsageError("no C compiler found (looked for cc, gcc, clang on PATH): install one, "
                         "e.g. `apt-get install gcc`")
    return cc


def _arr(ctype: str, name: str, values: np.ndarray) -> str:
    vals = np.asarray(values, dtype=np.int64).reshape(-1)
    body = ",".join(str(int(v)) for v in vals)
    return f"static const {ctype} {name}[{vals.size}] = {{{body}}};"


def _check_range(name: str, values: np.ndarray, lo: int, hi: int) -> None:
    if values.size and (values.min() < lo or values.max() > hi):
        raise UsageError(f"cannot export to C: {name} hold values outside [{lo}, {hi}] "
                         f"({values.min()}..{values.max()})")


def _lin(prefix: str, lin: IntLinear, decls: list[str]) -> str:
    _check_range(prefix + " weights", lin.w, -128, 127)
    _check_range(prefix + " shifts", lin.shift, *SHIFT_RANGE)
    decls.append(_arr("int8_t", f"{prefix}_w", lin.w))
    decls.append(_arr("int8_t", f"{prefix}_sh", lin.shift))
    b = "0"
    if lin.bias is not None:
        _check_range(prefix + " bias", lin.bias, -(2 ** 31), 2 ** 31 - 1)
        decls.append(_arr("int32_t", f"{prefix}_b", lin.bias))
        b = f"{prefix}_b"
    return f"{{{prefix}_w, {prefix}_sh, {b}, {lin.w.shape[0]}, {lin.w.shape[1]}}}"


def _norm(prefix: str, n: IntNorm, decls: list[str]) -> str:
    g = b = "0"
    if n.gain is not None:
        decls.append(_arr("int8_t", f"{prefix}_g", n.gain))
        decls.append(_arr("int32_t", f"{prefix}_b", n.bias))
        g, b = f"{prefix}_g", f"{prefix}_b"
    return f"{{{g}, {b}, {n.eps}, {n.shift}}}"


def _table_call(fn: str, name: str, scales: list[int]) -> str:
    cases = "\n".join(f"    case {i}: return (int64_t){name}_d{d if d >= 0 else f'm{-d}'}(x);"
                      for i, d in enumerate(scales))
    return f"static int64_t {fn}(int layer, int32_t x) {{\n    switch (layer) {{\n{cases}\n    }}\n    return 0;\n}}"


def check_for_c(m: IntegerModel) -> None:
    """What the program's branchless rshift relies on: bounded values and shifts."""
    for r in accumulator_bounds(m):
        if r["bound"] >= VALUE_LIMIT:
            raise UsageError(f"cannot export to C: {r['stage']} may reach {r['bound']}, past the C program's 2^61")
    scalars = [m.embed_shift] + [f for _, f in m.gammas] + [
        v for L in m.layers for v in (L.q_rot_shift, L.k_rot_shift, L.o_shift, L.gate_shift, L.p_shift,
                                      L.gelu_shift, L.ln1.shift, L.ln2.shift, L.gn.shift)] + [m.lnf.shift]
    _check_range("shifts", np.array(scalars), *SHIFT_RANGE)


LUT_DIRECT_BITS = 12  # a table with inputs of at most this many bits is indexed directly (2^bits entries)
INT32_SHIFT_LIMIT = 30  # rshift32 shifts right by at most 30 (2^30 is its offset)


def _fits32(bound: int, shifts: list[int]) -> bool:
    """Whether rshift32 is exact for every |a| <= bound at each shift (its docstring's rule)."""
    for t in shifts:
        if t > 0 and (t > INT32_SHIFT_LIMIT or bound + (1 << (t - 1)) >= 1 << 30):
            return False
        if t <= 0 and (-t > INT32_SHIFT_LIMIT or bound << -t >= 1 << 31):
            return False
    return True


def table_outputs(m: IntegerModel) -> dict[str, np.ndarray]:
    """Every table's output at every input code, per layer (gate, gelu) or once (rsqrt): what
    the library indexes instead of evaluating segments (the reference's evaluate_codes)."""
    def codes(op: str) -> np.ndarray:
        bits = m.tables[op].input_bits
        if bits > LUT_DIRECT_BITS:
            raise UsageError(f"cannot export to C: the {op} table takes {bits}-bit inputs, past the library's "
                             f"direct index of {LUT_DIRECT_BITS} bits")
        lo, hi = int_range(bits)
        return np.arange(lo, hi + 1)
    out = {"gate": np.stack([evaluate_codes(m.tables["swish"], codes("swish"), L.gate_scale) for L in m.layers]),
           "gelu": np.stack([evaluate_codes(m.tables["gelu"], codes("gelu"), L.gelu_scale) for L in m.layers]),
           "rsqrt": evaluate_codes(m.tables["rsqrt"], codes("rsqrt"), m.d_rsqrt)}
    for name, values in out.items():
        _check_range(f"the {name} table's outputs", values, -(2 ** 31), 2 ** 31 - 1)
    return out


def stage_arithmetic(m: IntegerModel, tabs: dict[str, np.ndarray]) -> list[dict]:
    """Each shift-and-saturate stage of the step: the largest |value| it shifts, the shifts it
    uses, and whether int32 holds it (else the library runs it in int64)."""
    a8 = 1 << 7
    lins = [getattr(L, n) for L in m.layers for n in ("q", "k", "v", "g", "o", "up", "down")]
    lin_bound = max(linear_bound(lin) for lin in lins)
    rows = [("EMBED", "embedding code", a8, [m.embed_shift]),
            ("LIN", "linear accumulators", lin_bound, [int(t) for lin in lins for t in lin.shift]),
            ("ROT", "rotary products", 2 * a8 * (1 << ROT_FRAC), [v for L in m.layers for v in (L.q_rot_shift, L.k_rot_shift)]),
            ("GATE", "swish table output", int(np.abs(tabs["gate"]).max()), [L.gate_shift for L in m.layers]),
            ("P", "gate x normed", a8 * a8, [L.p_shift for L in m.layers]),
            ("GELU", "gelu table output", int(np.abs(tabs["gelu"]).max()), [L.gelu_shift for L in m.layers])]
    return [{"macro": k, "stage": what, "bound": b, "shifts": sorted(set(sh)), "int32": _fits32(b, sh)}
            for k, what, b, sh in rows]


def _direct_lookup(name: str, values: np.ndarray, bits: int) -> str:
    qmin = -(1 << (bits - 1))
    if values.ndim == 1:
        return _arr("int32_t", f"{name}_tab", values) + f"\n#define {name.upper()}_AT(x) {name}_tab[(x) - ({qmin})]"
    rows = ",".join("{" + ",".join(str(int(v)) for v in row) + "}" for row in values)
    return (f"static const int32_t {name}_tab[{values.shape[0]}][{values.shape[1]}] = {{{rows}}};\n"
            f"#define {name.upper()}_AT(l, x) {name}_tab[l][(x) - ({qmin})]")


def model_header(m: IntegerModel, tabs: dict[str, np.ndarray] | None = None) -> str:
    check_for_c(m)
    tabs = table_outputs(m) if tabs is None else tabs
    stages = stage_arithmetic(m, tabs)
    decls: list[str] = []
    layers = []
    for i, L in enumerate(m.layers):
        p = f"l{i}"
        fields = [_norm(p + "_ln1", L.ln1, decls)]
        fields += [_lin(f"{p}_{n}", getattr(L, n), decls) for n in ("q", "k", "v", "g", "o")]
        fields += [str(L.q_rot_shift), str(L.k_rot_shift), str(L.o_shift), _norm(p + "_gn", L.gn, decls),
                   str(L.gate_shift), str(L.p_shift), _norm(p + "_ln2", L.ln2, decls), _lin(p + "_up", L.up, decls),
                   str(L.gelu_shift), _lin(p + "_down", L.down, decls)]
        layers.append("{" + ", ".join(fields) + "}")
    lnf = _norm("lnf", m.lnf, decls)
    head = _lin("head", m.head, decls)
    ffn = m.layers[0].up.w.shape[0]
    bounds = "\n".join(f" *   {r['stage']}: |value| <= {r['bound']} ({r['type']})" for r in accumulator_bounds(m))
    arith = []
    for r in stages:
        k = r["macro"]
        i32 = f"#define SRS_{k}(a, t, bits) sat32(rshift32((int32_t)(a), (t)), (bits))"
        i64 = f"#define SRS_{k}(a, t, bits) ((int32_t)sat(rshift((int64_t)(a), (t)), (bits)))"
        arith += [f"/* {r['stage']}: |value| <= {r['bound']}, shifts {r['shifts']}: "
                  f"{'int32' if r['int32'] else 'int64 (int32 cannot hold it)'} */"]
        arith += ([f"#ifdef RETNET_INT64\n{i64}\n#else\n{i32}\n#endif"] if r["int32"] else [i64])
    rsqrt_bits = m.tables["rsqrt"].input_bits
    rq = int_range(rsqrt_bits)
    lookups = [
        "#ifdef RETNET_PIECEWISE",
        _table_call("gate_lut", "lut_swish", [L.gate_scale for L in m.layers]),
        _table_call("gelu_lut", "lut_gelu", [L.gelu_scale for L in m.layers]),
        "#define GATE_LUT(l, x) ((int32_t)gate_lut((l), (x)))",
        "#define GELU_LUT(l, x) ((int32_t)gelu_lut((l), (x)))",
        f"#define RSQRT(v) ((int64_t)lut_rsqrt_d{m.d_rsqrt}((int32_t)sat((v), 32)))",
        "#else  /* every input code's output, precomputed: one load per lookup */",
        _direct_lookup("gate", tabs["gate"], m.tables["swish"].input_bits),
        _direct_lookup("gelu", tabs["gelu"], m.tables["gelu"].input_bits),
        _direct_lookup("rsqrt", tabs["rsqrt"], rsqrt_bits),
        "#define GATE_LUT(l, x) GATE_AT((l), (x))",
        "#define GELU_LUT(l, x) GELU_AT((l), (x))",
        f"#define RSQRT(v) ((int64_t)RSQRT_AT((int32_t)((v) < {rq[0]} ? {rq[0]} : (v) > {rq[1]} ? {rq[1]} : (v))))",
        "#endif",
    ]
    return "\n".join([
        "/* The integer RetNet's numbers, generated by `gqa-lut retnet export-c`. Every value is an",
        " * integer code with a power-of-two scale; the shifts move an accumulator to the next grid.",
        " * Largest |value| per stage (from bit widths and shapes; each fits its type):",
        bounds, " */",
        f"#define D_MODEL {m.d_model}", f"#define N_HEADS {m.n_heads}", f"#define HEAD_DIM {m.head_dim}",
        f"#define N_LAYERS {len(m.layers)}", f"#define FFN {ffn}", f"#define VOCAB {m.vocab}",
        f"#define EMBED_SHIFT {m.embed_shift}", f"#define STATE_FRAC {m.state_frac}", f"#define LOGIT_FRAC {m.logit_frac}",
        f"#define NORM_FRAC {NORM_FRAC}", f"#define ROT_FRAC {ROT_FRAC}", f"#define SIN_ENTRIES {SIN_ENTRIES}",
        f"#define PHASE_SHIFT {PHASE_BITS - int(np.log2(SIN_ENTRIES))}",
        f"#define RSQRT_FRAC {m.tables['rsqrt'].frac_bits + max(m.d_rsqrt, 0)}",
        f"#define GATE_BITS {m.tables['swish'].input_bits}", f"#define GELU_BITS {m.tables['gelu'].input_bits}",
        *arith,
        _arr("int8_t", "embed", m.embed),
        _arr("int64_t", "gamma_g", [g for g, _ in m.gammas]),
        _arr("int8_t", "gamma_f", [f for _, f in m.gammas]),
        _arr("uint32_t", "phase_step", phase_steps(m.head_dim)),
        _arr("int16_t", "sine", sine_table()),
        *decls,
        f"static const Layer layers[N_LAYERS] = {{{', '.join(layers)}}};",
        f"static const Norm lnf = {lnf};",
        f"static const Lin head = {head};",
        *lookups,
        "",
    ])


def api_header(m: IntegerModel) -> str:
    ffn = m.layers[0].up.w.shape[0]
    subs = {"VOCAB": m.vocab, "LOGIT_FRAC": m.logit_frac, "N_LAYERS": len(m.layers), "N_HEADS": m.n_heads,
            "HEAD_DIM": m.head_dim, "D_MODEL": m.d_model, "FFN": ffn, "ACC": max(ffn, m.d_model)}
    text = HEADER
    for k, v in subs.items():
        text = text.replace(f"@{k}@", str(v))
    return text


LIBRARY = r"""/* The quantized RetNet, recurrent form, integers only, as a C99 library: generated by
 * `gqa-lut retnet export-c`. No libc (no stdio, no malloc, no libm): the caller owns the state
 * (retnet.h) and calls retnet_step once per token. Build: cc -O2 -std=c99 -c retnet.c
 * -DRETNET_PIECEWISE evaluates the tables segment by segment (tables.h, the spec's section 3)
 * instead of indexing their precomputed outputs; -DRETNET_INT64 runs every shift in int64 (the
 * arithmetic of the first C program): both give the same integers (tested). */
#include <stdint.h>
#include "retnet.h"
#ifdef RETNET_PIECEWISE
#include "tables.h"
#endif

typedef struct { const int8_t *w; const int8_t *sh; const int32_t *b; int out, in; } Lin;
typedef struct { const int8_t *gain; const int32_t *bias; int64_t eps; int shift; } Norm;
typedef struct {
    Norm ln1; Lin q, k, v, g, o; int q_rot, k_rot, o_shift; Norm gn; int gate_shift, p_shift;
    Norm ln2; Lin up; int gelu_shift; Lin down;
} Layer;

/* floor((a + 2^(t-1)) / 2^t) for t > 0 (round half up), a * 2^-t for t <= 0. Every a here
 * has |a| < 2^61 and every shift lies in [-30, 62] (model.h's bounds, checked at export), so
 * a + 2^(t-1) + 2^62 is non-negative and below 2^63, and 2^62 is a multiple of 2^t: the
 * shift of a non-negative value is exact C99, without a branch. */
static int64_t rshift(int64_t a, int t) {
    const int64_t off = (int64_t)1 << 62;
    if (t <= 0) return a * ((int64_t)1 << -t);
    return ((a + ((int64_t)1 << (t - 1)) + off) >> t) - (off >> t);
}

/* The same in int32, for the stages whose bound allows it (model.h's SRS_* macros, chosen at
 * export): |a| + 2^(t-1) < 2^30 and 0 < t <= 30, or |a| 2^-t < 2^31 for t <= 0. */
static inline int32_t rshift32(int32_t a, int t) {
    const int32_t off = (int32_t)1 << 30;
    if (t <= 0) return a * ((int32_t)1 << -t);
    return ((a + ((int32_t)1 << (t - 1)) + off) >> t) - (off >> t);
}

static int64_t sat(int64_t a, int bits) {
    int64_t hi = ((int64_t)1 << (bits - 1)) - 1, lo = -hi - 1;
    return a < lo ? lo : a > hi ? hi : a;
}

static inline int32_t sat32(int32_t a, int bits) {
    int32_t hi = (int32_t)((1u << (bits - 1)) - 1u), lo = -hi - 1;
    return a < lo ? lo : a > hi ? hi : a;
}

#include "model.h"

static int64_t floordiv(int64_t a, int64_t b) { /* b > 0 */
    int64_t q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

/* integer LayerNorm over n values (GroupNorm: one call per group) -> int8 */
static void norm(const int32_t *x, int n, const Norm *p, int8_t *out) {
    int64_t s = 0, ss = 0;
    for (int i = 0; i < n; i++) s += x[i];
    int64_t mu = floordiv(2 * s + n, 2 * (int64_t)n);
    for (int i = 0; i < n; i++) { int64_t c = x[i] - mu; ss += c * c; }
    int64_t V = floordiv(2 * ss + n, 2 * (int64_t)n) + p->eps;
    int e = 0;
    while ((V >> (e + 1)) != 0) e++;          /* floor(log2 V) */
    int k = e / 2;                             /* V = m 4^k, m in [1, 4) */
    int64_t R = RSQRT(rshift(V, 2 * k - D_RSQRT_SCALE));
    for (int i = 0; i < n; i++) {
        int64_t y = rshift((x[i] - mu) * R, RSQRT_FRAC + k - NORM_FRAC);
        if (p->gain) y = y * p->gain[i] + p->bias[i];
        out[i] = (int8_t)sat(rshift(y, p->shift), 8);
    }
}

/* dot products of compile-time length: gcc vectorizes these at -O2 (measured 2.7x over a
 * runtime-length loop), as its cheap cost model wants a known trip count */
static int32_t dot_d(const int8_t *x, const int8_t *w) {
    int32_t a = 0;
    for (int i = 0; i < D_MODEL; i++) a += (int32_t)x[i] * w[i];
    return a;
}

static int32_t dot_f(const int8_t *x, const int8_t *w) {
    int32_t a = 0;
    for (int i = 0; i < FFN; i++) a += (int32_t)x[i] * w[i];
    return a;
}

static void linear(const int8_t *x, const Lin *L, int32_t *acc) {
    for (int o = 0; o < L->out; o++) {
        const int8_t *w = L->w + (uint32_t)o * (uint32_t)L->in;
        int32_t a = L->in == FFN ? dot_f(x, w) : dot_d(x, w);
        acc[o] = L->b ? a + L->b[o] : a;
    }
}

static void requant(const int32_t *acc, const Lin *L, int bits, int8_t *out) {
    for (int o = 0; o < L->out; o++) out[o] = (int8_t)SRS_LIN(acc[o], L->sh[o], bits);
}

static void rotate(const int8_t *x, const int32_t *cs, const int32_t *sn, int shift, int8_t *out) {
    for (int h = 0; h < N_HEADS; h++)
        for (int j = 0; j < HEAD_DIM / 2; j++) {
            int32_t x1 = x[h * HEAD_DIM + 2 * j], x2 = x[h * HEAD_DIM + 2 * j + 1];
            out[h * HEAD_DIM + 2 * j] = (int8_t)SRS_ROT(x1 * cs[j] - x2 * sn[j], shift, 8);
            out[h * HEAD_DIM + 2 * j + 1] = (int8_t)SRS_ROT(x1 * sn[j] + x2 * cs[j], shift, 8);
        }
}

void retnet_reset(retnet_state *st) {
    int32_t *s = &st->S[0][0][0][0];
    for (uint32_t i = 0; i < (uint32_t)(N_LAYERS * N_HEADS * HEAD_DIM * HEAD_DIM); i++) s[i] = 0;
    st->pos = 0;
}

void retnet_init(retnet_state *st) { retnet_reset(st); }

int retnet_argmax(const int32_t *logits) {
    int best = 0;
    for (int i = 1; i < VOCAB; i++) if (logits[i] > logits[best]) best = i;
    return best;
}

int retnet_step(retnet_state *st, int token, int32_t *logits) {
    if (token < 0 || token >= VOCAB) return -1;
    retnet_work *w = &st->work;
    int32_t *X = w->X, *acc = w->acc, *O = w->O, *cs = w->cs, *sn = w->sn;
    int8_t *A = w->A, *Q0 = w->Q0, *K0 = w->K0, *Q = w->Q, *K = w->K, *V = w->V, *Nrm = w->Nrm, *P = w->P,
        *H = w->H;
    for (int i = 0; i < D_MODEL; i++) X[i] = SRS_EMBED(embed[token * D_MODEL + i], EMBED_SHIFT, 16);
    for (int j = 0; j < HEAD_DIM / 2; j++) {
        uint32_t ph = st->pos * phase_step[j];     /* unsigned: wraps mod 2^32 by definition */
        uint32_t idx = ((ph >> 1) + (1u << (PHASE_SHIFT - 2))) >> (PHASE_SHIFT - 1); /* round(ph / 2^PHASE_SHIFT) */
        idx %= SIN_ENTRIES;
        sn[j] = sine[idx];
        cs[j] = sine[(idx + SIN_ENTRIES / 4) % SIN_ENTRIES];
    }
    for (int l = 0; l < N_LAYERS; l++) {
        const Layer *L = &layers[l];
        norm(X, D_MODEL, &L->ln1, A);
        linear(A, &L->q, acc); requant(acc, &L->q, 8, Q0);
        linear(A, &L->k, acc); requant(acc, &L->k, 8, K0);
        linear(A, &L->v, acc); requant(acc, &L->v, 8, V);
        rotate(Q0, cs, sn, L->q_rot, Q);
        rotate(K0, cs, sn, L->k_rot, K);
        for (int h = 0; h < N_HEADS; h++) {
            const int8_t *q = Q + h * HEAD_DIM, *k = K + h * HEAD_DIM, *v = V + h * HEAD_DIM;
            int32_t (*S)[HEAD_DIM] = st->S[l][h];
            for (int a = 0; a < HEAD_DIM; a++)     /* the bound of G * S needs int64; S itself is int32 */
                for (int b = 0; b < HEAD_DIM; b++)
                    S[a][b] = (int32_t)(rshift(gamma_g[h] * S[a][b], gamma_f[h])
                                        + (int64_t)((int32_t)k[a] * v[b]) * (1 << STATE_FRAC));
            for (int b = 0; b < HEAD_DIM; b++) {
                int64_t o = 0;                      /* Q . S: int64 by its bound */
                for (int a = 0; a < HEAD_DIM; a++) o += (int64_t)q[a] * S[a][b];
                O[h * HEAD_DIM + b] = (int32_t)sat(rshift(o, L->o_shift), 16);
            }
            norm(O + h * HEAD_DIM, HEAD_DIM, &L->gn, Nrm + h * HEAD_DIM);
        }
        linear(A, &L->g, acc);
        for (int i = 0; i < D_MODEL; i++) {
            int32_t t = GATE_LUT(l, SRS_LIN(acc[i], L->g.sh[i], GATE_BITS));
            int32_t g = SRS_GATE(t, L->gate_shift, 8);
            P[i] = (int8_t)SRS_P(g * Nrm[i], L->p_shift, 8);
        }
        linear(P, &L->o, acc);
        for (int i = 0; i < D_MODEL; i++) X[i] = sat32(X[i] + SRS_LIN(acc[i], L->o.sh[i], 16), 16);
        norm(X, D_MODEL, &L->ln2, A);
        linear(A, &L->up, acc);
        for (int i = 0; i < FFN; i++)
            H[i] = (int8_t)SRS_GELU(GELU_LUT(l, SRS_LIN(acc[i], L->up.sh[i], GELU_BITS)), L->gelu_shift, 8);
        linear(H, &L->down, acc);
        for (int i = 0; i < D_MODEL; i++) X[i] = sat32(X[i] + SRS_LIN(acc[i], L->down.sh[i], 16), 16);
    }
    norm(X, D_MODEL, &lnf, A);
    linear(A, &head, logits);
    st->pos++;
    return 0;
}
"""


HEADER = r"""/* The integer RetNet as a library: generated by `gqa-lut retnet export-c`.
 *
 *   static retnet_state st;          caller-owned, static: sizeof(retnet_state) bytes of RAM
 *   static int32_t logits[RETNET_VOCAB];
 *   retnet_init(&st);                once (retnet_reset starts a new sequence)
 *   retnet_step(&st, token, logits); per token: the next token's logits, real value
 *                                    logits[i] * 2^-RETNET_LOGIT_FRAC; 0, or -1 for a token
 *                                    outside [0, RETNET_VOCAB) (the state is then unchanged)
 *   retnet_argmax(logits);           the greedy next token
 *
 * Weights and tables are const arrays in retnet.c (flash); nothing is allocated. One state per
 * stream: two streams are two states (the library has no other mutable data, so it is
 * reentrant). The position wraps after 2^32 tokens, as the rotary phase does. */
#ifndef RETNET_H
#define RETNET_H
#include <stdint.h>

#define RETNET_VOCAB @VOCAB@
#define RETNET_LOGIT_FRAC @LOGIT_FRAC@
#define RETNET_N_LAYERS @N_LAYERS@
#define RETNET_N_HEADS @N_HEADS@
#define RETNET_HEAD_DIM @HEAD_DIM@
#define RETNET_D_MODEL @D_MODEL@
#define RETNET_FFN @FFN@

typedef struct {  /* one step's working arrays: here, not on the stack */
    int32_t X[RETNET_D_MODEL], acc[@ACC@], O[RETNET_D_MODEL], cs[RETNET_HEAD_DIM / 2], sn[RETNET_HEAD_DIM / 2];
    int8_t A[RETNET_D_MODEL], Q0[RETNET_D_MODEL], K0[RETNET_D_MODEL], Q[RETNET_D_MODEL], K[RETNET_D_MODEL],
        V[RETNET_D_MODEL], Nrm[RETNET_D_MODEL], P[RETNET_D_MODEL], H[RETNET_FFN];
} retnet_work;

typedef struct {
    int32_t S[RETNET_N_LAYERS][RETNET_N_HEADS][RETNET_HEAD_DIM][RETNET_HEAD_DIM]; /* O(1) in the length */
    uint32_t pos;
    retnet_work work;
} retnet_state;

void retnet_init(retnet_state *st);
void retnet_reset(retnet_state *st);
int retnet_step(retnet_state *st, int token, int32_t *logits);
int retnet_argmax(const int32_t *logits);

#endif
"""


MAIN = r"""/* An example program on the library: generated by `gqa-lut retnet export-c`.
 * Build: cc -O2 -std=c99 -Wall -Werror -o retnet main.c retnet.c
 * Run:   ./retnet logits < bytes       one line per input byte: the RETNET_VOCAB int32 next-byte
 *                                      logits (their real value is logit * 2^-RETNET_LOGIT_FRAC)
 *        ./retnet generate N < prompt  the prompt's bytes, then N bytes chosen greedily
 * Both print "<tokens> tokens in <seconds> s" on stderr (the steps alone, not the printing). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "retnet.h"

static unsigned char *read_all(size_t *n) {
    size_t cap = 4096;
    unsigned char *buf = malloc(cap);
    *n = 0;
    for (int c; buf && (c = getchar()) != EOF;) {
        if (*n == cap) {
            unsigned char *bigger = realloc(buf, cap *= 2);
            if (!bigger) { free(buf); return NULL; }
            buf = bigger;
        }
        buf[(*n)++] = (unsigned char)c;
    }
    return buf;
}

int main(int argc, char **argv) {
    static retnet_state st;
    static int32_t logits[RETNET_VOCAB];
    long gen = 0;
    int logits_mode = argc == 2 && strcmp(argv[1], "logits") == 0;
    if (!logits_mode) {
        char *end = NULL;
        if (argc == 3 && strcmp(argv[1], "generate") == 0) gen = strtol(argv[2], &end, 10);
        if (argc != 3 || strcmp(argv[1], "generate") != 0 || !end || *end || gen < 0) {
            fprintf(stderr, "usage: %s logits < bytes | %s generate N < prompt (N >= 0)\n", argv[0], argv[0]);
            return 2;
        }
    }
    size_t n = 0;
    unsigned char *in = read_all(&n);
    if (!in) { fprintf(stderr, "out of memory reading stdin\n"); return 1; }
    if (!logits_mode && n == 0) { fprintf(stderr, "generate needs a prompt of at least one byte on stdin\n"); return 2; }
    retnet_init(&st);
    double spent = 0;
    for (size_t t = 0; t < n; t++) {
        clock_t c0 = clock();
        retnet_step(&st, in[t], logits);  /* a byte is always a valid token (RETNET_VOCAB is 256) */
        spent += (double)(clock() - c0) / CLOCKS_PER_SEC;
        if (logits_mode) {
            for (int i = 0; i < RETNET_VOCAB; i++) printf(i ? " %ld" : "%ld", (long)logits[i]);
            putchar('\n');
        }
    }
    for (long t = 0; t < gen; t++) {
        int best = retnet_argmax(logits);
        putchar(best);
        clock_t c0 = clock();
        retnet_step(&st, best, logits);
        spent += (double)(clock() - c0) / CLOCKS_PER_SEC;
    }
    fprintf(stderr, "%ld tokens in %.6f s\n", (long)n + gen, spent);
    free(in);
    return 0;
}
"""


FIRMWARE = r"""/* A bare-metal image for a Cortex-M class target on the library: generated by `gqa-lut retnet
 * export-c`, to measure flash and RAM (arm-none-eabi-size) of a whole deployable image.
 * Build: arm-none-eabi-gcc -mcpu=cortex-m4 -mthumb -O2 -std=c99 --specs=nano.specs
 *        --specs=nosys.specs -ffunction-sections -fdata-sections -Wl,--gc-sections
 *        -o retnet_m4.elf firmware.c retnet.c */
#include "retnet.h"

static retnet_state st;
static int32_t logits[RETNET_VOCAB];
volatile int retnet_last_token;  /* so the compiler keeps the work */

int main(void) {
    retnet_init(&st);
    int token = 'T';
    for (int t = 0; t < 64; t++) {
        retnet_step(&st, token, logits);
        token = retnet_argmax(logits);
    }
    retnet_last_token = token;
    return 0;
}
"""


# what `retnet export-c` writes into its folder (write_program's files, and experiments/commands' model.json)
PROGRAM_FILES = ("tables.h", "model.h", "retnet.h", "retnet.c", "main.c", "firmware.c", "README.txt", "model.json")
SOURCES = ("main.c", "retnet.c")  # the example program: the library and its main


def check_program_folder(out: Path) -> None:
    """Before any work: `out` is a folder, or can be made, and each file in it can be written."""
    from gqa_lut.io import check_name, check_writable
    check_name(out, "--out")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a folder: name a folder for the C program")
    for name in PROGRAM_FILES:
        check_writable(out / name, "--out")


def write_program(m: IntegerModel, out: Path) -> list[Path]:
    """Write the library, its example program and firmware image into `out` (created; an
    existing folder's other files are kept). Every file's text is made first: a model the
    library cannot hold leaves no folder behind."""
    tables = "\n".join(export_c(m.tables[op], f"lut_{op}") for op in ("gelu", "swish", "rsqrt"))
    arm_cm = " ".join(CORTEX_M_FLAGS)
    tabs = table_outputs(m)
    files = {
        "tables.h": tables,
        "model.h": model_header(m, tabs).replace("D_RSQRT_SCALE", str(m.d_rsqrt)),
        "retnet.h": api_header(m),
        "retnet.c": LIBRARY.replace("D_RSQRT_SCALE", str(m.d_rsqrt)),
        "main.c": MAIN,
        "firmware.c": FIRMWARE,
        "README.txt": ("Integer-only RetNet (recurrent form) as a C99 library, generated by gqa-lut retnet export-c.\n"
                       "API: retnet.h (retnet_init, retnet_reset, retnet_step, retnet_argmax over a caller-owned "
                       "retnet_state). Library: retnet.c (no libc).\n"
                       f"Example program: cc {' '.join(CFLAGS)} -o retnet main.c retnet.c\n"
                       "Logits: ./retnet logits < bytes   Generate: ./retnet generate 200 < prompt\n"
                       f"Cortex-M image: arm-none-eabi-gcc {arm_cm} -o retnet_m4.elf firmware.c retnet.c; "
                       "arm-none-eabi-size retnet_m4.elf\n"
                       f"Weights: {m.weights_bytes()} bytes of const data (the library's direct-index tables add "
                       f"{4 * sum(v.size for v in tabs.values())} bytes); state: {m.state_bytes()} "
                       "bytes (independent of the sequence length) plus the step's working arrays in retnet_state.\n"),
    }
    check_program_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {str(out)!r} cannot be created: {exc.strerror}") from None
    from gqa_lut.io import write_text_atomic
    written = []
    for name, text in files.items():
        write_text_atomic(out / name, text)
        written.append(out / name)
    return written


CORTEX_M_FLAGS = ["-mcpu=cortex-m4", "-mthumb", "-O2", "-std=c99", "-Wall", "-Werror", "--specs=nano.specs",
                  "--specs=nosys.specs", "-ffunction-sections", "-fdata-sections", "-Wl,--gc-sections"]


def _compile(cc: str, flags: list[str], sources: list[Path], exe: Path) -> Path:
    import subprocess
    run = subprocess.run([cc, *flags, "-o", str(exe), *map(str, sources)], capture_output=True, text=True)
    if run.returncode != 0:
        first = (run.stderr.strip().splitlines() or ["(no message)"])[0]
        raise UsageError(f"{cc} could not build {exe.name} from {', '.join(p.name for p in sources)}: {first}")
    return exe


def build(out: Path, extra_flags: tuple[str, ...] = (), cc: str | None = None, name: str = "retnet") -> Path:
    """Compile the example program (main.c on the library) with the flags the issue names; a
    failure is a one-line error. `cc` another compiler (a cross compiler: `arm_linux_build`)."""
    return _compile(cc or find_cc(), [*CFLAGS, *extra_flags], [out / f for f in SOURCES], out / name)


def run_logits(cmd: list[str], windows: np.ndarray, vocab: int, on_window: Callable[[], None] | None = None
               ) -> tuple[np.ndarray, float]:
    """The example program `cmd` (main.c: natively, or under qemu-arm) on every window: its
    logits (windows, length, vocab) and the seconds its steps took (what it prints on stderr)."""
    import subprocess
    outs, seconds = [], 0.0
    for w in windows:
        run = subprocess.run([*cmd, "logits"], input=bytes(w.astype(np.uint8)), capture_output=True)
        if run.returncode != 0:
            raise UsageError(f"{cmd[-1]} failed (exit {run.returncode}): {run.stderr.decode(errors='replace')[:200]}")
        outs.append(np.array(run.stdout.split(), dtype=np.int64).reshape(-1, vocab))
        seconds += float(run.stderr.decode().split()[3])
        if on_window is not None:
            on_window()
    return np.stack(outs), seconds


ARM_LINUX_CC = "arm-linux-gnueabihf-gcc"
ARM_NONE_CC = "arm-none-eabi-gcc"


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UsageError(f"{name} not found on PATH: install it (`apt-get install {package}`)")
    return path


def arm_linux_build(out: Path) -> list[str]:
    """The example program for 32-bit ARM Linux, static, and the command that runs it under
    user-mode emulation: what checks the library bit-exact on a 32-bit target."""
    cc = _tool(ARM_LINUX_CC, "gcc-arm-linux-gnueabihf")
    qemu = _tool("qemu-arm", "qemu-user")
    exe = build(out, ("-static",), cc=cc, name="retnet_armhf")
    return [qemu, str(exe)]


def cortex_m_sizes(out: Path) -> dict:
    """Flash and RAM of the Cortex-M4 image (firmware.c on the library, newlib-nano) and of the
    library's object alone, from arm-none-eabi-size: flash = text + data, RAM = data + bss."""
    import subprocess
    cc = _tool(ARM_NONE_CC, "gcc-arm-none-eabi libnewlib-arm-none-eabi")
    size = _tool("arm-none-eabi-size", "binutils-arm-none-eabi")
    elf = _compile(cc, CORTEX_M_FLAGS, [out / "firmware.c", out / "retnet.c"], out / "retnet_m4.elf")
    obj = out / "retnet_m4.o"
    _compile(cc, [f for f in CORTEX_M_FLAGS if not f.startswith(("--specs", "-Wl"))] + ["-c"], [out / "retnet.c"], obj)
    result = {}
    for key, path in (("image", elf), ("library", obj)):
        run = subprocess.run([size, str(path)], capture_output=True, text=True, check=True)
        text, data, bss = (int(v) for v in run.stdout.splitlines()[1].split()[:3])
        result[key] = {"text": text, "data": data, "bss": bss, "flash": text + data, "ram": data + bss}
    result["target"] = "cortex-m4 (thumb), arm-none-eabi-gcc -O2, newlib-nano"
    return result

"""The integer-only RetNet: its numbers (`IntegerModel`, which integer/export.py makes from an `IntSim`) and the
recurrent step in numpy int64, the reference the exported C program must equal bit for bit.

No float touches a value between the input byte and the logits: every step below is an
integer multiply, add, compare, table lookup or `round_shift`. The graph and where each bit
width comes from are in simulation.py; `accumulator_bounds` states the largest |value| every
stage can hold, from the bit widths and the shapes alone, against the type the C program
keeps it in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from gqa_lut.evaluator import evaluate_codes, output_frac_bits
from gqa_lut.quantization import int_range, round_shift
from gqa_lut.table import Table
from retnet_integration.integer.spec import ACT_BITS, NORM_FRAC, RES_BITS, ROT_FRAC, rotary_codes


@dataclass
class IntLinear:
    w: np.ndarray  # (out, in) int8 codes
    shift: np.ndarray  # (out,) round_shift from the accumulator to the next grid (<= 0: left)
    bias: np.ndarray | None = None  # (out,) int32 on the accumulator's grid


@dataclass
class IntNorm:
    eps: int  # in units of the input's 2^(-2 d_in)
    shift: int  # from the normalised (x gain + bias) value to the int8 output
    gain: np.ndarray | None = None  # int8
    bias: np.ndarray | None = None  # int32, NORM_FRAC + gain's fractional bits


@dataclass
class IntLayer:
    ln1: IntNorm
    q: IntLinear
    k: IntLinear
    v: IntLinear
    g: IntLinear
    o: IntLinear
    q_rot_shift: int
    k_rot_shift: int
    o_shift: int  # Q . S (grid d_q + d_k + d_v) -> 16-bit before the GroupNorm
    gn: IntNorm
    gate_scale: int  # the swish table's input scale
    gate_shift: int  # table output -> int8
    p_shift: int  # gate x normed (int16) -> int8
    ln2: IntNorm
    up: IntLinear
    gelu_scale: int
    gelu_shift: int
    down: IntLinear


@dataclass
class IntegerModel:
    d_model: int
    n_heads: int
    vocab: int
    embed: np.ndarray  # (vocab, d_model) int8
    embed_shift: int
    layers: list[IntLayer]
    lnf: IntNorm
    head: IntLinear  # shift 0: the logits are its int32 accumulator
    gammas: list[tuple[int, int]]  # (G_h, f_h)
    state_frac: int  # the state's fractional bits below the k v product grid
    tables: dict[str, Table]
    d_rsqrt: int
    logit_frac: int  # the logits' fractional bits (one scale for every byte)
    exps: dict[str, int] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def weights_bytes(self) -> int:
        """int8 weights + int32 biases and norm biases + int8 gains + int8 shifts + the tables
        (int32 slopes, intercepts, breakpoints of the scales used) + the Q14 sine table."""
        total = self.embed.size
        lins = [self.head] + [getattr(L, n) for L in self.layers for n in ("q", "k", "v", "g", "o", "up", "down")]
        for lin in lins:
            total += lin.w.size + lin.shift.size + (0 if lin.bias is None else 4 * lin.bias.size)
        for n in [self.lnf] + [x for L in self.layers for x in (L.ln1, L.ln2)]:
            total += n.gain.size + 4 * n.bias.size
        for t in self.tables.values():
            total += 4 * (2 * t.segments + (t.segments - 1) * len(t.scales))
        return int(total + 2 * 4096)

    def scratch_bytes(self) -> int:
        """The C step's working arrays (stack) and the logits: RAM beside the state."""
        D, ffn = self.d_model, self.layers[0].up.w.shape[0]
        return 4 * (D + max(D, ffn) + D + self.head_dim) + 8 * D + ffn + 4 * self.vocab

    def state_bytes(self) -> int:
        """int32 state per layer and head (Dk x Dv) and the uint32 position: not the sequence's."""
        return 4 * len(self.layers) * self.n_heads * self.head_dim ** 2 + 4


# --- the recurrent step ---------------------------------------------------------------------------

def sat(a: np.ndarray, bits: int) -> np.ndarray:
    lo, hi = int_range(bits)
    return np.clip(a, lo, hi)


def linear(x: np.ndarray, lin: IntLinear) -> np.ndarray:
    """The int32 accumulator x . W^T (+ b)."""
    acc = x @ lin.w.T
    return acc if lin.bias is None else acc + lin.bias


def bit_length(v: np.ndarray) -> np.ndarray:
    """Bits of each positive int64 (floor(log2 v) + 1), by shifts and compares alone."""
    return (v[..., None] >> np.arange(63, dtype=np.int64) > 0).sum(-1)


def norm(X: np.ndarray, n: IntNorm, rsqrt: Table, d_t: int) -> np.ndarray:
    """Integer LayerNorm over the last axis -> int8 (simulation.py's docstring)."""
    N = X.shape[-1]
    mu = (2 * X.sum(-1, keepdims=True) + N) // (2 * N)  # floor division: round half up
    C = X - mu
    V = (2 * (C * C).sum(-1, keepdims=True) + N) // (2 * N) + n.eps
    k = (bit_length(V) - 1) // 2  # V = m 4^k with m in [1, 4)
    M = round_shift(V, 2 * k - d_t)
    R = evaluate_codes(rsqrt, M, d_t)  # clamps M to the table's input range
    Y = round_shift(C * R, output_frac_bits(rsqrt, d_t) + k - NORM_FRAC)
    if n.gain is not None:
        Y = Y * n.gain + n.bias
    return sat(round_shift(Y, n.shift), ACT_BITS)


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, shift: int) -> np.ndarray:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = sat(round_shift(x1 * cos - x2 * sin, shift), ACT_BITS)
    out[..., 1::2] = sat(round_shift(x1 * sin + x2 * cos, shift), ACT_BITS)
    return out


def table(t: Table, acc: np.ndarray, shift: np.ndarray, d: int, out_shift: int) -> np.ndarray:
    """Accumulator -> the table's input code at scale d -> table -> int8."""
    X = sat(round_shift(acc, shift), t.input_bits)
    return sat(round_shift(evaluate_codes(t, X, d), out_shift), ACT_BITS)


def new_state(m: IntegerModel, batch: int) -> list[np.ndarray]:
    dk = m.head_dim
    return [np.zeros((batch, m.n_heads, dk, dk), dtype=np.int64) for _ in m.layers]


def step(m: IntegerModel, state: list[np.ndarray], tokens: np.ndarray, pos: int) -> np.ndarray:
    """One token for each of B streams: tokens (B,) at position `pos` -> int32 logits (B, vocab).
    `state` (from `new_state`) is updated in place."""
    B, H, dk = tokens.shape[0], m.n_heads, m.head_dim
    rs, d_t = m.tables["rsqrt"], m.d_rsqrt
    X = sat(round_shift(m.embed[tokens], m.embed_shift), RES_BITS)
    cos, sin = rotary_codes(dk, np.array([pos]))
    G = np.array([g for g, _ in m.gammas], dtype=np.int64)[None, :, None, None]
    f = np.array([f for _, f in m.gammas], dtype=np.int64)[None, :, None, None]
    for li, L in enumerate(m.layers):
        A = norm(X, L.ln1, rs, d_t)
        Q0, K0, V = (sat(round_shift(linear(A, lin), lin.shift), ACT_BITS) for lin in (L.q, L.k, L.v))
        Q = rotate(Q0.reshape(B, H, dk), cos, sin, L.q_rot_shift)
        K = rotate(K0.reshape(B, H, dk), cos, sin, L.k_rot_shift)
        V = V.reshape(B, H, dk)
        S = round_shift(G * state[li], f) + ((K[..., :, None] * V[..., None, :]) << m.state_frac)
        state[li] = S
        O = sat(round_shift(np.einsum("bhk,bhkv->bhv", Q, S), L.o_shift), RES_BITS)
        Nrm = norm(O, L.gn, rs, d_t).reshape(B, H * dk)
        gate = table(m.tables["swish"], linear(A, L.g), L.g.shift, L.gate_scale, L.gate_shift)
        P = sat(round_shift(gate * Nrm, L.p_shift), ACT_BITS)
        X = sat(X + sat(round_shift(linear(P, L.o), L.o.shift), RES_BITS), RES_BITS)
        Bn = norm(X, L.ln2, rs, d_t)
        Hd = table(m.tables["gelu"], linear(Bn, L.up), L.up.shift, L.gelu_scale, L.gelu_shift)
        X = sat(X + sat(round_shift(linear(Hd, L.down), L.down.shift), RES_BITS), RES_BITS)
    return linear(norm(X, m.lnf, rs, d_t), m.head)


def run(m: IntegerModel, tokens: np.ndarray) -> np.ndarray:
    """(B, L) byte windows -> (B, L, vocab) int logits, one recurrent step per position."""
    tokens = np.asarray(tokens, dtype=np.int64)
    state = new_state(m, tokens.shape[0])
    return np.stack([step(m, state, tokens[:, t], t) for t in range(tokens.shape[1])], axis=1)


# --- bounds ---------------------------------------------------------------------------------------

def linear_bound(lin: IntLinear) -> int:
    """Largest |x . w + b| of an int8 x int8 linear: in int8 codes times the input width, plus the bias."""
    a8 = 2 ** (ACT_BITS - 1)
    return lin.w.shape[1] * a8 * a8 + (0 if lin.bias is None else int(np.abs(lin.bias).max()))


def accumulator_bounds(m: IntegerModel) -> list[dict]:
    """The largest |value| each stage can reach, from bit widths and shapes alone, with the
    C type that holds it: every bound must lie below its type's limit (tests check it)."""
    a8, r16 = 2 ** (ACT_BITS - 1), 2 ** (RES_BITS - 1)
    D, dk = m.d_model, m.head_dim
    rows = []

    def add(stage, bound, ctype, sim_limit=None):
        """sim_limit: where the fake-quant simulation holds the value in a float type, the
        bound below which that float holds it exactly (2^24 float32, 2^53 float64)."""
        rows.append({"stage": stage, "bound": int(bound), "type": ctype,
                     "limit": 2 ** 31 - 1 if ctype == "int32" else 2 ** 63 - 1, "sim_limit": sim_limit})

    for name in ("q", "k", "v", "g", "o", "up", "down"):
        add(f"linear {name} accumulator", max(linear_bound(getattr(L, name)) for L in m.layers), "int32", 2 ** 24)
    add("logits", linear_bound(m.head), "int32", 2 ** 24)
    add("rotary products (int8 x Q14, two terms)", 2 * a8 * (1 << ROT_FRAC), "int32")
    s_max = 0
    for g, f in m.gammas:
        # |S| <= max|k v| / (1 - gamma) + 1/(1 - gamma) for the rounding of each step's decay
        s_max = max(s_max, math.ceil((a8 * a8 * (1 << m.state_frac) + 1) * (1 << f) / ((1 << f) - g)))
    add("state S", s_max, "int32", 2 ** 53)
    add("decay product G * S", s_max * max(g for g, _ in m.gammas), "int64", 2 ** 53)
    add("Q . S", dk * a8 * s_max, "int64", 2 ** 53)
    rmax = int(max(evaluate_codes(m.tables["rsqrt"], np.arange(*int_range(8)), m.d_rsqrt).max(), 1))
    for name, width in (("layer norm", D), ("group norm", dk)):
        c = 2 * r16  # |X - mean| for 16-bit X
        add(f"{name}: sum of X", width * r16, "int64")
        add(f"{name}: sum of (X - mean)^2", width * c * c, "int64")
        add(f"{name}: (X - mean) * R", c * rmax, "int64")
    gains = [n for n in [m.lnf] + [x for L in m.layers for x in (L.ln1, L.ln2)]]
    ymax = math.isqrt(D) + 1  # |normalised value| <= sqrt(N - 1) (table error aside: 2x margin)
    add("norm gain: Y * gain + bias", max(2 * ymax * (1 << NORM_FRAC) * a8 + int(np.abs(n.bias).max())
                                          for n in gains), "int64")
    add("gate x normed", a8 * a8, "int32")
    add("residual add", 2 * r16, "int32")
    return rows

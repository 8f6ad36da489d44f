"""The integer RetNet's fixed numbers: bit widths, fractional bits, the rotary phase and sine
table, the decay's fixed-point gammas and the state's fractional bits. numpy and gqa_lut only:
the simulation, the numpy reference and the C export all take them from here."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from gqa_lut.evaluator import covering_scale, evaluate_codes, output_frac_bits
from gqa_lut.quantization import int_range
from gqa_lut.table import Table

DECAY_TABLE = Path(__file__).resolve().parents[1] / "tables" / "decay.json"  # the RetNet's own table
NORM_FRAC = 12  # fractional bits of the normalised value inside the norms (|y| <= sqrt(N))
ROT_FRAC = 14  # Q14 sine table
SIN_ENTRIES = 4096  # one period
PHASE_BITS = 32
RES_BITS = 16  # residual stream and the retention output before its GroupNorm
ACT_BITS = 8
LN_EPS = 1e-5


def rsqrt_scale(table: Table) -> int:
    """The table scale of the mantissa m in [1, 4): the finest one that holds 4 - 2^-d."""
    return covering_scale(table, 4.0 - 2.0 ** -max(table.scales))


def gamma_fixed(decay: Table, n_heads: int) -> list[tuple[int, int]]:
    """(G_h, f_h) per head: gamma_h = 1 - 2^(-5-h) through the decay table at x = -ln gamma_h,
    the table's integer output G_h with f_h fractional bits. Computed once, at export."""
    out = []
    for h in range(n_heads):
        lam = -math.log1p(-2.0 ** (-5 - h))
        d = covering_scale(decay, lam)
        lo, hi = int_range(decay.input_bits)
        code = int(np.clip(np.rint(lam * 2.0 ** d), lo, hi))
        g = int(evaluate_codes(decay, np.array([code]), d)[0])
        f = output_frac_bits(decay, d)
        if not 0 < g <= (1 << f):
            raise ValueError(f"decay table gives gamma {g} * 2^-{f} for head {h}: not in (0, 1]")
        out.append((g, f))
    return out


def state_frac_bits(gammas: list[tuple[int, int]], max_bits: int = 8) -> int:
    """The most fractional bits (<= max_bits) the int32 state can keep below the product grid:
    |S| <= (max|k v| 2^sf + 1) / (1 - gamma) must stay below 2^31 for every head."""
    kv = (1 << (ACT_BITS - 1)) ** 2
    for sf in range(max_bits, -1, -1):
        if all(math.ceil((kv * (1 << sf) + 1) * (1 << f) / ((1 << f) - g)) < 2 ** 31 for g, f in gammas):
            return sf
    raise ValueError(f"gammas {gammas}: even without fractional bits the state overflows int32")


def sine_table() -> np.ndarray:
    """SIN_ENTRIES int16 values round(2^14 sin(2 pi i / SIN_ENTRIES)), one period."""
    i = np.arange(SIN_ENTRIES, dtype=np.float64)
    return np.rint(np.sin(2 * np.pi * i / SIN_ENTRIES) * (1 << ROT_FRAC)).astype(np.int64)


def phase_steps(head_dim: int, base: float = 10000.0) -> np.ndarray:
    """P_i = round(theta_i / 2pi * 2^32) per rotary pair: position n's phase is n * P_i mod 2^32."""
    theta = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return np.rint(theta / (2 * np.pi) * 2.0 ** PHASE_BITS).astype(np.int64) % (1 << PHASE_BITS)


def rotary_codes(head_dim: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q14 (cos, sin) codes, (len(positions), head_dim / 2): the phase's top 12 bits, rounded,
    index the sine table; cos is the sine a quarter period on."""
    steps = phase_steps(head_dim)
    pos = np.asarray(positions, dtype=np.int64) % (1 << PHASE_BITS)
    phase = (pos[:, None] * steps[None, :]) % (1 << PHASE_BITS)  # < 2^64: exact in int64
    shift = PHASE_BITS - int(math.log2(SIN_ENTRIES))
    idx = ((phase + (1 << (shift - 1))) >> shift) % SIN_ENTRIES
    table = sine_table()
    return table[(idx + SIN_ENTRIES // 4) % SIN_ENTRIES], table[idx]


def exponent_for(amax: float, bits: int, headroom: int = 0) -> int:
    """The finest power-of-two scale whose `bits`-bit range holds amax (times 2^headroom)."""
    amax = max(float(amax), 2.0 ** -40)
    return int((bits - 1) - math.ceil(math.log2(amax)) - headroom)


def eps_code(d_in: int) -> int:
    """LN_EPS in units of 2^(-2 d_in), the variance's grid; at least 1 so V > 0."""
    return max(1, int(round(LN_EPS * 2.0 ** (2 * d_in))))

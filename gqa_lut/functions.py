"""What a table approximates: the non-linear ops as exact numpy functions, and their defaults.

This is the bottom of the op catalogue: the fitter, the evaluator and the CLI read it, and the
torch side (ops/registry.py) adds one record per op on top. Each op carries what the search needs beyond the function itself: the range a table is
fitted on by default, the scales it supports by default, the inputs on which the function
is defined at all, and what the first and last segment must do. The outer segments extend
to +-infinity (docs/lut-format.md, section 1), so for ops with a known asymptote we pin them to
that asymptote instead of letting the search bend them to the fitted range.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np

from gqa_lut.errors import UsageError

Line = tuple[float, float]  # (slope, intercept) in real units
ArrayFn = Callable[[np.ndarray], np.ndarray]

_erf = np.frompyfunc(math.erf, 1, 1)


def erf(x: np.ndarray) -> np.ndarray:
    """Exact erf without scipy: numpy has none, and the GELU target must not be the tanh form."""
    return np.asarray(_erf(np.asarray(x, dtype=np.float64)), dtype=np.float64)


def gelu(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU's tanh approximation, what nn.GELU(approximate='tanh') and GPT-2's NewGELU compute."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    # Split by sign so that neither branch overflows exp for large |x|.
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def swish(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x * sigmoid(x)


def hswish(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0


def hsigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.clip(x + 3.0, 0.0, 6.0) / 6.0


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)) without overflow: max(x, 0) + log1p(exp(-|x|))."""
    x = np.asarray(x, dtype=np.float64)
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def tanh(x: np.ndarray) -> np.ndarray:
    return np.tanh(np.asarray(x, dtype=np.float64))


def exp(x: np.ndarray) -> np.ndarray:
    return np.exp(np.asarray(x, dtype=np.float64))


def decay(x: np.ndarray) -> np.ndarray:
    """Retention decay gamma^n = exp(-n*|ln gamma|), as a function of x = n*|ln gamma| >= 0."""
    return np.exp(-np.asarray(x, dtype=np.float64))


def rsqrt(x: np.ndarray) -> np.ndarray:
    return 1.0 / np.sqrt(np.asarray(x, dtype=np.float64))


def reciprocal(x: np.ndarray) -> np.ndarray:
    return 1.0 / np.asarray(x, dtype=np.float64)


@dataclass(frozen=True)
class Op:
    """One approximable function and the defaults a table for it is fitted with."""

    name: str
    fn: ArrayFn
    range: tuple[float, float]
    scale_range: tuple[int, int]  # inclusive range of scale exponents d
    domain: tuple[float, float] = (-math.inf, math.inf)
    domain_open: bool = False  # True: the domain excludes its finite end points (x > 0)
    left_tail: Optional[Line] = None  # line of segment 0, pinned to the asymptote
    right_tail: Optional[Line] = None  # line of segment N-1
    description: str = ""
    aliases: tuple[str, ...] = field(default=())

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.fn(x)

    def check_range(self, lo: float, hi: float) -> None:
        """Reject a fitted range the function is not defined on, naming the bound."""
        dlo, dhi = self.domain
        bad_lo = lo <= dlo if self.domain_open else lo < dlo
        bad_hi = hi >= dhi if self.domain_open else hi > dhi
        if bad_lo or bad_hi:
            rel = "x > " if self.domain_open else "x >= "
            if math.isinf(dlo):
                allowed = f"x <= {dhi:g}"
            elif math.isinf(dhi):
                allowed = f"{rel}{dlo:g}"
            else:
                allowed = f"{dlo:g} <= x <= {dhi:g}"
            raise UsageError(
                f"range [{lo:g}, {hi:g}] is outside the domain of {self.name}: allowed {allowed}"
            )


OPS: dict[str, Op] = {}


def register(op: Op) -> Op:
    OPS[op.name] = op
    for alias in op.aliases:
        OPS[alias] = op
    return op


register(Op("gelu", gelu, (-4.0, 4.0), (0, 6), left_tail=(0.0, 0.0), right_tail=(1.0, 0.0),
            description="GELU through erf (not the tanh form); tails -> 0 and -> x"))
register(Op("gelu_tanh", gelu_tanh, (-4.0, 4.0), (0, 6), left_tail=(0.0, 0.0), right_tail=(1.0, 0.0),
            description="GELU's tanh form (nn.GELU(approximate='tanh')); tails -> 0 and -> x"))
register(Op("swish", swish, (-8.0, 8.0), (0, 6), left_tail=(0.0, 0.0), right_tail=(1.0, 0.0),
            description="x*sigmoid(x); tails -> 0 and -> x", aliases=("silu",)))
register(Op("hswish", hswish, (-4.0, 4.0), (0, 6), left_tail=(0.0, 0.0), right_tail=(1.0, 0.0),
            description="x*relu6(x+3)/6; exactly 0 below -3 and x above 3"))
register(Op("hsigmoid", hsigmoid, (-4.0, 4.0), (0, 6), left_tail=(0.0, 0.0), right_tail=(0.0, 1.0),
            description="relu6(x+3)/6; exactly 0 below -3 and 1 above 3", aliases=("hardsigmoid",)))
register(Op("softplus", softplus, (-8.0, 8.0), (0, 6), left_tail=(0.0, 0.0), right_tail=(1.0, 0.0),
            description="log(1+exp(x)); tails -> 0 and -> x (Mamba's step size)"))
register(Op("sigmoid", sigmoid, (-8.0, 8.0), (0, 6), left_tail=(0.0, 0.0), right_tail=(0.0, 1.0),
            description="1/(1+exp(-x)); tails -> 0 and -> 1"))
register(Op("tanh", tanh, (-4.0, 4.0), (0, 6), left_tail=(0.0, -1.0), right_tail=(0.0, 1.0),
            description="tanh(x); tails -> -1 and -> 1"))
register(Op("exp", exp, (-8.0, 0.0), (0, 6), domain=(-math.inf, 0.0), left_tail=(0.0, 0.0),
            description="exp(x) for x <= 0, the softmax numerator after subtracting the max"))
register(Op("decay", decay, (0.0, 8.0), (0, 6), domain=(0.0, math.inf), right_tail=(0.0, 0.0),
            description="exp(-x) for x >= 0: retention decay gamma^n with x = n*|ln gamma|"))
register(Op("rsqrt", rsqrt, (1.0, 4.0), (3, 5), domain=(0.0, math.inf), domain_open=True,
            description="1/sqrt(x) on the mantissa range [1, 4) of var = m*4^k (norms)"))
register(Op("reciprocal", reciprocal, (1.0, 2.0), (4, 6), domain=(0.0, math.inf), domain_open=True,
            description="1/x on the mantissa range [1, 2) of x = m*2^k (softmax denominator)"))


def log(x: np.ndarray) -> np.ndarray:
    return np.log(np.asarray(x, dtype=np.float64))


register(Op("erf", erf, (-4.0, 4.0), (0, 6), left_tail=(0.0, -1.0), right_tail=(0.0, 1.0),
            description="erf(x); tails -> -1 and -> 1 (erfc = 1 - erf)"))
register(Op("log", log, (1.0, 2.0), (4, 6), domain=(0.0, math.inf), domain_open=True,
            description="ln(x) on the mantissa range [1, 2) of x = m*2^k (log, log1p, logsumexp)"))


def op_names() -> list[str]:
    """Registry names, aliases last, for error messages and `gqa-lut ops`."""
    primary = [n for n, op in OPS.items() if op.name == n]
    aliases = [n for n, op in OPS.items() if op.name != n]
    return primary + aliases


def canonical_name(name: str) -> str:
    """The one spelling of an op: aliases (silu) resolve to their op (swish)."""
    return get_op(name).name


def get_op(name: str) -> Op:
    try:
        return OPS[name]
    except KeyError:
        raise UsageError(
            f"unknown op {name!r}: valid ops are {', '.join(op_names())}, or use --expr"
        ) from None


# A user function's name, the <name> of its table's op custom:<name>: it reaches file names and
# C/Verilog identifiers and comments, so nothing else (gqa_lut.table.OP_NAME checks files).
CUSTOM_NAME = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}"


def check_custom_name(name: object) -> str:
    if not isinstance(name, str) or not re.fullmatch(CUSTOM_NAME, name):
        raise UsageError(f"name {name!r} is not allowed: use 1 to 64 letters, digits, - and _ "
                         "(not starting with -)")
    return name


def asymptote(fn: ArrayFn, edge: float, far: float, param_bits: int) -> Optional[Line]:
    """The line a user function follows between its range's edge and the farthest input the
    scales represent, if it follows one: the line through f(far) and f at the midpoint of
    [far, edge] (or of [far, far/2], whichever lies farther out), accepted only where f stays on
    it at four more points between them within 2^-(P+2) of its scale, and where the line's
    slope and intercept fit P-bit parameters. Else None: no line of this table can follow f
    there, and the fit says how far off the table is outside its range."""
    if not far < edge and not far > edge:
        return None
    near = far / 2 if abs(far / 2) > abs(edge) else (far + edge) / 2
    xs = np.array([far, near] + [far + (near - far) * t for t in (0.2, 0.4, 0.6, 0.8)], dtype=np.float64)
    with np.errstate(all="ignore"):
        ys = np.asarray(fn(xs), dtype=np.float64)
    if not np.all(np.isfinite(ys)):
        return None
    k = (ys[1] - ys[0]) / (xs[1] - xs[0])
    b = ys[0] - k * xs[0]
    size = max(1.0, float(np.max(np.abs(ys))))
    if np.max(np.abs(k * xs[2:] + b - ys[2:])) > size * 2.0 ** -(param_bits + 2):
        return None
    limit = 2.0 ** (param_bits - 1) - 1
    if not (abs(k) <= limit and abs(b) <= limit):
        return None
    return float(k), float(b)


def with_estimated_tails(op: Op, lo: float, hi: float, input_bits: int, d0: int, param_bits: int) -> Op:
    """A custom op with the outer segments pinned to the lines its function follows outside
    [lo, hi] (asymptote), on every input the coarsest scale d0 represents: the registry ops pin
    their known asymptotes; a user function without them got lines meant for elsewhere there
    (mish(8) came out -0.59). Registry ops and custom ops with tails are returned unchanged."""
    if not op.name.startswith("custom:") or op.left_tail is not None or op.right_tail is not None:
        return op
    reach = math.ldexp(1 << (input_bits - 1), -d0)
    left = asymptote(op.fn, lo, -reach, param_bits) if -reach < lo else None
    right = asymptote(op.fn, hi, reach - math.ldexp(1, -d0), param_bits) if reach - math.ldexp(1, -d0) > hi else None
    return replace(op, left_tail=left, right_tail=right)


def custom_op(name: str, fn: ArrayFn, lo: float, hi: float,
              scale_range: tuple[int, int] = (0, 6)) -> Op:
    """A user function: no known asymptotes, so both outer segments are fitted freely."""
    check_custom_name(name)
    return Op(f"custom:{name}", fn, (float(lo), float(hi)), scale_range,
              description="user-given function")

"""Hypothesis strategies shared by the evaluator, torch and C tests."""
from hypothesis import assume
from hypothesis import strategies as st

from gqa_lut import bounds
from gqa_lut.errors import UsageError

from gqa_lut.quantization import int_range
from gqa_lut.table import OutputFormat, Table


@st.composite
def random_tables(draw, max_bits: int = 16, output: bool = True):
    pbits = draw(st.integers(2, max_bits))
    qbits = draw(st.integers(2, max_bits))
    n = draw(st.integers(2, 12))
    lo, hi = int_range(pbits)
    slopes = draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    intercepts = draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    scales = draw(st.lists(st.integers(-4, 8), min_size=1, max_size=3, unique=True))
    qlo, qhi = int_range(qbits)
    bps = {d: sorted(draw(st.lists(st.integers(qlo - 4, qhi + 4), min_size=n - 1, max_size=n - 1, unique=True)))
           for d in scales}
    frac = draw(st.integers(0, 12))
    out = draw(st.one_of(st.none(), st.builds(OutputFormat, st.integers(2, 16), st.integers(0, 12)))) if output else None
    return Table(op="gelu", range=(-1.0, 1.0), slopes=slopes, intercepts=intercepts, breakpoints=bps,
                 frac_bits=frac, param_bits=pbits, input_bits=qbits, output=out).validate()


def _edges(lo: int, hi: int, near: tuple[int, int] | None = None):
    """Integers of [lo, hi], often the ends themselves (where overflows live)."""
    parts = [st.sampled_from([lo, hi]), st.integers(lo, hi)]
    if near is not None:
        parts.append(st.integers(max(lo, near[0]), min(hi, near[1])))
    return st.one_of(*parts)


@st.composite
def spec_tables(draw):
    """Any table the loader accepts (lut-format.md sections 5 and 6), extremes drawn often:
    16-bit parameters and inputs, F = 24, scales -24 and 24, int32 breakpoints, 32-bit outputs
    with 48 fractional bits, up to 256 segments."""
    pbits = draw(_edges(*bounds.PARAM_BITS))
    qbits = draw(_edges(*bounds.INPUT_BITS))
    n = draw(st.one_of(st.integers(2, 10), st.sampled_from([bounds.SEGMENTS[1], 64])))
    lo, hi = int_range(pbits)
    slopes = draw(st.lists(_edges(lo, hi), min_size=n, max_size=n))
    intercepts = draw(st.lists(_edges(lo, hi), min_size=n, max_size=n))
    scales = draw(st.lists(_edges(*bounds.SCALE, near=(-4, 8)), min_size=1, max_size=3, unique=True))
    qlo, qhi = int_range(qbits)
    bp = _edges(*bounds.BREAKPOINT, near=(qlo - 4, qhi + 4))
    bps = {d: sorted(draw(st.lists(bp, min_size=n - 1, max_size=n - 1, unique=True))) for d in scales}
    frac = draw(_edges(*bounds.FRAC_BITS))
    out = draw(st.one_of(st.none(), st.builds(OutputFormat, _edges(*bounds.OUTPUT_BITS),
                                              _edges(*bounds.OUTPUT_FRAC_BITS))))
    table = Table(op="gelu", range=(-1.0, 1.0), slopes=slopes, intercepts=intercepts, breakpoints=bps,
                  frac_bits=frac, param_bits=pbits, input_bits=qbits, output=out)
    try:
        return table.validate()
    except UsageError:  # only the output shift bound can fail here: draw again
        assume(False)

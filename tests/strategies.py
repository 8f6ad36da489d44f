"""Hypothesis strategies shared by the evaluator, torch and C tests."""
from hypothesis import strategies as st

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
    out = draw(st.one_of(st.none(), st.builds(OutputFormat, st.integers(2, 16), st.integers(-2, 12)))) if output else None
    return Table(op="gelu", range=(-1.0, 1.0), slopes=slopes, intercepts=intercepts, breakpoints=bps,
                 frac_bits=frac, param_bits=pbits, input_bits=qbits, output=out).validate()

"""The numpy reference evaluator against hand-computed integers and the spec's formula."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gqa_lut.errors import UsageError
from gqa_lut.evaluator import evaluate, evaluate_codes, max_abs_acc, metrics
from gqa_lut.quantization import int_range, round_shift
from gqa_lut.table import OutputFormat, Table
from tests.strategies import random_tables


def small_table(**kw):
    # 3 segments: y = 0 for x <= -1, y = 0.5x + 0.25 on (-1, 2], y = 1 above (F = 2)
    base = dict(op="gelu", range=(-4.0, 4.0), slopes=[0, 2, 0], intercepts=[0, 1, 4],
                breakpoints={0: [-1, 2], 1: [-2, 4], -1: [-1, 1]}, frac_bits=2)
    base.update(kw)
    return Table(**base).validate()


def test_hand_computed_positive_scale():
    t = small_table()
    # d = 1: x = X/2, breakpoints -2, 4 (codes). ACC = K*X + B*2, s = F + 1 = 3.
    codes = np.array([-3, -2, -1, 0, 3, 4, 5])
    acc = evaluate_codes(t, codes, 1)
    assert acc.tolist() == [0, 0, 2 * -1 + 2, 2, 2 * 3 + 2, 2 * 4 + 2, 8]
    assert evaluate(t, codes, 1).tolist() == [0, 0, 0, 0.25, 1.0, 1.25, 1.0]


def test_ties_belong_to_the_left_segment():
    t = small_table()
    # at d = 0 breakpoint -1: X = -1 stays in segment 0 (y = 0), X = 2 stays in segment 1
    assert evaluate(t, np.array([-1, 2, 3]), 0).tolist() == [0.0, 1.25, 1.0]


def test_negative_scale():
    t = small_table()
    # d = -1: x = 2X, breakpoints -1, 1, ACC = K*X*2 + B, s = F = 2.
    # X = 1 ties with breakpoint 1, so it stays in segment 1: 2*1*2 + 1 = 5.
    codes = np.array([-1, 0, 1, 2])
    assert evaluate_codes(t, codes, -1).tolist() == [0, 1, 5, 4]
    assert evaluate(t, codes, -1).tolist() == [0.0, 0.25, 1.25, 1.0]


def test_output_quantization_rounds_half_up_and_saturates():
    t = small_table(output=OutputFormat(bits=3, frac_bits=1))
    # d = 1, ACC frac bits 3 -> output frac bits 1: shift by 2, round half up, clamp to [-4, 3]
    assert round_shift(np.array([2, 6, -2, -6, 5]), 2).tolist() == [1, 2, 0, -1, 1]
    codes = np.array([0, 3, 4, 5])  # ACC 2, 8, 10, 8 -> 1, 2, 3 (2.5 rounds up), 2
    assert evaluate_codes(t, codes, 1).tolist() == [1, 2, 3, 2]
    t2 = small_table(slopes=[0, 2, 0], intercepts=[0, 1, 127], param_bits=8,
                     output=OutputFormat(bits=3, frac_bits=1))
    assert evaluate_codes(t2, np.array([100]), 0).tolist() == [3]  # 127/4 = 31.75 saturates at 3


def test_inputs_outside_the_q_range_are_clamped():
    t = small_table()
    assert evaluate_codes(t, np.array([1000]), 0).tolist() == evaluate_codes(t, np.array([127]), 0).tolist()


def test_unknown_scale_is_a_clear_error():
    with pytest.raises(UsageError, match="scale 9 is not in the table"):
        evaluate(small_table(), np.array([0]), 9)


def test_metrics_of_an_exact_table_are_zero():
    # y = x is represented exactly on every grid
    t = Table(op="custom:id", range=(-2.0, 2.0), slopes=[64, 64], intercepts=[0, 0],
              breakpoints={0: [0], 3: [0]}, frac_bits=6).validate()
    m = metrics(t, lambda x: x)
    assert m["mse"] == 0 and m["max_abs_err"] == 0 and m["dense_mse"] == 0
    assert set(m["mse_per_scale"]) == {"0", "3"}


@settings(max_examples=200, deadline=None)
@given(random_tables(), st.data())
def test_evaluator_equals_the_spec_formula(table, data):
    d = data.draw(st.sampled_from(table.scales))
    qlo, qhi = int_range(table.input_bits)
    codes = np.array(data.draw(st.lists(st.integers(qlo, qhi), min_size=1, max_size=50)), dtype=np.int64)
    got = evaluate_codes(table, codes, d)
    for X, y in zip(codes.tolist(), got.tolist()):
        i = sum(1 for p in table.breakpoints[d].tolist() if p < X)  # spec: count of P_j < X
        K, B = int(table.slopes[i]), int(table.intercepts[i])
        acc = K * X + B * 2 ** d if d >= 0 else K * X * 2 ** (-d) + B
        if table.output is not None:
            t = table.frac_bits + max(d, 0) - table.output.frac_bits
            r = (acc + 2 ** (t - 1)) // 2 ** t if t > 0 else acc * 2 ** (-t)
            lo, hi = int_range(table.output.bits)
            acc = min(max(r, lo), hi)
        assert y == acc
        assert table.output is not None or abs(acc) <= max_abs_acc(table)


@settings(max_examples=100, deadline=None)
@given(random_tables())
def test_accumulator_bound_holds_for_every_input(table):
    qlo, qhi = int_range(table.input_bits)
    codes = np.arange(qlo, qhi + 1)
    bound = max_abs_acc(table)
    t = table.with_(output=None)
    for d in t.scales:
        assert np.max(np.abs(evaluate_codes(t, codes, d))) <= bound
    if table.param_bits <= 8 and table.input_bits <= 8 and max(abs(d) for d in t.scales) <= 8:
        assert bound < 2 ** 31  # int32 holds it, as runtimes for P = Q = 8 assume

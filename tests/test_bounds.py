"""Every table the loader accepts is evaluated identically by every runtime, extremes included:
numpy (the reference), torch on the CPU (and CUDA where there is one), and the exported C
compiled with UBSan trapping, on every input code of every scale (lut-format.md section 6)."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings

from gqa_lut import bounds
from gqa_lut.evaluator import evaluate_codes, runtime_bits
from gqa_lut.table import OutputFormat, Table
from ops.kernels.reference import lut_int
from tests.c_harness import CC, c_codes, c_outputs
from tests.strategies import spec_tables



def _extreme(output=None, d=(-24, 24), frac=24, bp=(-(1 << 31), (1 << 31) - 1)) -> Table:
    return Table(op="gelu", range=(-1.0, 1.0), slopes=[-(1 << 15), (1 << 15) - 1, 7],
                 intercepts=[(1 << 15) - 1, -(1 << 15), -3], breakpoints={x: [bp[0], bp[1]] for x in d},
                 frac_bits=frac, param_bits=16, input_bits=16, output=output).validate()


EXTREMES = [
    _extreme(),
    _extreme(OutputFormat(32, 7), d=(-24,), frac=0),           # |ACC| ~ 2^54 shifted to ~2^61
    Table(op="gelu", range=(-1.0, 1.0), slopes=[-2, 1], intercepts=[1, -2], breakpoints={0: [0]},
          frac_bits=0, param_bits=2, input_bits=2, output=OutputFormat(32, 48)).validate(),  # e = 48
    _extreme(OutputFormat(32, 0), d=(24,), frac=24),           # the largest right shift (t = 48)
    _extreme(OutputFormat(2, 0), d=(0, 7), frac=24),
    Table(op="gelu", range=(-1.0, 1.0), slopes=[5, -3], intercepts=[1, 2], breakpoints={0: [5]},
          frac_bits=0, param_bits=8, input_bits=8, output=OutputFormat(8, 24)).validate(),  # t = -24
]


def check_runtimes(table: Table, folder) -> None:
    codes = c_codes(table)
    ref = {d: evaluate_codes(table, codes, d) for d in table.scales}
    for d in table.scales:
        assert np.array_equal(lut_int(torch.tensor(codes), table, d).numpy(), ref[d])
        if torch.cuda.is_available():
            assert np.array_equal(lut_int(torch.tensor(codes, device="cuda"), table, d).cpu().numpy(), ref[d])
    if CC is not None:
        c = c_outputs(table, folder)
        assert all(np.array_equal(c[d], ref[d]) for d in table.scales)


@pytest.mark.parametrize("table", EXTREMES, ids=range(len(EXTREMES)))
def test_extreme_tables_agree_everywhere(table, tmp_path):
    check_runtimes(table, tmp_path)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(spec_tables())
@example(EXTREMES[0])
def test_any_valid_table_agrees_everywhere(tmp_path, table):
    check_runtimes(table, tmp_path)


def test_runtime_width_follows_the_bound():
    t8 = Table(op="gelu", range=(-1.0, 1.0), slopes=[-128, 127], intercepts=[127, -128], breakpoints={6: [0]},
               frac_bits=6).validate()
    assert runtime_bits(t8) == 32  # every 8-bit table at d <= 8 stays in int32
    assert runtime_bits(EXTREMES[0]) == 64
    assert runtime_bits(EXTREMES[5]) == 64  # ACC is small, ACC * 2^24 is not
    assert lut_int(torch.tensor([0]), EXTREMES[5], 0).dtype == torch.int64
    acc = bounds.acc_bound(EXTREMES[0].slopes, EXTREMES[0].intercepts, 16, -24)
    assert acc == (1 << 15) * (1 << 15) * (1 << 24) + (1 << 15)  # max |K| * max |X| * 2^24 + max |B|

"""The exported C header, compiled by the system compiler, equals the numpy evaluator on every
input of every scale."""
import pytest
from hypothesis import HealthCheck, given, settings

from gqa_lut.evaluator import evaluate_codes
from ops.tables import TABLE_DIR, default_table
from tests.c_harness import CC, c_codes, c_outputs
from tests.strategies import random_tables, spec_tables

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler")


def expected(table) -> dict[int, list[int]]:
    return {d: evaluate_codes(table, c_codes(table), d).tolist() for d in table.scales}


def as_lists(outputs: dict) -> dict[int, list[int]]:
    return {d: v.tolist() for d, v in outputs.items()}


@pytest.mark.parametrize("op", sorted(p.stem for p in TABLE_DIR.glob("*.json")))
def test_shipped_tables_bit_exact_in_c(op, tmp_path):
    t = default_table(op)
    assert as_lists(c_outputs(t, tmp_path)) == expected(t)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(random_tables(max_bits=12))
def test_random_tables_bit_exact_in_c(tmp_path, table):
    assert as_lists(c_outputs(table, tmp_path)) == expected(table)


def test_export_cli(tmp_path):
    from gqa_lut.cli import main
    assert main(["export", str(TABLE_DIR / "gelu.json"), "--c", str(tmp_path / "gelu.h")]) == 0
    assert "static inline int32_t lut_gelu_d0(int32_t x)" in (tmp_path / "gelu.h").read_text()
    assert main(["export", str(TABLE_DIR / "gelu.json"), "--c", str(tmp_path / "gelu.txt")]) == 2
    assert not (tmp_path / "gelu.txt").exists()


def test_all_zero_table_with_a_wide_left_shift_is_defined_c(tmp_path):
    """ACC is always 0, but the output shift 2^48 must still be formed in a type that holds it
    (it was `(int32_t)1 << 48`: a -Werror build failed and UBSan trapped)."""
    from gqa_lut.table import OutputFormat, Table
    t = Table(op="gelu", range=(-1.0, 1.0), slopes=[0, 0], intercepts=[0, 0], breakpoints={0: [0], -3: [1]},
              frac_bits=0, param_bits=8, input_bits=8, output=OutputFormat(32, 48)).validate()
    assert as_lists(c_outputs(t, tmp_path)) == expected(t)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(spec_tables())
def test_tables_at_the_spec_bounds_compile_cleanly_and_bit_exact(tmp_path, table):
    """-Wall -Wextra -Werror -pedantic -fsanitize=undefined -fno-sanitize-recover (c_harness) on
    tables drawn near every bound of lut-format.md section 6: every shift, constant and
    intermediate of the header is defined, and the outputs equal the numpy evaluator's."""
    assert as_lists(c_outputs(table, tmp_path)) == expected(table)

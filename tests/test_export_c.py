"""The exported C header, compiled by the system compiler, equals the numpy evaluator on every
input of every scale."""
import pytest
from hypothesis import HealthCheck, given, settings

from gqa_lut.evaluator import evaluate_codes
from ops.tables import TABLE_DIR, default_table
from tests.c_harness import CC, c_codes, c_outputs
from tests.strategies import random_tables

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

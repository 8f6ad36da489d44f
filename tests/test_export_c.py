"""The exported C header, compiled by the system compiler, equals the numpy evaluator on every
input of every scale."""
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from gqa_lut.evaluator import evaluate_codes
from gqa_lut.export_c import export_c
from gqa_lut.quantization import int_range
from ops.tables import TABLE_DIR, default_table
from tests.strategies import random_tables

CC = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler")


def c_outputs(table, tmp_path) -> dict[int, list[int]]:
    header = tmp_path / "t.h"
    header.write_text(export_c(table, "t"))
    qmin, qmax = int_range(table.input_bits)
    calls = "\n".join(
        f'  for (long x = {qmin - 3}; x <= {qmax + 3}; x++) printf("%lld\\n", (long long)t_d{d if d >= 0 else f"m{-d}"}((int32_t)x));'
        for d in table.scales)
    (tmp_path / "main.c").write_text(f'#include <stdio.h>\n#include "t.h"\nint main(void) {{\n{calls}\n  return 0;\n}}\n')
    exe = tmp_path / "main"
    subprocess.run([CC, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-o", str(exe),
                    str(tmp_path / "main.c")], check=True, capture_output=True)
    vals = [int(v) for v in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()]
    n = qmax - qmin + 7
    return {d: vals[i * n:(i + 1) * n] for i, d in enumerate(table.scales)}


def expected(table) -> dict[int, list[int]]:
    qmin, qmax = int_range(table.input_bits)
    codes = np.arange(qmin - 3, qmax + 4)
    return {d: evaluate_codes(table, codes, d).tolist() for d in table.scales}


@pytest.mark.parametrize("op", sorted(p.stem for p in TABLE_DIR.glob("*.json")))
def test_shipped_tables_bit_exact_in_c(op, tmp_path):
    t = default_table(op)
    assert c_outputs(t, tmp_path) == expected(t)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(random_tables(max_bits=12))
def test_random_tables_bit_exact_in_c(tmp_path, table):
    assert c_outputs(table, tmp_path) == expected(table)


def test_export_cli(tmp_path):
    from gqa_lut.cli import main
    assert main(["export", str(TABLE_DIR / "gelu.json"), "--c", str(tmp_path / "gelu.h")]) == 0
    assert "static inline int32_t lut_gelu_d0(int32_t x)" in (tmp_path / "gelu.h").read_text()
    assert main(["export", str(TABLE_DIR / "gelu.json"), "--c", str(tmp_path / "gelu.txt")]) == 2
    assert not (tmp_path / "gelu.txt").exists()

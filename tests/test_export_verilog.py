"""The exported Verilog, simulated by Icarus Verilog and by Verilator, equals the numpy evaluator
on every (scale, code) pair: every shipped table and random valid tables (near the spec's bounds
too), combinational and pipelined."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gqa_lut.cli import main
from gqa_lut.errors import UsageError
from gqa_lut.evaluator import evaluate_codes
from gqa_lut.export_verilog import export_verilog
from gqa_lut.quantization import int_range
from ops.tables import TABLE_DIR, default_table
from retnet_integration.integer.spec import DECAY_TABLE
from gqa_lut.table import load_table
from tests.strategies import random_tables, spec_tables
from tests.verilog_harness import IVERILOG, VERILATOR, iverilog_outputs, verilator_outputs

needs_iverilog = pytest.mark.skipif(not IVERILOG, reason="apt-get install iverilog (.ci/run does)")
needs_verilator = pytest.mark.skipif(not VERILATOR, reason="apt-get install verilator (.ci/run does)")
# one simulator build checks a batch of tables: few examples, each slow (health checks off)
BATCHES = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))
SHIPPED = [default_table(p.stem) for p in sorted(TABLE_DIR.glob("*.json"))] + [load_table(DECAY_TABLE)]


def _check(tables, outputs):
    for t, got in zip(tables, outputs):
        qmin, qmax = int_range(t.input_bits)
        codes = np.arange(qmin, qmax + 1)
        for d in t.scales:
            assert got[d].tolist() == evaluate_codes(t, codes, d).tolist(), (t.op, d)


@needs_iverilog
@pytest.mark.parametrize("pipeline", [False, True])
def test_shipped_tables_in_icarus(tmp_path, pipeline):
    _check(SHIPPED, iverilog_outputs(SHIPPED, tmp_path, pipeline))


@needs_verilator
@pytest.mark.slow
@pytest.mark.parametrize("pipeline", [False, True])
def test_shipped_tables_in_verilator(tmp_path, pipeline):
    _check(SHIPPED, verilator_outputs(SHIPPED, tmp_path, pipeline))


@needs_iverilog
@settings(max_examples=5, **BATCHES)
@given(st.lists(random_tables(max_bits=10), min_size=20, max_size=20), st.booleans())
def test_random_tables_in_icarus(tmp_path_factory, tables, pipeline):
    folder = tmp_path_factory.mktemp("iv")
    _check(tables, iverilog_outputs(tables, folder, pipeline))


@needs_iverilog
@settings(max_examples=4, **BATCHES)
@given(st.lists(spec_tables(), min_size=3, max_size=3))
def test_tables_at_the_spec_bounds_in_icarus(tmp_path_factory, tables):
    """16-bit codes and parameters, F = 24, scales -24 and 24, 256 segments, 32-bit outputs."""
    folder = tmp_path_factory.mktemp("ivb")
    _check(tables, iverilog_outputs(tables, folder))


@needs_verilator
@pytest.mark.slow
@settings(max_examples=2, **BATCHES)
@given(st.lists(random_tables(max_bits=10), min_size=30, max_size=30), st.booleans())
def test_random_tables_in_verilator(tmp_path_factory, tables, pipeline):
    folder = tmp_path_factory.mktemp("vl")
    _check(tables, verilator_outputs(tables, folder, pipeline))


def test_header_states_latency_and_names_are_checked():
    t = default_table("gelu")
    assert "Latency: 0 clock cycles" in export_verilog(t)
    assert "Latency: 2 clock cycles" in export_verilog(t, pipeline=True)
    assert export_verilog(t).count("module lut_gelu (") == 1
    for bad in ("module", "1x", "a b", "x*/y", "a" * 200):
        with pytest.raises(UsageError, match="not a Verilog identifier"):
            export_verilog(t, bad)


def test_export_cli_writes_verilog_and_refuses_bad_options(tmp_path, capsys):
    gelu = str(TABLE_DIR / "gelu.json")
    assert main(["export", gelu, "--verilog", str(tmp_path / "g.v"), "--top", "gelu_pwl", "--pipeline"]) == 0
    assert "module gelu_pwl (" in (tmp_path / "g.v").read_text()
    assert main(["export", gelu, "--verilog", str(tmp_path / "g.v"), "--c", str(tmp_path / "g.h")]) == 0
    for argv in (["export", gelu], ["export", gelu, "--verilog", str(tmp_path / "x.txt")],
                 ["export", gelu, "--c", str(tmp_path / "y.h"), "--top", "t"],
                 ["export", gelu, "--verilog", str(tmp_path / "z.v"), "--top", "wire"]):
        assert main(argv) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert not any((tmp_path / n).exists() for n in ("x.txt", "y.h", "z.v"))

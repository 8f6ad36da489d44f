"""Every table shipped in the package refits from its own file (`gqa-lut refit`), on any CPU:
integers exactly, floats (metrics, history) within gqa_lut.table.FLOAT_REL_TOL."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gqa_lut.refit import refit
from gqa_lut.table import differences, load_table, table_from_json
from ops.tables import TABLE_DIR
from retnet_integration.integer.spec import DECAY_TABLE

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(TABLE_DIR.glob("*.json")) + [DECAY_TABLE]


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=[f"{p.parent.parent.name}/{p.stem}" for p in SHIPPED])
def test_shipped_table_refits_from_its_file(path):
    table = load_table(path)
    assert table.search["config"]["seed"] == 0  # the request is recorded, not only what ran
    assert differences(table.to_json(), refit(table).to_json()) == []


REFIT_IN_CHILD = """
import json, sys
from gqa_lut.refit import refit
from gqa_lut.table import load_table
print(json.dumps([refit(load_table(p)).to_json() for p in sys.argv[1:]]))
"""


@pytest.mark.slow
def test_same_integer_tables_with_avx512_disabled():
    """numpy's vectorised exp differs in the last ulp with and without AVX-512; the search must
    not. A child process refits with those CPU features off (a no-op on CPUs without them)."""
    paths = [TABLE_DIR / "exp.json", DECAY_TABLE]
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": "AVX512_ICL AVX512_SPR X86_V4", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", REFIT_IN_CHILD, *map(str, paths)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    for path, doc in zip(paths, json.loads(r.stdout)):
        shipped = load_table(path)
        for key in ("slopes", "intercepts", "breakpoints", "frac_bits"):
            assert doc[key] == shipped.to_json()[key], (path, key)
        assert differences(shipped.to_json(), table_from_json(doc).to_json()) == [], path


@pytest.mark.slow
def test_refit_cli_checks_rewrites_and_refuses(tmp_path):
    from gqa_lut.cli import main

    path = tmp_path / "g.json"
    assert main(["fit", "--op", "gelu", "--segments", "4", "--generations", "2", "--quiet", "--out", str(path)]) == 0
    assert main(["refit", str(path), "--check"]) == 0
    doc = json.loads(path.read_text())
    doc["slopes"][1] += 1  # a table that is not what its request gives
    path.write_text(json.dumps(doc))
    assert main(["refit", str(path), "--check"]) == 1
    assert main(["refit", str(path)]) == 0 and main(["refit", str(path), "--check"]) == 0
    doc = json.loads(path.read_text())
    del doc["search"]["config"]
    path.write_text(json.dumps(doc))
    assert main(["refit", str(path)]) == 2  # nothing recorded to refit from: one-line error


@pytest.mark.slow
def test_weighted_table_needs_its_weights(tmp_path):
    import numpy as np

    from gqa_lut.cli import main

    np.save(tmp_path / "w.npy", np.random.default_rng(1).normal(0, 1, 2000))
    np.save(tmp_path / "other.npy", np.random.default_rng(2).normal(0, 1, 2000))
    path = tmp_path / "w.json"
    assert main(["fit", "--op", "gelu", "--segments", "4", "--generations", "2", "--quiet", "--weights",
                 str(tmp_path / "w.npy"), "--out", str(path)]) == 0
    assert main(["refit", str(path), "--check"]) == 2
    assert main(["refit", str(path), "--check", "--weights", str(tmp_path / "other.npy")]) == 2
    assert main(["refit", str(path), "--check", "--weights", str(tmp_path / "w.npy")]) == 0


@pytest.mark.slow
def test_custom_expression_table_refits(tmp_path):
    from gqa_lut.cli import main

    path = tmp_path / "mish.json"
    assert main(["fit", "--expr", "x*tanh(log1p(exp(x)))", "--name", "mish", "--segments", "4",
                 "--generations", "2", "--quiet", "--out", str(path)]) == 0
    assert main(["refit", str(path), "--check"]) == 0


OUTSIDE_TOL = 0.0025  # largest |error| on a seen out-of-range code among the shipped tables
OUTSIDE_EXCEPTIONS = {("tanh", 0)}  # its last line at d = 0 is 0.94 + x/64 (docs/search.md: "Outside the range")
RANGE_REDUCED = {"rsqrt", "reciprocal", "log"}  # their drop-ins only ever feed mantissas inside the range


FOLLOWING = [p for p in SHIPPED if p.stem not in RANGE_REDUCED]


@pytest.mark.parametrize("path", FOLLOWING, ids=[f"{p.parent.parent.name}/{p.stem}" for p in FOLLOWING])
def test_shipped_tables_follow_the_function_outside_their_range(path):
    """Codes beyond the fitted range that the hardware still sees (softmax feeds exp anything
    <= 0) stay on lines that follow the function; unused segments park beyond the Q-bit range."""
    import numpy as np

    from gqa_lut.evaluator import evaluate
    from gqa_lut.functions import get_op

    table = load_table(path)
    op = get_op(table.op)
    codes = np.arange(-(1 << (table.input_bits - 1)), 1 << (table.input_bits - 1))
    for d in table.scales:
        x = np.ldexp(codes.astype(np.float64), -d)
        with np.errstate(all="ignore"):
            f = op.fn(x)
        seen = ((x < table.range[0]) | (x > table.range[1])) & np.isfinite(f)
        if op.domain is not None:
            seen &= (x >= op.domain[0]) & (x <= op.domain[1])
        if not seen.any() or (table.op, d) in OUTSIDE_EXCEPTIONS:
            continue
        err = np.abs(evaluate(table, codes, d) - f)[seen]
        assert err.max() <= OUTSIDE_TOL, (table.op, d, float(err.max()))

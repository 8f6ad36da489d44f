"""The tables shipped in the package are what their scripts fit, on any CPU: integers exactly,
floats (metrics, history) within gqa_lut.table.FLOAT_REL_TOL."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gqa_lut.table import load_table
from ops.make_default_tables import fit_default, mismatch
from ops.tables import default_table

ROOT = Path(__file__).resolve().parents[1]
INTEGER_KEYS = ("slopes", "intercepts", "breakpoints", "frac_bits", "param_bits", "input_bits", "output")


@pytest.mark.parametrize("op", ["gelu", "rsqrt"])
def test_default_table_reproduces(op):
    assert mismatch(default_table(op), fit_default(op)) == []


def test_retnet_decay_table_reproduces():
    from gqa_lut.search import fit
    from retnet_integration.make_tables import CONFIG
    from retnet_integration.quantize import DECAY_TABLE
    assert mismatch(load_table(DECAY_TABLE), fit("decay", CONFIG)) == []


FIT_IN_CHILD = """
import json, sys
from gqa_lut.search import fit
from ops.make_default_tables import fit_default
from retnet_integration.make_tables import CONFIG
print(json.dumps({"exp": fit_default("exp").to_json(), "decay": fit("decay", CONFIG).to_json()}))
"""


def test_same_integer_tables_with_avx512_disabled():
    """numpy's vectorised exp differs in the last ulp with and without AVX-512; the search must
    not. A child process refits with those CPU features off (a no-op on CPUs without them)."""
    from retnet_integration.quantize import DECAY_TABLE

    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": "AVX512_ICL AVX512_SPR X86_V4", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", FIT_IN_CHILD], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    child = json.loads(r.stdout)
    for name, shipped in (("exp", default_table("exp")), ("decay", load_table(DECAY_TABLE))):
        doc = shipped.to_json()
        assert {k: child[name][k] for k in INTEGER_KEYS} == {k: doc[k] for k in INTEGER_KEYS}, name
        assert mismatch(shipped, load_table_doc(child[name])) == [], name


def load_table_doc(doc):
    from gqa_lut.table import table_from_json
    return table_from_json(doc)

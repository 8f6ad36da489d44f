"""The published GQA-LUT tables: read, measured by our evaluator, converted to our format."""
import json

import numpy as np
import pytest

from gqa_lut.errors import UsageError
from gqa_lut.evaluator import metrics, raw_metrics
from gqa_lut.reference import convert_reference, read_reference
from gqa_lut.functions import get_op

CASES = [("gelu_pwl_7", "gelu", (-4, 4)), ("gelu_pwl_15", "gelu", (-4, 4)),
         ("hswish_pwl_7", "hswish", (-4, 4)), ("hswish_pwl_15", "hswish", (-4, 4)),
         ("exp_pwl_7", "exp", (-8, 0)), ("exp_pwl_15", "exp", (-8, 0))]


@pytest.mark.parametrize("name,op,rng", CASES)
def test_import_round_trip(reference_dir, name, op, rng):
    ref = read_reference(reference_dir / f"{name}.json")
    assert ref.slopes.shape[0] in (8, 16) and sorted(ref.breakpoints) == list(range(7))
    table, changes = convert_reference(ref, *rng)
    table.validate()
    assert table.slopes.tolist() == ref.slopes.tolist()
    published = raw_metrics(ref.slopes, ref.intercepts, ref.breakpoints, 6, rng, 8, get_op(op).fn)
    ours = metrics(table, get_op(op).fn)
    assert 1e-6 < published["mse"] < 1e-2
    for d, bp in ref.breakpoints.items():
        if np.all(np.diff(bp) > 0):  # nothing to fix at this scale: exactly the same breakpoints
            assert table.breakpoints[d].tolist() == bp.tolist() and changes[str(d)] == 0
    if sum(changes.values()) == 0:
        assert ours["mse"] == published["mse"]


def test_lossless_table_measures_the_same(reference_dir):
    ref = read_reference(reference_dir / "hswish_pwl_7.json")
    table, changes = convert_reference(ref, -4, 4)
    assert sum(changes.values()) == 0
    assert metrics(table, get_op("hswish").fn)["mse"] == pytest.approx(4.377e-4, rel=1e-3)


def test_bad_reference_files(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"gelu": {"0": {"breakpoints": [0.3], "slopes": [0, 1], "intercepts": [0, 0]}}}))
    with pytest.raises(UsageError, match="not on the 2\\^-0 grid"):
        read_reference(p)
    with pytest.raises(UsageError, match="has no op 'exp'"):
        read_reference(p, "exp")
    p.write_text("[]")
    with pytest.raises(UsageError, match="expected an object"):
        read_reference(p)

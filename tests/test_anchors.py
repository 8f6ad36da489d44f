"""The deterministic anchors: the pwlf+LSB baseline and our search on a small configuration,
and the anchors benchmark end to end on one row."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.baselines import (batch_mse, direct_table_mse, grids, ibert_exp, ibert_gelu, lsb_descent,
                               round_float_pwl, union_points)
from gqa_lut.evaluator import raw_metrics
from gqa_lut.search import FitConfig, fit
from gqa_lut.functions import get_op

ROOT = Path(__file__).resolve().parents[1]
pwlf = pytest.importorskip("pwlf")


def test_baseline_and_ours_on_a_small_config():
    op, rng, sc = get_op("gelu"), (-4.0, 4.0), (4, 5, 6)
    x = union_points(*rng, sc, 8)
    model = pwlf.PiecewiseLinFit(x, op.fn(x), seed=0)
    breaks = model.fit(4, maxiter=30, popsize=5)
    g = grids(*rng, sc, 8)
    K, B, P = round_float_pwl(breaks[1:-1], model.slopes, model.intercepts, 6, 8, sc, (0, 0), (64, 0))
    start = float(batch_mse(K[None], B[None], {d: P[d][None] for d in sc}, 6, g, op.fn)[0])
    K, B, P, mse = lsb_descent(K, B, P, 6, 8, g, op.fn, fixed=(0, 3))
    assert mse <= start  # the descent only ever improves
    assert mse == pytest.approx(raw_metrics(K, B, P, 6, rng, 8, op.fn)["mse"])  # its mse is the spec's
    for d in sc:
        assert np.all(np.diff(P[d]) > 0)
    ours = fit(op, FitConfig(segments=4, range=rng, scale_range=(4, 6), frac_bits=6))
    assert ours.metrics["mse"] <= mse


def test_floor_and_ibert():
    g = grids(-4.0, 4.0, (0, 6), 8)
    floor = direct_table_mse(g, get_op("gelu").fn, 6)
    # rounding to a 2^-(6+d) grid: about step^2 / 12 per scale, averaged over the scales
    expect = np.mean([(2.0 ** -(6 + d)) ** 2 / 12 for d in range(7)])
    assert 0.5 * expect < floor < 2 * expect
    x = np.linspace(-4, 4, 101)
    assert np.max(np.abs(ibert_gelu(x) - get_op("gelu").fn(x))) < 0.02
    xe = np.linspace(-8, 0, 101)
    assert np.max(np.abs(ibert_exp(xe) - np.exp(xe))) < 0.01


@pytest.mark.slow
def test_anchors_benchmark_quick_end_to_end():
    r = subprocess.run([sys.executable, "-m", "bench.anchors", "--quick"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    doc = json.loads((ROOT / "bench" / "results" / "anchors_quick.json").read_text())
    row = doc["rows"][0]
    for key in ("op", "segments", "frac_bits", "ours_median_mse", "ours_best_mse", "ours_seconds_median", "baseline_dp_mse",
                "baseline_mse", "baseline_seconds", "float_bound_mse", "direct_table_mse", "ibert_mse",
                "ratio_to_baseline", "targets_met"):
        assert key in row, key
    assert row["ratio_to_baseline"] <= 1.0


@pytest.mark.slow
def test_anchors_minimax_quick_end_to_end():
    """--minimax on one small row: the fit's max error sits above its own bound, and the float
    minimax (real lines, free breakpoints, no integer grid) is below both."""
    r = subprocess.run([sys.executable, "-m", "bench.anchors", "--minimax", "--quick"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    (row,) = json.loads((ROOT / "bench" / "results" / "anchors_minimax_quick.json").read_text())["rows"]
    assert row["ours_max_err_best"] >= row["lower_bound"] * (1 - 1e-9) and row["ratio_to_bound"] >= 1 - 1e-9
    assert 0 < row["float_minimax"] < row["ours_max_err_best"]

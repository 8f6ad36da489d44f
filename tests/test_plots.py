"""Figures: the right content (inspected on the figure objects), files of the right type, clear
errors for bad input, and never a window (Agg)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import matplotlib.image
import pytest

from gqa_lut.search import FitConfig, fit
from gqa_lut.table import save_table
from gqa_lut.functions import get_op
from ops.tables import default_table
from plots.retnet_chart import retnet_figure
from plots.sweep import sweep
from plots.table_plot import plot_convergence, plot_tables

ROOT = Path(__file__).resolve().parents[1]
QUICK = FitConfig(segments=6, population=8, generations=3, patience=2)


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "gqa_lut", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_backend_is_agg():
    import plots._mpl  # noqa: F401
    assert matplotlib.get_backend().lower() == "agg"


def test_table_figure_content():
    a, b = default_table("gelu"), fit("gelu", QUICK)
    fig = plot_tables([a, b], get_op("gelu").fn, ["shipped", "quick"], scale=4)
    top, bottom = fig.axes
    labels = [l.get_label() for l in top.get_lines()]
    assert labels[0] == "exact" and "shipped (16 seg)" in labels and "quick (6 seg)" in labels
    markers = [l for l in top.get_lines() if l.get_marker() == "|"]
    assert len(markers) == 2  # one breakpoint marker set per table
    inside = [p for p in a.breakpoints[4] if -4 <= p / 16 <= 4 and -128 <= p <= 127]
    assert len(markers[0].get_xdata()) == len(inside)
    err_lines = [l for l in bottom.get_lines() if l.get_label() in ("shipped", "quick")]
    assert len(err_lines) == 2 and len(err_lines[0].get_xdata()) == 129  # codes -64..64 at d=4 in [-4, 4]
    assert any("max |err|" in t.get_text() for t in bottom.texts)


def test_convergence_figure_has_best_and_mean_per_table():
    t = fit("swish", QUICK)
    fig = plot_convergence([t, default_table("gelu")], ["a", "b"])
    (ax,) = fig.axes
    curves = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1]  # best and mean per table
    markers = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 1]  # one per phase after the GA
    assert len(curves) == 4 and ax.get_yscale() == "log"
    assert len(curves[0].get_xdata()) == len([h for h in t.search["history"] if "gen" in h])
    phases = sum(1 for tab in (t, default_table("gelu")) for h in tab.search["history"] if "phase" in h)
    assert len(markers) == phases > 0


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("svg", b"<?xml"), ("pdf", b"%PDF")])
def test_plot_cli_writes_the_format(tmp_path, fmt, magic):
    save_table(default_table("gelu"), tmp_path / "g.json")
    r = cli("plot", "g.json", "--out", f"fig.{fmt}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = (tmp_path / f"fig.{fmt}").read_bytes()
    assert data.startswith(magic) and len(data) > 5000
    if fmt == "png":
        h, w = matplotlib.image.imread(tmp_path / "fig.png").shape[:2]
        assert 600 < w < 1000 and 500 < h < 900


def test_plot_cli_bad_input(tmp_path):
    save_table(default_table("gelu"), tmp_path / "g.json")
    (tmp_path / "pub.json").write_text(json.dumps({"gelu": {}}))
    for args, msg in [(["missing.json"], "does not exist"), (["pub.json"], "key 'format'"),
                      (["g.json", "--scale", "9"], "scale 9 is not in g"),
                      (["g.json", "--format", "bmp"], "format 'bmp'"),
                      (["g.json", "--range", "3", "1"], "empty or reversed")]:
        r = cli("plot", *args, "--out", "x.png", cwd=tmp_path)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
        assert not (tmp_path / "x.png").exists()
    r = cli("plot", "--convergence", "g.json", "--out", "c.png", cwd=tmp_path)
    assert r.returncode == 0  # the shipped tables carry their history


def test_sweep_grid_csv_and_plot(tmp_path):
    rows = sweep("gelu", [3, 5], [6, 8], tmp_path, workers=2, base={"generations": 2, "population": 8},
                 log=lambda s: None)
    assert len(rows) == 4 and {(r["segments"], r["bits"]) for r in rows} == {(3, 6), (5, 6), (3, 8), (5, 8)}
    with open(tmp_path / "sweep.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    assert (tmp_path / "sweep.png").stat().st_size > 5000 and (tmp_path / "gelu_8b_5s.json").exists()
    serial = sweep("gelu", [3], [6], tmp_path / "s", workers=1, base={"generations": 2, "population": 8},
                   log=lambda s: None)
    assert serial[0]["mse"] == rows[0]["mse"]  # the pool changes nothing


def test_sweep_cli_bad_input(tmp_path):
    for args, msg in [(["--op", "nope", "--segments", "4", "--bits", "8"], "unknown op 'nope'"),
                      (["--op", "gelu", "--segments", "1", "--bits", "8"], "segments 1"),
                      (["--op", "gelu", "--segments", "4", "--bits", "20"], "bits 20"),
                      (["--op", "gelu", "--segments", "4", "--bits", "8", "--workers", "0"], "workers 0")]:
        r = cli("sweep", *args, "--out-dir", "sw", cwd=tmp_path)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
        assert not (tmp_path / "sw").exists()


def test_retnet_chart_bars():
    doc = {"preset": "x", "device_name": "cpu",
           "rows": [{"step": s, "test_bpc": 2.0 + i * 0.01, "rel_to_float": i * 0.005} for i, s in
                    enumerate(["float", "w8", "w8a8", "all-lut"])]}
    fig = retnet_figure([doc, {**doc, "preset": "y"}])
    (ax,) = fig.axes
    assert len(ax.patches) == 8 and [t.get_text() for t in ax.get_xticklabels()] == ["float", "w8", "w8a8", "all-lut"]

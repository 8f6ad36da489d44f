"""The command line, end to end through a subprocess, as a user runs it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gqa_lut.table import load_table

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd):
    exe = shutil.which("gqa-lut")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "gqa_lut", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_fit_swish_8_bits_writes_a_valid_table(tmp_path):
    r = run("fit", "--op", "swish", "--bits", "8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    t = load_table(tmp_path / "swish_8b_8s.json")
    assert t.op == "swish" and t.segments == 8 and t.param_bits == 8 and t.input_bits == 8
    assert t.scales == list(range(7)) and t.metrics["mse"] < 2e-4
    assert "mse" in r.stdout and "swish_8b_8s.json" in r.stdout
    assert [h["gen"] for h in t.search["history"] if "gen" in h][:2] == [0, 1]
    assert "lower bound" in r.stdout and t.search["lower_bound"] <= t.search["objective_value"]

    e = run("eval", "swish_8b_8s.json", "--json", cwd=tmp_path)
    assert e.returncode == 0, e.stderr
    doc = json.loads(e.stdout)
    assert doc["metrics"]["mse"] == pytest.approx(t.metrics["mse"]) and doc["lower_bound"] == t.search["lower_bound"]
    e = run("eval", "swish_8b_8s.json", cwd=tmp_path)  # the fit's bound and the ratio to it, as fit printed
    assert e.returncode == 0 and "lower bound" in e.stdout and "x it" in e.stdout


@pytest.mark.slow
def test_fit_expression_json_and_quiet(tmp_path):
    r = run("fit", "--expr", "x*tanh(log1p(exp(x)))", "--name", "mish", "--segments", "6",
            "--population", "10", "--generations", "3", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["op"] == "custom:mish" and Path(tmp_path / out["file"]).exists()
    e = run("eval", out["file"], cwd=tmp_path)  # the file carries its expression
    assert e.returncode == 0 and "mse" in e.stdout
    q = run("fit", "--op", "gelu", "--segments", "4", "--generations", "2", "--quiet", "--out", "g.json",
            cwd=tmp_path)
    assert q.returncode == 0 and q.stdout == "" and (tmp_path / "g.json").exists()


def test_ops_lists_the_registry(tmp_path):
    r = run("ops", cwd=tmp_path)
    assert r.returncode == 0
    for name in ("gelu", "swish", "silu", "hswish", "sigmoid", "tanh", "exp", "decay", "rsqrt", "reciprocal"):
        assert name in r.stdout


def test_import_reference(tmp_path, reference_dir):
    r = run("import-reference", str(reference_dir / "gelu_pwl_7.json"), "--op", "gelu", "--range", "-4", "4",
            "--out", "pub.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "published table" in r.stdout and "input codes changed" in r.stdout
    t = load_table(tmp_path / "pub.json")
    assert t.search["published_metrics"]["mse"] == pytest.approx(5.18e-4, rel=1e-3)


BAD = [
    (["fit", "--op", "mish"], "unknown op 'mish': valid ops are gelu"),
    (["fit", "--op", "gelu", "--bits", "1"], "bits 1 is not allowed"),
    (["fit", "--op", "gelu", "--bits", "17"], "bits 17 is not allowed"),
    (["fit", "--op", "gelu", "--segments", "1"], "segments 1 is not allowed"),
    (["fit", "--op", "gelu", "--segments", "257"], "segments 257 is not allowed"),
    (["fit", "--op", "gelu", "--range", "1", "1"], "empty or reversed"),
    (["fit", "--op", "gelu", "--range", "2", "-2"], "empty or reversed"),
    (["fit", "--op", "rsqrt", "--range", "0", "4"], "outside the domain of rsqrt"),
    (["fit", "--op", "reciprocal", "--range", "-1", "2"], "outside the domain of reciprocal"),
    (["fit", "--expr", "__import__('os').getcwd()"], "not a numpy math function"),
    (["fit", "--expr", "open('x')"], "not an allowed function"),
    (["fit", "--op", "gelu", "--objective", "l1"], "objective 'l1'"),
    (["fit", "--op", "gelu", "--weights", "missing.npy"], "does not exist"),
    (["fit"], "one of the arguments --op --expr is required"),
    (["eval", "missing.json"], "does not exist"),
    (["fit", "--expr", "where(x)"], "where takes 3 arguments, 1 given"),
    (["fit", "--expr=" + "-" * 990 + "x"], "nests too deeply"),
    (["fit", "--expr=" + "(" * 300 + "x" + ")" * 300], "is not valid math"),
    (["fit", "--op", "gelu", "--patience", "-1"], "patience -1 is not allowed"),
    (["fit", "--op", "swish", "--output-bits", "8", "--output-frac-bits", "60"], "output frac bits 60 is not allowed"),
    (["fit", "--op", "swish", "--output-bits", "8", "--output-frac-bits", "10"],
     "hold |y| <= 0.124, but swish reaches 8 on [-8, 8]: use --output-frac-bits 4 or fewer"),
    (["fit", "--op", "gelu", "--output-bits", "40", "--output-frac-bits", "4"], "output bits 40 is not allowed"),
    (["fit", "--op", "gelu", "--scales", "-30", "2"], "exponents must lie in -24..24"),
    (["fit", "--op", "gelu", "--out", "/dev/null"], "is not a regular file"),
    (["plot", "table.json", "--out", "p.png", "--format", "svg"], "ends in .png but --format is svg"),
    (["export", "table.json", "--c", "/dev/null/x.h"], "is not a folder"),
]


@pytest.mark.parametrize("args,msg", BAD)
def test_bad_input_one_line_exit_2_no_file(tmp_path, args, msg):
    args = [str(ROOT / "ops" / "tables" / "gelu.json") if a == "table.json" else a for a in args]
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gqa-lut: error:") and msg in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []


def test_corrupt_table_names_the_key(tmp_path):
    doc = {"format": "gqa-lut/1", "op": "gelu", "range": [-4, 4], "segments": 2, "param_bits": 8,
           "frac_bits": 6, "input_bits": 8, "slopes": [0, 64], "intercepts": [0, 0],
           "breakpoints": {"0": [5, 3]}, "output": None}
    (tmp_path / "t.json").write_text(json.dumps({**doc, "breakpoints": {"0": [0]}}))
    assert run("eval", "t.json", cwd=tmp_path).returncode == 0
    (tmp_path / "t.json").write_text(json.dumps({**doc, "slopes": [0, 999]}))
    r = run("eval", "t.json", cwd=tmp_path)
    assert r.returncode == 2 and "key 'slopes[1]': 999 is outside [-128, 127]" in r.stderr
    (tmp_path / "t.json").write_text(json.dumps({**doc, "breakpoints": {"zero": [0]}}))
    r = run("eval", "t.json", cwd=tmp_path)
    assert r.returncode == 2 and "scale key 'zero'" in r.stderr


def test_negative_numbers_are_values(tmp_path):
    r = run("fit", "--op", "gelu", "--range", "-1e-3", "1", "--scales", "-2", "3", "--generations", "1",
            "--quiet", "--out", "g.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    t = load_table(tmp_path / "g.json")
    assert t.range == (-1e-3, 1.0) and t.scales == [-2, -1, 0, 1, 2, 3]


@pytest.mark.slow
def test_default_names_tell_fits_apart(tmp_path):
    from gqa_lut.cli import default_fit_name
    from gqa_lut.table import OutputFormat

    assert default_fit_name("swish", 8, 8, 8, "mse", None) == "swish_8b_8s.json"
    names = {default_fit_name("gelu", 2, 8, 8, "mse", None), default_fit_name("gelu", 8, 8, 8, "max", None),
             default_fit_name("gelu", 8, 2, 8, "mse", None), default_fit_name("gelu", 8, 8, 16, "mse", None),
             default_fit_name("gelu", 8, 8, 8, "mse", OutputFormat(8, 5)), default_fit_name("gelu", 8, 8, 8, "mse", None)}
    assert len(names) == 6
    r = run("fit", "--op", "gelu", "--bits", "8", "--param-bits", "6", "--generations", "1", "--quiet", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "gelu_p6b_i8b_8s.json").exists()


@pytest.mark.parametrize("content,msg", [
    ("zeros", "every weight is 0"),
    ("far", "none of the 2 samples lies inside range [-4, 4] (they span [100, 200])"),
])
def test_weights_that_weigh_nothing_are_refused(tmp_path, content, msg):
    import numpy as np
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "w.npy", np.zeros((5, 2)) if content == "zeros" else np.array([100.0, 200.0]))
    r = run("fit", "--op", "gelu", "--weights", str(data / "w.npy"), cwd=tmp_path)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.slow
def test_weighted_fit_prints_its_weighted_error(tmp_path):
    import numpy as np
    np.save(tmp_path / "acts.npy", np.random.default_rng(0).normal(0, 1, 5000))
    r = run("fit", "--op", "gelu", "--weights", "acts.npy", "--generations", "2", "--out", "w.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "weighted mse" in r.stdout and load_table(tmp_path / "w.json").search["weighted"] is True


def test_out_under_a_file_and_an_existing_file_is_never_replaced(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = run("fit", "--op", "gelu", "--out", "afile/t.json", cwd=tmp_path)
    assert r.returncode == 2 and "'afile' is not a folder" in r.stderr
    (tmp_path / "keep.json").write_text("precious")
    r = run("fit", "--op", "gelu", "--objective", "l1", "--out", "keep.json", cwd=tmp_path)
    assert r.returncode == 2 and (tmp_path / "keep.json").read_text() == "precious"


def test_read_only_target_is_refused_before_the_fit_runs(tmp_path, monkeypatch, capsys):
    import gqa_lut.search
    import gqa_lut.io
    from gqa_lut.cli import main

    monkeypatch.setattr(gqa_lut.io, "_read_only_fs", lambda folder: True)
    monkeypatch.setattr(gqa_lut.search, "fit", lambda *a, **k: pytest.fail("fitted before checking --out"))
    assert main(["fit", "--op", "gelu", "--out", str(tmp_path / "t.json")]) == 2
    assert "is not writable" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_plot_writes_exactly_the_file_asked_for(tmp_path):
    r = run("plot", str(ROOT / "ops" / "tables" / "gelu.json"), "--out", "p", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["p"]
    assert (tmp_path / "p").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("command", ["fit", "eval", "export", "plot", "sweep", "ops", "import-reference"])
def test_help_shows_defaults_and_examples(command, tmp_path):
    r = run(command, "--help", cwd=tmp_path)
    assert r.returncode == 0
    assert r.stdout.count("\n  gqa-lut ") >= 2, r.stdout  # two examples
    if command in ("fit", "sweep"):
        assert "(default: 30)" in r.stdout  # generations


@pytest.mark.slow
def test_readme_activation_recipe_writes_weights_the_fit_accepts(tmp_path):
    """The acts.npy snippet of docs/search.md runs as written on a small model, and `fit` takes the file."""
    import re

    import torch
    import torch.nn as nn

    code = next(b for b in re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "search.md").read_text(), re.S)
                if "acts.npy" in b)
    model = nn.Sequential()
    model.mlp = nn.Sequential(nn.Linear(4, 8))
    model.mlp.act = nn.GELU()
    batches = [torch.randn(16, 4) for _ in range(3)]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(code, {"model": model, "batches": batches})
    finally:
        os.chdir(cwd)
    r = run("fit", "--op", "gelu", "--weights", "acts.npy", "--generations", "1", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args, bad", [
    (("bench.qat_speed", "--models", "retnet,foo"), "foo is not allowed"),
    (("bench.qat_speed", "--reps", "0"), "'0' is not allowed"),
    (("bench.qat_speed", "--device", "tpu"), "'tpu'"),
    (("bench.ops_speed", "--sizes", "20,99"), "'20,99' is not allowed"),
    (("bench.ops_speed", "--sizes", "x"), "'x' is not allowed"),
    (("bench.model_zoo", "--models", "nope"), "nope is not allowed"),
    (("bench.sharing_bound", "--ops", "gelu", "--segments", "12"), "no fitted gelu table at 12 segments"),
    (("bench.sharing_bound", "--ops", "relu"), "invalid choice: 'relu'"),
    pytest.param(("bench.llm_speed", "--sizes", "8y512"), "size '8y512' is not BATCHxTOKENS", marks=pytest.mark.slow),
    pytest.param(("bench.llm_speed", "--sizes", "0x512"), "batch must be >= 1", marks=pytest.mark.slow),
    pytest.param(("bench.llm_speed", "--reps", "0"), "--reps 0: must be >= 1", marks=pytest.mark.slow),
])
def test_benchmarks_refuse_bad_arguments_in_one_line(tmp_path, args, bad):
    """A benchmark's bad argument: exit 2, the bad value and what is allowed on one line, and
    no results file written."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = ROOT / "bench" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.glob("*.json")}
    r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert bad in last and "error:" in last
    assert {p.name: p.stat().st_mtime_ns for p in results.glob("*.json")} == before


@pytest.mark.slow  # a subprocess that imports torch: the fast lane is near its 3 minutes
def test_llm_speed_without_cuda_says_so_in_one_line():
    """The GPU-only benchmark on a machine without CUDA: a non-zero exit, one line that names
    what is missing, no results file written."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the benchmark would run")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = ROOT / "bench" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.glob("*.json")}
    r = subprocess.run([sys.executable, "-m", "bench.llm_speed"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["llm_speed needs CUDA: no GPU is visible to torch here"]
    assert {p.name: p.stat().st_mtime_ns for p in results.glob("*.json")} == before

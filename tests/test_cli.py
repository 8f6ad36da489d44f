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


def test_fit_swish_8_bits_writes_a_valid_table(tmp_path):
    r = run("fit", "--op", "swish", "--bits", "8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    t = load_table(tmp_path / "swish_8b_8s.json")
    assert t.op == "swish" and t.segments == 8 and t.param_bits == 8 and t.input_bits == 8
    assert t.scales == list(range(7)) and t.metrics["mse"] < 2e-4
    assert "mse" in r.stdout and "swish_8b_8s.json" in r.stdout
    assert [h["gen"] for h in t.search["history"]][:2] == [0, 1]

    e = run("eval", "swish_8b_8s.json", "--json", cwd=tmp_path)
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["metrics"]["mse"] == pytest.approx(t.metrics["mse"])


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
    (["fit", "--op", "softplus"], "unknown op 'softplus': valid ops are gelu"),
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
]


@pytest.mark.parametrize("args,msg", BAD)
def test_bad_input_one_line_exit_2_no_file(tmp_path, args, msg):
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
    assert r.returncode == 2 and "key 'slopes'" in r.stderr
    (tmp_path / "t.json").write_text(json.dumps({**doc, "breakpoints": {"zero": [0]}}))
    r = run("eval", "t.json", cwd=tmp_path)
    assert r.returncode == 2 and "scale key 'zero'" in r.stderr

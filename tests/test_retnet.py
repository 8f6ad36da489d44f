"""The RetNet: forms agree, quantization is deterministic, the LUT decay is within its error,
a tiny real-data run trains end to end, checkpoints round-trip, bad input is refused."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gqa_lut.errors import UsageError
from gqa_lut.table import load_table
from retnet_integration.data import FORTUNES_DIR, SEPARATOR, eval_windows, load_corpus, normalised
from retnet_integration.layers import Decay
from retnet_integration.model import RetNet, RetNetConfig, retention_chunkwise, retention_parallel, retention_recurrent
from retnet_integration.experiments.pipeline import (form_agreement, get_preset, load_checkpoint, run_eval, run_train,
                                         save_checkpoint, train_steps)
from retnet_integration.integer.spec import DECAY_TABLE
from retnet_integration.quantize import parse_mode, quantize_

ROOT = Path(__file__).resolve().parents[1]
needs_fortunes = pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="apt-get install fortunes (.ci/run does)")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("L", [1, 5, 32, 77])
@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_retention_forms_agree(L, chunk):
    torch.manual_seed(L * 100 + chunk)
    q, k, v = torch.randn(2, 3, L, 8), torch.randn(2, 3, L, 8), torch.randn(2, 3, L, 6)
    lg = torch.log(1 - 2.0 ** (-5.0 - torch.arange(3.0)))
    par = retention_parallel(q, k, v, lg)
    chk, s_chk = retention_chunkwise(q, k, v, lg, chunk)
    state = torch.zeros(2, 3, 8, 6)
    outs = []
    for t in range(L):
        o, state = retention_recurrent(q[:, :, t], k[:, :, t], v[:, :, t], lg, state)
        outs.append(o)
    rec = torch.stack(outs, 2)
    assert rel(chk, par) < 1e-5 and rel(rec, par) < 1e-5 and rel(s_chk, state) < 1e-5


@pytest.mark.parametrize("max_len, split, new", [(64, 25, 7), (16, 10, 30)])
def test_model_forms_agree_stream_and_generate(max_len, split, new):
    """The forms agree, the recurrent state carried across calls equals one long call, and
    generation streams; max_len only says how many rotary angles are precomputed (16: the
    second call and the generation cross it)."""
    torch.manual_seed(0)
    m = RetNet(RetNetConfig(d_model=32, n_layers=2, n_heads=2, max_len=max_len)).eval()
    x = torch.randint(0, 256, (2, 40))
    p, _ = m(x, "parallel")
    assert rel(m(x, "recurrent")[0], p) < 1e-5 and rel(m(x, "chunkwise", chunk_size=16)[0], p) < 1e-5
    a, st = m(x[:, :split], "recurrent")
    b, _ = m(x[:, split:], "recurrent", states=st, offset=split)
    assert rel(torch.cat([a, b], 1), p) < 1e-5
    out = m.generate(x[:1, :5], new, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 5 + new) and torch.equal(out[:, :5], x[:1, :5])
    if max_len < 40:
        from retnet_integration.model import rotary_angles
        cos, sin = rotary_angles(m.blocks[0].retention.dk, 3, 13)  # the table's formula (float64, rounded once)
        att = m.blocks[0].retention
        assert torch.allclose(cos, att.cos[3:16], rtol=0, atol=1e-7) and torch.allclose(sin, att.sin[3:16], rtol=0, atol=1e-7)


def test_quantized_forward_is_deterministic_and_swaps_everything():
    torch.manual_seed(0)
    m = RetNet(RetNetConfig(d_model=32, n_layers=2, n_heads=2, max_len=64)).eval()
    calib = [torch.randint(0, 256, (4, 32)) for _ in range(2)]
    info = quantize_(m, "all-lut", calib)
    kinds = sorted({s["new"] for s in info["swaps"]})
    assert kinds == ["Decay(table)", "LUTGELU", "LUTGroupNorm", "LUTLayerNorm", "LUTSiLU"]
    x = torch.randint(0, 256, (2, 32))
    a, b = m(x)[0], m(x)[0]
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert info["activation_quantizers"] > 0
    # every quantizer is shared by the forms (accumulators stay wide): same next tokens
    r = m(x, "recurrent")[0]
    assert (r.argmax(-1) == a.argmax(-1)).float().mean() > 0.99
    assert quantize_(RetNet(RetNetConfig(d_model=32, n_layers=1, n_heads=2, max_len=64)), "w8a8", calib,
                     accumulator_bits=8)["accumulator_bits"] == 8


def test_lut_decay_within_the_tables_error():
    table = load_table(DECAY_TABLE)
    d = Decay(8)
    d.use_table(table)
    from ops.nn import covering_scale
    for lam, lg in zip((-d.log_gamma_float).tolist(), d.log_gamma().tolist()):
        scale = covering_scale(table, lam)
        # table error on its grid, plus the input's rounding (|d exp(-x)/dx| <= 1) of half a step
        bound = table.metrics["max_abs_err"] + 2.0 ** -(scale + 1)
        assert abs(np.exp(lg) - np.exp(-lam)) <= bound
        assert abs(lg / -lam - 1) < 0.02  # the decay rate itself within 2%


def test_modes_and_presets_bad_input(tmp_path):
    assert parse_mode("w8a8+gelu+decay").lut_ops == ("gelu", "decay")
    with pytest.raises(UsageError, match="not allowed"):
        parse_mode("int4")
    assert parse_mode("w4").weight_bits == 4 and not parse_mode("w4").activations
    with pytest.raises(UsageError, match="'relu'"):
        parse_mode("w8a8+relu")
    with pytest.raises(UsageError, match="unknown preset 'huge'"):
        get_preset("huge")
    with pytest.raises(UsageError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt", torch.device("cpu"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        load_checkpoint(tmp_path / "bad.pt", torch.device("cpu"))


def test_training_stops_when_the_check_says_so():
    """Early stopping (the gpu10 preset's patience): train_steps ends at the first check that
    returns True, with one loss per step taken; presets are powers of two where the integer
    graph needs them (d_model and head width)."""
    mcfg, tcfg = get_preset("tiny")
    model = RetNet(mcfg)
    data = torch.randint(0, 256, (4096,))
    checks = []
    losses = train_steps(model, data, tcfg, 40, 1e-3, torch.device("cpu"), 0,
                         every=(5, lambda step: checks.append(step) or step >= 15))
    assert checks == [5, 10, 15] and len(losses) == 15 and not model.training
    for name in ("tiny", "cpu", "gpu", "gpu10"):
        m, _ = get_preset(name)
        for v in (m.d_model, m.d_model // m.n_heads):
            assert v & (v - 1) == 0, (name, v)


def test_checkpoint_round_trip_loads_in_eval_mode(tmp_path):
    torch.manual_seed(0)
    m = RetNet(RetNetConfig(d_model=16, n_layers=1, n_heads=2, max_len=32, dropout=0.5)).eval()
    save_checkpoint(m, tmp_path / "m.pt", {"preset": "tiny"})
    m2, extra = load_checkpoint(tmp_path / "m.pt", torch.device("cpu"))
    assert not any(mod.training for mod in m2.modules())  # eval and calibration see no dropout
    x = torch.randint(0, 256, (1, 20))
    assert extra == {"preset": "tiny"} and torch.equal(m(x)[0], m2(x)[0])
    m2.train()
    agree = form_agreement(m2, torch.randint(0, 256, (2, 21)), torch.device("cpu"))
    assert agree["recurrent_vs_parallel"] >= 0.95 and not m2.training  # with dropout on: ~0.1


@needs_fortunes
def test_corpus_split_is_deterministic_and_disjoint():
    a, b = load_corpus(), load_corpus()
    assert a.info == b.info and torch.equal(a.test, b.test)
    assert (a.info["test_fortunes"] + a.info["val_fortunes"] + a.info["train_fortunes"]
            + a.info["duplicates_dropped"] + a.info["near_duplicates_dropped"] == a.info["fortunes"])
    assert a.info["near_duplicates_dropped"] > 0 and a.info["corpus"] == "fortunes"
    # disjoint: no fortune's normalised text is in two splits
    split = {k: {normalised(f) for f in v.numpy().astype("uint8").tobytes().split(SEPARATOR)}
             for k, v in (("train", a.train), ("val", a.val), ("test", a.test))}
    assert not split["test"] & split["train"] and not split["val"] & split["train"] and not split["test"] & split["val"]
    assert a.info["duplicates_dropped"] > 0
    assert a.info["test_bytes"] > 50_000 and a.info["train_bytes"] > 1_000_000
    n = (a.test.numel() - 1) // 64
    w = eval_windows(a.test, 64, limit=3)  # spread over the stream, not its first files
    assert w.shape == (3, 65) and torch.equal(w[0], a.test[:65])
    assert torch.equal(w[1], a.test[(n // 3) * 64:(n // 3) * 64 + 65])
    assert torch.equal(w[2], a.test[(2 * n // 3) * 64:(2 * n // 3) * 64 + 65])
    assert eval_windows(a.test, 64).shape == (n, 65) and eval_windows(a.test, 64, limit=10 * n).shape == (n, 65)


@needs_fortunes
def test_tiny_train_and_eval_end_to_end(tmp_path):
    extra = run_train("tiny", tmp_path / "t.pt", "cpu", log=lambda s: None)
    assert extra["last_loss"] < extra["first_loss"] - 1.0  # the loss goes down
    doc = run_eval(tmp_path / "t.pt", tmp_path / "r.json", "cpu", log=lambda s: None)
    steps = [r["step"] for r in doc["rows"]]
    assert steps[:3] == ["float", "w8", "w8a8"] and "all-lut + QAT" in steps and "all-lut + latent QAT" in steps
    assert all(np.isfinite(r["test_bpc"]) and 0 < r["test_bpc"] < 8 for r in doc["rows"])
    ag = next(r for r in doc["rows"] if r["step"] == "all-lut")["agreement"]
    assert 0 <= ag["recurrent_vs_parallel"] <= 1
    assert json.loads((tmp_path / "r.json").read_text())["data"]["split_rule"].startswith("document i")


@pytest.mark.slow
@needs_fortunes
def test_retnet_cli_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "gqa_lut", "retnet", *a], cwd=tmp_path, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    r = run("train", "--preset", "tiny", "--out", "t.pt", "--steps", "5")
    assert r.returncode == 0, r.stderr
    r = run("eval", "--checkpoint", "t.pt", "--out", "r.json")
    assert r.returncode == 0, r.stderr
    r = run("report", "r.json", "--out", "all.json", "--markdown", "t.md")
    assert r.returncode == 0 and "| all-lut |" in (tmp_path / "t.md").read_text()
    r = run("train", "--preset", "tiny", "--out", "t1.pt", "--steps", "5", "--seed", "1")
    assert r.returncode == 0, r.stderr
    _, extra = load_checkpoint(tmp_path / "t1.pt", torch.device("cpu"))
    assert extra["train"]["seed"] == 1 and extra["train"]["corpus"] == "fortunes"
    bad = run("train", "--preset", "tiny", "--out", "t2.pt", "--seed", "-1")
    assert bad.returncode == 2 and "seed -1 is not allowed" in bad.stderr and not (tmp_path / "t2.pt").exists()
    bad = run("train", "--preset", "tiny", "--out", "t2.pt", "--max-seconds", "0")
    assert bad.returncode == 2 and "max seconds 0 is not allowed" in bad.stderr and not (tmp_path / "t2.pt").exists()
    bad = run("train", "--preset", "tiny", "--out", "t2.pt", "--corpus", "wiki")
    assert bad.returncode == 2 and "invalid choice: 'wiki'" in bad.stderr
    bad = run("train", "--preset", "huge")
    assert bad.returncode == 2 and "unknown preset 'huge'" in bad.stderr
    bad = run("eval", "--checkpoint", "missing.pt", "--out", "x.json")
    assert bad.returncode == 2 and "does not exist" in bad.stderr and not (tmp_path / "x.json").exists()


def test_calibration_keeps_every_norm_rsqrt_at_its_fixed_scale():
    """The rsqrt inside each norm sees a mantissa in [1, 4) whatever the activations: calibrating
    the quantized RetNet must not move it to a coarser scale."""
    from ops.nn import RangeReducedLUT

    torch.manual_seed(0)
    m = RetNet(RetNetConfig(d_model=32, n_layers=2, n_heads=2, max_len=64)).eval()
    quantize_(m, "all-lut", [torch.randint(0, 256, (2, 32)) for _ in range(2)])
    fixed = RangeReducedLUT("rsqrt").lut.scale
    scales = [mod.lut.scale for mod in m.modules() if isinstance(mod, RangeReducedLUT)]
    assert len(scales) == 7 and set(scales) == {fixed}  # 2 x (2 LayerNorms + GroupNorm) + final

"""The integer RetNet: the fake-quant simulation, the numpy integer reference and the exported C
program compute the same integers; every accumulator's bound fits its type; the CLI runs
train -> qat-int -> export-c -> check-int end to end; bad input gets one line and exit 2."""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retnet_integration.integer import reference as ref
from retnet_integration.integer.export import export_integer
from retnet_integration.integer.c_export import (arm_linux_build, build, cortex_m_sizes, stage_arithmetic,
                                                 table_outputs, write_program)
from retnet_integration.data import FORTUNES_DIR
from retnet_integration.experiments.commands import CHECK_KEYS
from retnet_integration.integer.spec import PHASE_BITS, phase_steps, rotary_codes, sine_table
from retnet_integration.integer.simulation import IntSim, rshift
from retnet_integration.model import RetNet, RetNetConfig

ROOT = Path(__file__).resolve().parents[1]
CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")
needs_arm = pytest.mark.skipif(not all(shutil.which(t) for t in ("arm-linux-gnueabihf-gcc", "qemu-arm")),
                               reason="apt-get install gcc-arm-linux-gnueabihf qemu-user (.ci/run does)")
needs_cortex_m = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None,
                                    reason="apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi (.ci/run does)")
needs_fortunes = pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="apt-get install fortunes (.ci/run does)")


@pytest.fixture(scope="module")
def tiny():
    """A random tiny RetNet, calibrated on random bytes, and its integer model."""
    torch.manual_seed(0)
    net = RetNet(RetNetConfig(d_model=32, n_layers=2, n_heads=2, ffn_mult=2, max_len=64)).eval()
    with torch.no_grad():  # gains and biases away from their init, so every path is exercised
        for mod in net.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    sim = IntSim(net).eval()
    gen = torch.Generator().manual_seed(1)
    sim.calibrate([torch.randint(0, 256, (4, 24), generator=gen)])
    tokens = torch.randint(0, 256, (3, 20), generator=gen)
    return sim, export_integer(sim), tokens


def test_simulation_equals_the_integer_reference_bit_for_bit(tiny):
    sim, m, tokens = tiny
    with torch.no_grad():
        logits, _ = sim(tokens, "recurrent")
    codes = logits.double() * 2.0 ** m.logit_frac
    assert torch.equal(codes, torch.round(codes))  # the simulation's logits lie on the integer grid
    np.testing.assert_array_equal(codes.long().numpy(), ref.run(m, tokens.numpy()))


def test_parallel_form_follows_the_graph(tiny):
    sim, m, tokens = tiny
    with torch.no_grad():
        par, _ = sim(tokens, "parallel")
    ints = ref.run(m, tokens.numpy())
    # the parallel form decays exactly where the graph rounds the state once per token
    assert (par.argmax(-1).numpy() == ints.argmax(-1)).mean() >= 0.9


def test_chunkwise_form_is_recurrent_at_one_token_and_follows_at_any_chunk(tiny):
    """The quantized retention's chunkwise form, on random q, k, v codes (the model's own
    retention outputs are requantized to 16 bits, which hides differences this small): chunks
    of one token are the graph's recurrent retention bit for bit, outputs and int32 state;
    longer chunks round the carried state once per chunk instead of per token, so they follow
    within a few units of the state's last place (stated: 1e-6 relative on the outputs, 1e-6 of
    the state's size), the state staying on its integer grid; the parallel form alike. Through
    the whole model: chunkwise logits, and a state carried from one call into the next, give
    the reference's next-byte argmax."""
    sim, m, tokens = tiny
    e = sim.exps
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randint(-128, 128, (2, 2, 40, 16), generator=g).float() * 2.0 ** -e[f"0.{n}"] for n in "qkv")
    with torch.no_grad():
        rec, state = sim._retention_recurrent("0.", q, k, v, None)
        one, one_state = sim._retention_chunkwise("0.", q, k, v, None, 1)
        assert torch.equal(one, rec) and torch.equal(one_state, state)
        scale = rec.abs().max()
        differs = 0
        for chunk in (2, 5, 16, 40):
            o, s = sim._retention_chunkwise("0.", q, k, v, None, chunk)
            differs += not torch.equal(o, rec)
            assert (o - rec).abs().max() <= 1e-6 * scale, chunk
            assert torch.equal(s, torch.round(s)) and (s - state).abs().max() <= 1e-6 * state.abs().max(), chunk
        assert differs  # the chunks' single rounding is not the recurrent one: the test can tell them apart
        assert (sim._retention_parallel(q, k, v).double() - rec).abs().max() <= 1e-6 * scale
        ints = ref.run(m, tokens.numpy())
        first, carried = sim(tokens[:, :7], "chunkwise4")
        rest, _ = sim(tokens[:, 7:], "chunkwise4", states=carried, offset=7)
        assert (torch.cat([first, rest], 1).argmax(-1).numpy() == ints.argmax(-1)).mean() >= 0.9
    with pytest.raises(ValueError, match="chunk size 0"):
        sim(tokens, "chunkwise0")
    with pytest.raises(ValueError, match="'chunkwise-4' is not parallel, recurrent or chunkwise<size>"):
        sim(tokens, "chunkwise-4")


def test_accumulator_bounds_fit_their_types_and_the_simulation_is_exact(tiny):
    _, m, _ = tiny
    rows = ref.accumulator_bounds(m)
    assert {r["stage"] for r in rows} >= {"state S", "Q . S", "logits", "layer norm: sum of (X - mean)^2"}
    for r in rows:
        assert 0 < r["bound"] < r["limit"], r
        if r["sim_limit"] is not None:
            assert r["bound"] < r["sim_limit"], r  # the simulation's float holds it exactly
    # the state bound really holds: drive one head with the largest product every token
    g, f = max(m.gammas, key=lambda gf: gf[0] / 2 ** gf[1])
    s = 0
    for _ in range(20000):
        s = int(ref.round_shift(np.int64(g * s), f)) + (128 * 128 << m.state_frac)
    assert s <= next(r["bound"] for r in rows if r["stage"] == "state S")


@settings(max_examples=200, deadline=None)
@given(st.integers(-2 ** 40, 2 ** 40), st.integers(-20, 30))
def test_round_shift_is_floor_of_half_up_in_numpy_and_torch(a, t):
    want = (a + (1 << (t - 1))) >> t if t > 0 else a * 2 ** -t  # Python ints: exact
    assert int(ref.round_shift(np.int64(a), t)) == want
    assert int(rshift(torch.tensor([a]), torch.tensor([t]))[0]) == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 2 ** 62), min_size=1, max_size=8))
def test_bit_length_by_integers_alone(values):
    got = ref.bit_length(np.array(values, dtype=np.int64))
    assert got.tolist() == [v.bit_length() for v in values]


def test_rotary_phase_streams_past_any_cap():
    pos = np.array([0, 1, 1000, 2 ** 20 + 7, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 5])
    cos, sin = rotary_codes(16, pos)
    steps, table = phase_steps(16), sine_table()
    for i, p in enumerate(pos):
        phase = (int(p) % 2 ** PHASE_BITS) * steps % 2 ** PHASE_BITS
        idx = ((phase + 2 ** 19) >> 20) % 4096
        np.testing.assert_array_equal(sin[i], table[idx])
        np.testing.assert_array_equal(cos[i], table[(idx + 1024) % 4096])
    np.testing.assert_array_equal(cos[5], cos[0])  # position 2^32 wraps to 0, as the C program's uint32 does
    # the angle is the float rotary's within the table's resolution
    theta = 10000.0 ** (-np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(sin[2] / 2 ** 14, np.sin(1000 * theta), atol=2e-3)


def c_logits(cmd: list[str], tokens: np.ndarray, vocab: int) -> np.ndarray:
    run = subprocess.run([*cmd, "logits"], input=bytes(tokens.astype(np.uint8)), capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr[:300]
    return np.array(run.stdout.split(), dtype=np.int64).reshape(-1, vocab)


@needs_cc
@pytest.mark.parametrize("flags", [("-fsanitize=undefined", "-fno-sanitize-recover=all"),
                                   ("-DRETNET_PIECEWISE",), ("-DRETNET_INT64", "-DRETNET_PIECEWISE")],
                         ids=["direct-int32-ubsan", "piecewise", "int64-piecewise"])
def test_c_library_equals_the_reference(tiny, tmp_path, flags):
    """The library with direct-index tables and int32 stages (under UBSan), with the tables
    evaluated segment by segment (tables.h), and with every shift in int64 (the first C
    program's arithmetic): the reference's integers, every position."""
    _, m, tokens = tiny
    write_program(m, tmp_path)
    exe = build(tmp_path, flags)
    want = ref.run(m, tokens.numpy())
    for w in range(tokens.shape[0]):
        np.testing.assert_array_equal(c_logits([str(exe)], tokens[w].numpy(), m.vocab), want[w])
    if flags[0] != "-fsanitize=undefined":
        return
    # generation: greedy bytes, each the argmax of the reference's logits after the previous one
    run = subprocess.run([str(exe), "generate", "5"], input=b"ab", capture_output=True, timeout=60)
    assert run.returncode == 0 and len(run.stdout) == 5
    seq = list(b"ab")
    for _ in range(5):
        seq.append(int(ref.run(m, np.array([seq]))[0, -1].argmax()))
    assert list(run.stdout) == seq[2:]
    bad = subprocess.run([str(exe), "generate", "x"], capture_output=True, timeout=60)
    assert bad.returncode == 2 and b"usage" in bad.stderr


API_TEST = r"""
#include <stdio.h>
#include "retnet.h"
/* two streams interleaved on two states; a reset; a token out of range */
static retnet_state a, b;
static int32_t la[RETNET_VOCAB], lb[RETNET_VOCAB];
static void put(const int32_t *l) { for (int i = 0; i < RETNET_VOCAB; i++) printf(i ? " %ld" : "%ld", (long)l[i]); putchar('\n'); }
int main(void) {
    const unsigned char s1[] = "hello", s2[] = "world";
    retnet_init(&a); retnet_init(&b);
    for (int t = 0; t < 5; t++) { retnet_step(&a, s1[t], la); retnet_step(&b, s2[t], lb); put(la); put(lb); }
    if (retnet_step(&a, -1, la) != -1 || retnet_step(&a, RETNET_VOCAB, la) != -1) return 3;
    if (a.pos != 5) return 4;
    retnet_reset(&a);
    retnet_step(&a, s2[0], la); put(la);
    printf("%d\n", retnet_argmax(la));
    return 0;
}
"""


@needs_cc
def test_c_library_api_streams_reset_and_bad_tokens(tiny, tmp_path):
    """The library's API as a caller uses it: two states are two independent streams (no hidden
    mutable data), reset starts a sequence over, a token outside the vocabulary is refused
    (-1) and leaves the state as it was; argmax is the reference's."""
    _, m, _ = tiny
    write_program(m, tmp_path)
    (tmp_path / "api.c").write_text(API_TEST)
    exe = tmp_path / "api"
    cc = subprocess.run([CC, "-O2", "-std=c99", "-Wall", "-Werror", "-fsanitize=undefined",
                         "-fno-sanitize-recover=all", "-o", str(exe), str(tmp_path / "api.c"),
                         str(tmp_path / "retnet.c")], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, (run.returncode, run.stderr)
    lines = run.stdout.splitlines()
    got = np.array([line.split() for line in lines[:-1]], dtype=np.int64)
    w1, w2 = (ref.run(m, np.frombuffer(s, np.uint8)[None].astype(np.int64))[0] for s in (b"hello", b"world"))
    np.testing.assert_array_equal(got[0:10:2], w1)
    np.testing.assert_array_equal(got[1:10:2], w2)
    np.testing.assert_array_equal(got[10], w2[0])  # after the reset: the start of a sequence
    assert int(lines[-1]) == int(w2[0].argmax())


def test_library_stages_run_in_int32_where_their_bounds_allow(tiny):
    """Each shift-and-saturate stage is int32 only where rshift32 is exact for its bound and
    shifts; the direct-index tables are the reference's outputs at every code."""
    _, m, _ = tiny
    tabs = table_outputs(m)
    stages = {r["macro"]: r for r in stage_arithmetic(m, tabs)}
    assert set(stages) == {"EMBED", "LIN", "ROT", "GATE", "P", "GELU"}
    for r in stages.values():
        fits = all((t <= 30 and r["bound"] + 2 ** (t - 1) < 2 ** 30) if t > 0 else r["bound"] * 2 ** -t < 2 ** 31
                   for t in r["shifts"])
        assert r["int32"] == fits, r
    assert all(r["int32"] for r in stages.values())  # this model: every stage fits int32
    codes = np.arange(-128, 128)
    np.testing.assert_array_equal(tabs["gelu"][1], ref.evaluate_codes(m.tables["gelu"], codes, m.layers[1].gelu_scale))
    from retnet_integration.integer.c_export import _fits32
    assert not _fits32(2 ** 30 - 2, [2]) and _fits32(2 ** 30 - 3, [2]) and not _fits32(1, [31])
    assert _fits32(2 ** 23, [-7]) and not _fits32(2 ** 24, [-7])


@needs_cc
@needs_arm
def test_c_library_on_32_bit_arm_under_emulation_equals_the_reference(tiny, tmp_path):
    _, m, tokens = tiny
    write_program(m, tmp_path)
    cmd = arm_linux_build(tmp_path)
    want = ref.run(m, tokens.numpy())
    for w in range(tokens.shape[0]):
        np.testing.assert_array_equal(c_logits(cmd, tokens[w].numpy(), m.vocab), want[w])


@needs_cortex_m
def test_cortex_m_image_holds_the_weights_in_flash_and_the_state_in_ram(tiny, tmp_path):
    """arm-none-eabi-size of the Cortex-M4 image: the library object has no RAM of its own (the
    caller's retnet_state is the image's .bss), and its flash holds the weights and tables."""
    _, m, _ = tiny
    write_program(m, tmp_path)
    sizes = cortex_m_sizes(tmp_path)
    lib, img = sizes["library"], sizes["image"]
    assert lib["ram"] == 0 and lib["flash"] > m.embed.size + sum(L.up.w.size for L in m.layers)
    assert img["flash"] >= lib["flash"] and img["ram"] >= m.state_bytes()


def test_export_refuses_what_the_c_step_cannot_hold(tiny, tmp_path):
    import dataclasses

    from gqa_lut.errors import UsageError
    _, m, _ = tiny
    with pytest.raises(UsageError, match=r"cannot export to C: shifts hold values outside \[-30, 62\]"):
        write_program(dataclasses.replace(m, embed_shift=-40), tmp_path / "a")
    assert not (tmp_path / "a" / "model.h").exists()


@pytest.mark.slow
@needs_cc
@needs_fortunes
def test_cli_train_qat_export_check_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *a, **kw: subprocess.run([sys.executable, "-m", "gqa_lut", "retnet", *a], cwd=tmp_path,
                                          env=kw.get("env", env), capture_output=True, text=True, timeout=300)
    assert run("train", "--preset", "tiny", "--out", "t.pt").returncode == 0
    r = run("qat-int", "--checkpoint", "t.pt", "--out", "ti.pt", "--steps", "4")
    assert r.returncode == 0, r.stderr
    r = run("export-c", "--checkpoint", "ti.pt", "--out", "prog")
    assert r.returncode == 0, r.stderr
    assert {p.name for p in (tmp_path / "prog").iterdir()} >= {"tables.h", "model.h", "retnet.h", "retnet.c", "main.c",
                                                              "firmware.c", "model.json"}
    arm = all(shutil.which(t) for t in ("arm-linux-gnueabihf-gcc", "qemu-arm", "arm-none-eabi-gcc"))
    r = run("check-int", "--checkpoint", "ti.pt", "--c", "prog", "--windows", "3", "--json", "c.json",
            *(["--arm"] if arm else []))
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "c.json").read_text())
    assert tuple(doc) == CHECK_KEYS
    assert doc["c_vs_int_logits_equal"] == 1.0 and doc["int_vs_fakequant_argmax_agree"] == 1.0
    if arm:
        assert doc["arm_vs_int_logits_equal"] == 1.0 and doc["cortex_m4"]["image"]["ram"] >= doc["state_bytes"]
    assert doc["bpc_int"] == pytest.approx(doc["bpc_fakequant"], rel=1e-9)  # the same integers
    assert doc["positions"] == 3 * 32 and doc["state_bytes"] == 4 * 1 * 2 * 16 * 16 + 4
    # bad input: one line, exit 2, nothing written
    for args, words in [(("check-int", "--checkpoint", "missing.pt"), "does not exist"),
                        (("export-c", "--checkpoint", "ti.pt", "--out", "c.json"), "is a file"),
                        (("check-int", "--checkpoint", "ti.pt", "--windows", "0"), "--windows 0"),
                        (("check-int", "--checkpoint", "ti.pt", "--arm"), "--arm needs --c")]:
        r = run(*args)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # no C compiler on PATH: named in the error
    r = run("check-int", "--checkpoint", "ti.pt", "--c", "prog", "--windows", "1",
            env={**env, "PATH": str(tmp_path / "empty")})
    assert r.returncode == 2 and "no C compiler found" in r.stderr, r.stderr
    # a C program exported for a model of another shape
    meta = json.loads((tmp_path / "prog" / "model.json").read_text())
    meta["config"]["d_model"] = 64
    (tmp_path / "prog" / "model.json").write_text(json.dumps(meta))
    r = run("check-int", "--checkpoint", "ti.pt", "--c", "prog", "--windows", "1")
    assert r.returncode == 2 and "another shape" in r.stderr, r.stderr


def test_shapes_the_integer_graph_refuses():
    net = RetNet(RetNetConfig(d_model=48, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="d_model 48 must be a power of two"):
        IntSim(net)


def test_qat_through_the_graph_keeps_the_float_models_dropout():
    """The simulation drops out where the float model does, in training only: calibration and
    evaluation stay deterministic, and a model without dropout trains on the graph unchanged."""
    torch.manual_seed(0)
    net = RetNet(RetNetConfig(d_model=32, n_layers=1, n_heads=2, ffn_mult=2, max_len=64, dropout=0.5))
    calib = [torch.randint(0, 256, (2, 16))]
    tokens = torch.randint(0, 256, (2, 16))
    sim = IntSim(net).train()
    exps = sim.calibrate(calib)
    assert sim.training and exps == IntSim(copy.deepcopy(net)).eval().calibrate(calib)  # without dropout
    with torch.no_grad():
        a, b = sim(tokens)[0], sim(tokens)[0]
        sim.eval()
        c, d = sim(tokens)[0], sim(tokens)[0]
    assert not torch.equal(a, b) and torch.equal(c, d)
    still = RetNet(RetNetConfig(d_model=32, n_layers=1, n_heads=2, ffn_mult=2, max_len=64))
    plain = IntSim(still)
    plain.calibrate(calib)
    with torch.no_grad():
        assert torch.equal(plain.train()(tokens)[0], plain.eval()(tokens)[0])


@pytest.mark.slow
@needs_cc
@needs_arm
@needs_cortex_m
@needs_fortunes
def test_c_library_benchmark_small(tmp_path, monkeypatch):
    """bench.c_library on two test windows of the cpu preset: the library equals the reference
    natively and under ARM emulation, the Cortex-M4 image fits the issue's 512 KB of RAM and
    2 MB of flash, and the speeds are measured (not asserted: the machines are shared)."""
    import bench._common as common
    from bench import c_library
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert c_library.main(["--presets", "cpu", "--windows", "2", "--reps", "1"]) == 0
    (row,) = json.loads((tmp_path / "c_library.json").read_text())["results"]
    assert row["c_vs_int_logits_equal"] == 1.0 and row["arm_vs_int_logits_equal"] == 1.0
    img = row["cortex_m4"]["image"]
    assert img["ram"] < 512 * 1024 and img["flash"] < 2 * 1024 * 1024 and img["ram"] >= row["state_bytes"]
    assert row["lib_tokens_per_s"] > 0 and row["int_tokens_per_s"] > 0
    with pytest.raises(SystemExit) as exc:
        c_library.main(["--presets", "tiny"])
    assert exc.value.code == 2


def test_arm_builds_name_the_missing_tool_and_its_package(tiny, tmp_path, monkeypatch):
    from gqa_lut.errors import UsageError
    _, m, _ = tiny
    write_program(m, tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UsageError, match=r"arm-linux-gnueabihf-gcc not found on PATH: install it "
                                         r"\(`apt-get install gcc-arm-linux-gnueabihf`\)"):
        arm_linux_build(tmp_path)
    with pytest.raises(UsageError, match=r"arm-none-eabi-gcc not found on PATH: install it \(`apt-get install "
                                         r"gcc-arm-none-eabi libnewlib-arm-none-eabi`\)"):
        cortex_m_sizes(tmp_path)

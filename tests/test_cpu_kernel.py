"""The compiled CPU forward (ops/cpu_kernel.py): the same bits as the torch ops, built safely."""

import os
import subprocess
import sys

import pytest
import torch

from gqa_lut.quantization import int_range
from ops import cpu_kernel
from ops.modules import LUTActivation
from ops.tables import default_table
from ops.torch_lut import lookup
from tests.strategies import random_tables
from hypothesis import given, settings
from hypothesis import strategies as st

HAS_CC = cpu_kernel.load() is not None


def torch_ops_lookup(x, m: LUTActivation) -> torch.Tensor:
    """The same table through the torch ops alone (the kernel switched off for this call)."""
    saved = dict(cpu_kernel._state)
    cpu_kernel._state.update(dll=None, status="off for the test")
    try:
        return lookup(x, m.table_real, m.scale_index, m.d_current, m.table.input_bits)
    finally:
        cpu_kernel._state.clear()
        cpu_kernel._state.update(saved)


def nasty_inputs(n: int, d: int, qmin: int, qmax: int, seed: int = 0) -> torch.Tensor:
    """Every code, ties at every half code (round half to even), NaN, +-inf, far out of range."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.arange(qmin - 3, qmax + 4, dtype=torch.float64)
    special = torch.cat([codes, codes + 0.5, codes - 0.5,
                         torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0, -0.0])])
    body = torch.randn(n, generator=g, dtype=torch.float64) * (qmax - qmin) / 3
    x = torch.cat([special, body])[:max(n, special.numel())] * 2.0 ** -d
    return x.float()


def bits(y: torch.Tensor) -> torch.Tensor:
    return y.view(torch.int16 if y.element_size() == 2 else torch.int32)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler here: the torch ops run instead")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 15, 17, 1000, (1 << 17) + 3])  # tails of 16 lanes; the threaded split
@pytest.mark.parametrize("op", ["gelu", "exp", "rsqrt"])
def test_kernel_equals_torch_ops_bit_for_bit(op, n, dtype):
    t = default_table(op)
    m = LUTActivation(t)
    qmin, qmax = int_range(t.input_bits)
    for d in t.scales:
        m.set_scale(d)
        x = nasty_inputs(n, d, qmin, qmax).to(dtype)
        y = lookup(x, m.table_real, m.scale_index, m.d_current, t.input_bits)
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.equal(bits(y), bits(torch_ops_lookup(x, m)))


@pytest.mark.skipif(not HAS_CC, reason="no C compiler here: the torch ops run instead")
@settings(max_examples=40, deadline=None)
@given(random_tables(max_bits=12), st.data())
def test_any_input_width_and_strided_input(table, data):
    """2..12-bit codes: tables of up to 256 entries take the register path, larger ones the gather."""
    m = LUTActivation(table, scale=data.draw(st.sampled_from(table.scales)))
    qmin, qmax = int_range(table.input_bits)
    x = nasty_inputs(300, m.scale, qmin, qmax, seed=data.draw(st.integers(0, 99)))
    strided = torch.stack([x, -x], 1)[:, 0]  # not contiguous
    for inp in (x, strided, x.to(torch.bfloat16)):
        y = lookup(inp, m.table_real, m.scale_index, m.d_current, table.input_bits)
        assert torch.equal(bits(y), bits(torch_ops_lookup(inp, m)))


def _run(env: dict, code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300, check=True).stdout


PROBE = ("import hashlib, torch; from ops import cpu_kernel; from ops.modules import LUTGELU;"
         "x = torch.linspace(-5, 5, 1001); y = LUTGELU()(x);"
         "print(cpu_kernel.status()); print(hashlib.sha256(y.numpy().tobytes()).hexdigest())")


def test_no_compiler_or_switched_off_falls_back_to_the_same_values(tmp_path):
    ref = _run({"GQA_LUT_CACHE": str(tmp_path / "a")}, PROBE).splitlines()
    off = _run({"GQA_LUT_CPU_KERNEL": "0"}, PROBE).splitlines()
    nocc = _run({"CC": "no-such-cc-gqa", "GQA_LUT_CACHE": str(tmp_path / "b")}, PROBE).splitlines()
    assert "GQA_LUT_CPU_KERNEL=0" in off[0]
    assert "no C compiler 'no-such-cc-gqa'" in nocc[0]
    assert not (tmp_path / "b").exists()
    assert ref[1] == off[1] == nocc[1]  # the same output bytes


@pytest.mark.skipif(not HAS_CC, reason="no C compiler here")
def test_build_is_cached_and_leaves_no_temporary_files(tmp_path):
    env = {"GQA_LUT_CACHE": str(tmp_path)}
    first = _run(env, PROBE).splitlines()[0]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert first.startswith("compiled ") and len(files) == 1 and files[0].endswith(".so")
    _run(env, PROBE)
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # loaded, not rebuilt

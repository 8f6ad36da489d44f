"""The compiled CPU forward (ops/kernels/cpu_kernel.py): the same bits as the torch ops, built safely."""

import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

from gqa_lut.quantization import int_range
from ops.kernels import cpu_kernel
from ops.nn import LUTActivation
from ops.tables import default_table
from ops.kernels.dispatch import lookup
from tests.strategies import random_tables
from hypothesis import given, settings
from hypothesis import strategies as st

HAS_CC = cpu_kernel.load() is not None


@contextmanager
def kernel_off():
    """The compiled kernel switched off inside: the torch ops compute instead."""
    saved = dict(cpu_kernel._state)
    cpu_kernel._state.update(dll=None, status="off for the test")
    try:
        yield
    finally:
        cpu_kernel._state.clear()
        cpu_kernel._state.update(saved)


def torch_ops_lookup(x, m: LUTActivation) -> torch.Tensor:
    """The same table through the torch ops alone."""
    with kernel_off():
        return lookup(x, m.table_real, m.scale_index, m.d_current, m.table.input_bits)


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


PROBE = ("import hashlib, torch; from ops.kernels import cpu_kernel; from ops.nn import LUTGELU;"
         "x = torch.linspace(-5, 5, 1001); y = LUTGELU()(x);"
         "print(cpu_kernel.status()); print(hashlib.sha256(y.numpy().tobytes()).hexdigest())")


@pytest.mark.slow
def test_no_compiler_no_cache_folder_or_switched_off_falls_back_to_the_same_values(tmp_path):
    ref = _run({"GQA_LUT_CACHE": str(tmp_path / "a")}, PROBE).splitlines()
    off = _run({"GQA_LUT_CPU_KERNEL": "0"}, PROBE).splitlines()
    nocc = _run({"CC": "no-such-cc-gqa", "GQA_LUT_CACHE": str(tmp_path / "b")}, PROBE).splitlines()
    (tmp_path / "file").write_text("")
    nodir = _run({"GQA_LUT_CACHE": str(tmp_path / "file" / "cache")}, PROBE).splitlines() if HAS_CC else ref
    assert "GQA_LUT_CPU_KERNEL=0" in off[0]
    if HAS_CC:
        assert "cache folder" in nodir[0] and "cannot be made" in nodir[0] and "GQA_LUT_CACHE" in nodir[0]
    assert "no C compiler 'no-such-cc-gqa'" in nocc[0]
    assert not (tmp_path / "b").exists()
    assert ref[1] == off[1] == nocc[1] == nodir[1]  # the same output bytes


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CC, reason="no C compiler here")
def test_build_is_cached_and_leaves_no_temporary_files(tmp_path):
    env = {"GQA_LUT_CACHE": str(tmp_path)}
    first = _run(env, PROBE).splitlines()[0]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert first.startswith("compiled ") and len(files) == 1 and files[0].endswith(".so")
    _run(env, PROBE)
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # loaded, not rebuilt


@pytest.mark.skipif(not HAS_CC, reason="no C compiler here: the torch ops run instead")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["gelu", "gelu_tanh", "swish"])
def test_native_backward_then_mask_equals_the_closed_form(op, dtype):
    """CPU backward: torch's own gelu/silu backward and the C mask give the closed form's
    straight-through gradient: exactly 0 wherever the input is outside the range (NaN, +-inf
    too) and the same values within float rounding (one bf16 ulp; 1e-5 in float32)."""
    m = LUTActivation(default_table(op))
    qmin, qmax = int_range(m.table.input_bits)
    x = nasty_inputs(1 << 17, m.scale, qmin, qmax).to(dtype)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    xr = x.clone().requires_grad_(True)
    m(xr).backward(g)
    with kernel_off():
        xo = x.clone().requires_grad_(True)
        m(xo).backward(g)
    xs = x.float() * 2.0 ** m.scale
    outside = ~((xs >= qmin - 0.5) & (xs <= qmax + 0.5))
    assert outside.sum() > 10 and (xr.grad[outside] == 0).all() and (xo.grad[outside] == 0).all()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-5)
    assert torch.allclose(xr.grad.float(), xo.grad.float(), **tol)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler here: the torch ops run instead")
@pytest.mark.parametrize("grad", ["exact", "slope"])
@pytest.mark.parametrize("op", ["rsqrt", "reciprocal"])
def test_range_reduction_kernel_equals_torch_ops_at_every_magnitude(op, grad):
    """The one-pass RangeReducedLUT (no autograd: C) against its torch ops (the autograd path):
    the same bits from 1e-38 to 3e38, at NaN, +-inf, 0, negatives and powers of two."""
    from ops.nn import RangeReducedLUT
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -1.0, 1e-39, 1.17549435e-38,
                            3.4e38, 2.0 ** 127, 2.0 ** -126, 1.0, 2.0, 4.0, 3.9999998, 0.25, 0.5])
    g = torch.Generator().manual_seed(0)
    v = torch.cat([special, torch.exp(torch.randn(1 << 17, generator=g) * 20)])
    r = RangeReducedLUT(op, grad=grad)
    with torch.no_grad():
        fast = r(v)
    slow = r(v.clone().requires_grad_(True)).detach()
    assert torch.equal(bits(fast), bits(slow))


@pytest.mark.skipif(not HAS_CC, reason="no C compiler here: the torch ops run instead")
@pytest.mark.parametrize("log2_t", [1.3, -2.0, 6.0])
@pytest.mark.parametrize("nbits", [8, 4])
def test_tqt_kernel_equals_torch_ops(nbits, log2_t):
    """TQT in one pass: the quantized values bit for bit, the input's gradient exactly, the
    threshold's gradient (a sum of 2^17 terms, in double here, float32 there) within 1e-5."""
    from ops.nn.fake_quant import _tqt_backward, _tqt_forward
    g0 = torch.Generator().manual_seed(0)
    x = torch.randn((1 << 17) + 5, generator=g0) * 3
    x[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5])
    g = torch.randn(x.shape, generator=g0)
    lt = torch.tensor(log2_t)
    y, d = _tqt_forward(x, lt, nbits, -40, 40)
    gx, gl = _tqt_backward(g, x, d, nbits)
    with kernel_off():
        y2, d2 = _tqt_forward(x, lt, nbits, -40, 40)
        gx2, gl2 = _tqt_backward(g, x, d2, nbits)
    assert torch.equal(d, d2) and torch.equal(bits(y), bits(y2))
    assert torch.equal(gx, gx2)  # by value: the torch path's grad * False is -0.0 for a negative grad
    assert torch.allclose(gl, gl2, rtol=1e-5, atol=1e-3)



@pytest.mark.skipif(not HAS_CC, reason="no C compiler here: the torch ops run instead")
@pytest.mark.parametrize("shape,groups", [((8, 16, 32, 32), 4), ((3, 12, 5, 7), 3), ((2, 6, 9), 2),
                                          ((2, 8, 3, 4, 5), 8), ((1, 4, 1, 1), 1), ((5, 6, 70000), 2)])
def test_group_statistics_kernel_in_both_layouts(shape, groups):
    """The compiled GroupNorm statistics (double, two passes) against float64 torch, within
    half a float32 ulp of the value plus the float64 sum's own error (stated: 2e-7 relative);
    channels-last and contiguous give the same bits; the drop-in's output within one rsqrt-table
    code of the torch-ops path (the same function with gradients on)."""
    from ops.nn import RangeReducedLUT, group_norm
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3 + 5  # |mean| >> std stresses var
    g = x.double().reshape(shape[0], groups, -1)
    want_mean, want_var = g.mean(-1, keepdim=True), g.var(-1, correction=0, keepdim=True)
    layouts = [x]
    if x.dim() in (4, 5):
        layouts.append(x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d))
    got = [cpu_kernel.group_stats_cpu(xl, groups) for xl in layouts]
    for mean, var in got:
        assert mean.shape == (shape[0], groups, 1) and mean.dtype == torch.float32
        assert torch.allclose(mean.double(), want_mean, rtol=2e-7, atol=1e-12)
        assert torch.allclose(var.double(), want_var, rtol=2e-7, atol=1e-12)
    for mean, var in got[1:]:
        assert torch.equal(mean, got[0][0]) and torch.equal(var, got[0][1])
    r = RangeReducedLUT("rsqrt")
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    with torch.no_grad():
        fast = [group_norm(xl, groups, w, b, 1e-5, r) for xl in layouts]
    plain = group_norm(x.clone().requires_grad_(), groups, w, b, 1e-5, r).detach()
    assert all(torch.equal(f, fast[0]) for f in fast)
    # a variance one ulp apart can take the next rsqrt code (relative step 2^-5 of the table's input)
    assert ((fast[0] - plain).abs() <= 0.05 * (plain.abs() + 1)).all()
    assert cpu_kernel.group_stats_cpu(x.double(), groups) is None  # float32 only: the caller uses torch
    assert cpu_kernel.group_stats_cpu(torch.randn(2, 4, 6, 6)[:, :, ::2], 2) is None  # a layout it cannot walk

"""PyTorch drop-ins: bit-exact with the numpy evaluator, STE gradients, replace_ops, norms."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gqa_lut.evaluator import evaluate, evaluate_codes
from gqa_lut.quantization import int_range
from ops import (LUTActivation, LUTGELU, LUTGroupNorm, LUTLayerNorm, LUTRMSNorm, LUTSiLU,
                 LUTSoftmax, RangeReducedLUT, calibrate, replace_ops)
from ops.tables import TABLE_DIR, default_table
from ops.kernels.reference import lut_int
from tests.strategies import random_tables

SHIPPED = sorted(p.stem for p in TABLE_DIR.glob("*.json"))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def module_outputs(m: LUTActivation, d: int, device: str) -> np.ndarray:
    qmin, qmax = int_range(m.table.input_bits)
    m.set_scale(d)
    x = torch.tensor(np.arange(qmin, qmax + 1) * 2.0 ** -d, dtype=torch.float32, device=device)
    return m.to(device)(x).cpu().numpy()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", SHIPPED)
def test_shipped_tables_bit_exact_every_code_every_scale(op, device):
    t = default_table(op)
    m = LUTActivation(t)
    qmin, qmax = int_range(t.input_bits)
    codes = np.arange(qmin - 5, qmax + 6)
    for d in t.scales:
        ref = evaluate_codes(t, codes, d)
        assert np.array_equal(lut_int(torch.tensor(codes, device=device), t, d).cpu().numpy(), ref)
        assert np.array_equal(module_outputs(m, d, device), evaluate(t, codes[5:-5], d).astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(random_tables(max_bits=12), st.data())
def test_random_tables_and_shapes_bit_exact(table, data):
    d = data.draw(st.sampled_from(table.scales))
    qmin, qmax = int_range(table.input_bits)
    codes = np.arange(qmin - 2, qmax + 3)
    assert np.array_equal(lut_int(torch.tensor(codes), table, d).numpy(), evaluate_codes(table, codes, d))
    if abs(evaluate_codes(table, codes, d)).max() < 2 ** 24:
        shape = data.draw(st.lists(st.integers(1, 5), min_size=0, max_size=4))
        X = np.random.default_rng(0).integers(qmin - 3, qmax + 4, size=shape)
        m = LUTActivation(table, scale=d)
        y = m(torch.tensor(X * 2.0 ** -d, dtype=torch.float32))
        assert y.shape == tuple(shape)
        assert np.array_equal(y.numpy(), evaluate(table, X.reshape(-1), d).reshape(shape).astype(np.float32))


def test_nan_and_inf_saturate_never_crash():
    m = LUTGELU()
    y = m(torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30]))
    assert torch.isfinite(y).all()
    assert y[0] == m(torch.tensor([0.0]))[0]  # NaN is treated as 0
    assert y[1] == y[3] and y[2] == y[4]  # inf saturates like any huge value


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_match_float32_then_cast(dtype):
    m = LUTSiLU()
    x = torch.randn(1000) * 4
    y = m(x.to(dtype))
    assert y.dtype == dtype
    assert torch.equal(y, m(x.to(dtype).float()).to(dtype))


def test_ste_gradients():
    m = LUTGELU()  # scale 4: inputs up to 127/16 = 7.9375
    x = torch.tensor([-2.0, -0.3, 0.0, 1.7, 9.0], requires_grad=True)
    m(x).sum().backward()
    xd = x.detach().clone().requires_grad_(True)
    F.gelu(xd).sum().backward()
    inside = torch.tensor([1.0, 1, 1, 1, 0])  # 9.0 is clamped by the input quantizer
    assert torch.allclose(x.grad, xd.grad * inside)
    m2 = LUTGELU(grad="slope")
    x2 = torch.tensor([-2.0, 1.7], requires_grad=True)
    m2(x2).sum().backward()
    t, d = m2.table, m2.scale
    seg = np.searchsorted(t.breakpoints[d], np.round(x2.detach().numpy() * 2 ** d), side="left")
    assert torch.allclose(x2.grad, torch.tensor(t.slopes[seg] / 2 ** t.frac_bits, dtype=torch.float32))


def test_learned_scale_tqt_gets_gradient_and_moves():
    m = LUTSiLU(scale_mode="learned")
    start = m.log2_threshold.detach().item()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randn(4096) * 6.0  # wider than the initial scale's range: clipping hurts
    for _ in range(20):
        opt.zero_grad()
        loss = (m(x) - F.silu(x)).pow(2).mean()
        loss.backward()
        assert torch.isfinite(m.log2_threshold.grad)
        opt.step()
    assert m.log2_threshold.detach().item() != start


def test_calibrate_sets_scales_from_data():
    model = nn.Sequential(nn.Linear(4, 4), LUTGELU(), nn.Linear(4, 4), LUTSiLU())
    model[0].weight.data.mul_(30.0)
    scales = calibrate(model, [torch.randn(64, 4) for _ in range(4)])
    assert set(scales) == {"1", "3"}
    assert scales["1"] < default_table("gelu").scales[-1]  # large activations: a coarse scale
    assert model[1].scale == scales["1"]


def test_state_dict_round_trip_carries_the_table():
    a = LUTActivation(default_table("tanh"), scale=3)
    b = LUTActivation(default_table("gelu"), scale=5)
    b.load_state_dict(a.state_dict())
    assert b.table.op == "tanh" and b.scale == 3
    x = torch.randn(100)
    assert torch.equal(a(x), b(x))


def test_jit_trace_and_script_friendly_forward():
    m = LUTGELU()
    x = torch.randn(64)
    traced = torch.jit.trace(m, x, check_trace=False)
    assert torch.equal(traced(x), m(x))


@pytest.mark.slow
def test_torch_compile_matches_eager():
    m = LUTSiLU()
    x = torch.randn(4096) * 3
    assert torch.equal(torch.compile(m)(x), m(x))


def small_transformer() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, activation="gelu", batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def test_replace_ops_transformer():
    model = small_transformer()
    x = torch.randn(4, 12, 32)
    ref = model(x)
    report = replace_ops(model)
    names = sorted(s.name for s in report.swaps)
    assert names == sorted([f"layers.{i}.{n}" for i in range(2) for n in ("activation", "norm1", "norm2")])
    assert all(isinstance(model.layers[i].activation, LUTGELU) for i in range(2))
    assert model.layers[0].activation_relu_or_gelu == 0
    out = model(x)
    # 8-bit inputs at scale 4 (step 1/16) and tables of mse ~4e-5 perturb each activation by
    # a few percent of its spread; through 2 layers the output moves by a few percent.
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.05
    assert len(replace_ops(model).swaps) == 6  # already swapped: nothing more to do


class SubclassedSiLU(nn.SiLU):
    pass


def test_replace_ops_cnn_and_subclasses_leaves_others_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Hardswish(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), SubclassedSiLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3), nn.Softmax(-1)).eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    report = replace_ops(model)
    assert [(r.name, r.old, r.new) for r in report.swaps] == [
        ("1", "GroupNorm", "LUTGroupNorm"), ("2", "Hardswish", "LUTHardswish"),
        ("5", "SubclassedSiLU", "LUTSiLU"), ("9", "Softmax", "LUTSoftmax")]
    assert isinstance(model[4], nn.BatchNorm2d) and isinstance(model[0], nn.Conv2d)
    out = model(x)
    assert (out - ref).abs().max() < 0.03  # probabilities: a few LSB of the 8-bit tables
    only = nn.Sequential(nn.GELU(), nn.SiLU())
    assert [r.name for r in replace_ops(only, ops=["silu"]).swaps] == ["1"] and isinstance(only[0], nn.GELU)
    with pytest.raises(ValueError, match="cannot be swapped"):
        replace_ops(only, ops=["relu"])


@pytest.mark.parametrize("op,exact", [("rsqrt", torch.rsqrt), ("reciprocal", torch.reciprocal)])
def test_range_reduction_any_magnitude(op, exact):
    m = RangeReducedLUT(op)
    v = torch.logspace(-8, 8, 2001, dtype=torch.float64).float()
    rel = ((m(v) - exact(v)) / exact(v)).abs().max().item()
    # the table's own error on its octave range, relative to its smallest output, plus the
    # 8-bit quantization of the mantissa: about 1.5% at worst
    t = default_table(op)
    bound = t.metrics["max_abs_err"] / (0.5 if op == "rsqrt" else 0.5) + 2.0 ** -max(t.scales) * 0.5
    assert rel < bound + 0.01
    assert torch.isfinite(m(torch.tensor([0.0, -1.0, float("inf")]))).all()
    assert torch.isnan(m(torch.tensor([float("nan")]))).all()  # NaN propagates, as in torch.rsqrt and 1/x


def test_lut_exp_functional_is_built_once_and_matches_the_table():
    from ops.nn.softmax import _cached_exp, lut_exp
    x = torch.linspace(-8, 0, 129)
    y = lut_exp(x)
    t = default_table("exp")
    d = _cached_exp(None, "cpu").scale
    # the table's own error plus the input's rounding to the 2^-d grid (|exp'| <= 1 for x <= 0)
    assert (y - torch.exp(x)).abs().max() <= t.metrics["max_abs_err"] + 2.0 ** -(d + 1) + 1e-6
    assert torch.equal(lut_exp(x), y) and _cached_exp.cache_info().hits >= 1


def test_norms_and_softmax_close_to_float():
    torch.manual_seed(0)
    x = torch.randn(8, 16, 32) * 5 + 2
    ln, rms, gn = LUTLayerNorm(32), LUTRMSNorm(32), LUTGroupNorm(4, 16)
    assert (ln(x) - F.layer_norm(x, (32,))).abs().max() < 0.05
    assert (rms(x) - x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)).abs().max() < 0.05
    assert (gn(x) - F.group_norm(x, 4)).abs().max() < 0.05
    sm = LUTSoftmax(-1)
    p = sm(x)
    # the exp table's max error is 1.3% of its full scale; it hits numerator and denominator
    assert (p - x.softmax(-1)).abs().max() < 0.05
    assert torch.allclose(p.sum(-1), torch.ones(8, 16), atol=0.05)
    y = ln(x.requires_grad_(True))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


# --- input types and edge values (lut-format.md section 7) -------------------------------------

@pytest.mark.parametrize("module", [LUTGELU, LUTSiLU, lambda: LUTLayerNorm(4), lambda: LUTSoftmax(),
                                    lambda: RangeReducedLUT("rsqrt")])
@pytest.mark.parametrize("x", [torch.tensor([-3, -1, 0, 1, 2, 3]), torch.tensor([True, False]),
                               torch.tensor([[1, 2, 3, 4]], dtype=torch.int8)])
def test_integer_and_bool_tensors_are_a_type_error(module, x):
    with pytest.raises(TypeError, match="expects a floating-point tensor, got dtype torch"):
        module()(x)


@pytest.mark.parametrize("module", [LUTGELU, LUTSiLU])
@pytest.mark.parametrize("grad", ["exact", "slope"])
def test_gradient_is_zero_not_nan_at_inf_and_nan(module, grad):
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.5], requires_grad=True)
    y = module(grad=grad)(x)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[:3].tolist() == [0.0, 0.0, 0.0] and x.grad[3] > 0


def test_float64_is_quantized_in_float64():
    """x * 2^d just above a tie rounds up in float64; through float32 it would round to even."""
    m = LUTGELU(scale=4)
    codes = np.array([3, 5, -7])
    x = torch.tensor((codes + 0.5 + 2.0 ** -30) * 2.0 ** -4, dtype=torch.float64)
    assert torch.equal(torch.round(x.float() * 16), torch.tensor([4.0, 6.0, -6.0]))  # the double rounding
    y = m(x)
    assert y.dtype == torch.float64
    assert np.array_equal(y.numpy(), evaluate(m.table, codes + 1, 4))


def test_softmax_of_an_empty_dim_is_empty():
    for shape in [(3, 0), (0, 4), (2, 0, 5)]:
        y = LUTSoftmax(dim=-1)(torch.zeros(shape))
        assert y.shape == shape


def test_lut_exp_refuses_positive_inputs():
    from ops import lut_exp

    with pytest.raises(ValueError, match="input 5 > 0 is outside the exp table"):
        lut_exp(torch.tensor([-1.0, 5.0]))
    assert lut_exp(torch.tensor([-1.0, 0.0])).shape == (2,)


# --- replace_ops on modules it must not break ---------------------------------------------------

class _ChannelsFirstLayerNorm(nn.LayerNorm):
    """timm's LayerNorm2d: a LayerNorm subclass whose own forward permutes channels first."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _PlainSubclass(nn.LayerNorm):
    pass


def test_subclasses_that_override_forward_stay_float_and_say_why():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), _ChannelsFirstLayerNorm(8), nn.Flatten(), _PlainSubclass(8 * 16))
    x = torch.randn(2, 3, 4, 4)
    ref = m(x)
    report = replace_ops(m)
    assert isinstance(m[1], _ChannelsFirstLayerNorm) and isinstance(m[3], LUTLayerNorm)
    kept = report.kept()
    assert [r.name for r in kept] == ["1"] and "overrides LayerNorm.forward" in kept[0].reason
    assert ((m(x) - ref).norm() / ref.norm()) < 0.05  # no silently changed model


def test_tanh_gelu_gets_its_own_table():
    from ops import LUTGELUTanh

    m = nn.Sequential(nn.GELU(approximate="tanh"), nn.GELU())
    report = replace_ops(m)
    assert isinstance(m[0], LUTGELUTanh) and isinstance(m[1], LUTGELU)
    assert [r.table for r in report.swaps] == ["gelu_tanh", "gelu"]
    x = torch.linspace(-3, 3, 97)
    assert (m[0](x) - F.gelu(x, approximate="tanh")).abs().max() < 0.03


def test_fused_encoder_path_never_bypasses_swapped_norms():
    enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    replace_ops(enc, ops=["layernorm"])  # the activation stays relu: only the norms are tables
    calls = []
    for mod in enc.modules():
        if isinstance(mod, LUTLayerNorm):
            mod.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        enc(torch.randn(2, 5, 16))
    assert len(calls) == 2


def test_calibration_leaves_range_reduced_tables_alone_and_needs_data():
    m = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU(), nn.Softmax(-1))
    replace_ops(m)
    fixed = {n: mod.scale for n, mod in m.named_modules() if isinstance(mod, LUTActivation) and mod.range_reduced}
    assert len(fixed) == 3  # the norm's rsqrt, softmax's exp and 1/x
    scales = calibrate(m, [torch.randn(4, 8) * 40])
    assert set(scales) == {"2"}  # only the free activation was calibrated
    assert {n: mod.scale for n, mod in m.named_modules() if n in fixed} == fixed
    with pytest.raises(ValueError, match="no batches"):
        calibrate(m, [])


def test_a_model_with_drop_ins_pickles_whole():
    import io

    m = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.LayerNorm(4), nn.Softmax(-1))
    replace_ops(m)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    x = torch.randn(3, 4)
    assert torch.equal(back(x), m(x))


def test_custom_op_passes_opcheck_on_strided_inputs():
    """The fake (meta) kernel agrees with the real one on shape, dtype and strides, also for a
    transposed input, and the op is registered for autograd: what torch.compile relies on."""
    from ops.kernels.autograd import lut_lookup

    m = LUTGELU()
    x = (torch.randn(6, 5) * 3).t().requires_grad_(True)  # non-contiguous
    args = (x, m.table_real, m.slopes_real, m.breakpoints, m.scale_index, m.d_current, 8, "gelu")
    torch.library.opcheck(lut_lookup, args)


@pytest.mark.parametrize("op", ["rsqrt", "reciprocal"])
def test_range_reduced_gradient_is_the_exact_derivative_at_any_magnitude(op):
    """Straight-through: d/dv of the range-reduced table is the exact function's derivative at
    every magnitude (the mantissa's derivative times the exact power of two), eager and compiled
    alike. torch.ldexp would pass a zero gradient here. Mantissas stay below the top code of the
    table's input range (reciprocal: 127/64 < 2), where the input clamps and the gradient is 0."""
    m = RangeReducedLUT(op)
    octave = 4.0 if op == "rsqrt" else 2.0
    mantissas = [1.1, 1.5, 1.9] + ([3.0, 3.9] if op == "rsqrt" else [])
    v = torch.tensor([a * octave ** j for a in mantissas for j in range(-12, 13)]).requires_grad_(True)
    (g,) = torch.autograd.grad(m(v).sum(), v)
    exact = -0.5 * v.detach() ** -1.5 if op == "rsqrt" else -1 / v.detach() ** 2
    assert torch.allclose(g, exact, rtol=1e-5)

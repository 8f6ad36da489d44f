"""Per-feature input scales (calibrate(scales="channel")) and softmax's range-reduced exp.

Outputs are gathers from one expanded table, so the per-feature path is compared bit for bit
with per-tensor lookups at each feature's scale (no float math is compared with ==)."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gqa_lut.evaluator import covering_scale
from ops import LUTActivation, LUTGELU, LUTSiLU, LUTSoftmax, calibrate, replace_ops
from ops.kernels import cpu_kernel, dispatch
from ops.kernels.reference import lookup_channels
from ops.nn import softmax as softmax_mod


def outlier_batch(seed: int = 0, shape=(4, 16, 24)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    x[..., 3] *= 12  # a few outlier features, as in real LLM MLPs
    x[..., 7] *= 5
    return x


def per_feature_reference(m: LUTActivation, x: torch.Tensor) -> torch.Tensor:
    """Each feature through the per-tensor path at that feature's own scale."""
    out = torch.empty_like(x)
    for c in range(x.shape[-1]):
        i = m.channel_index[c]
        out[..., c] = m._lut(x[..., c].contiguous(), i, m.scales[i])
    return out


def test_calibrate_gives_each_feature_the_finest_scale_that_holds_it():
    m = nn.Sequential(LUTSiLU())
    x = outlier_batch()
    calibrate(m, [x])
    act = m[0]
    amax = x.abs().reshape(-1, x.shape[-1]).amax(0)
    assert act.channel_scales() == [covering_scale(act.table, float(a)) for a in amax]
    assert act.scale == covering_scale(act.table, float(x.abs().max()))  # the tensor's, as before
    assert len(set(act.channel_scales())) > 1 and "channel scales" in repr(act)
    y = act(x)
    assert torch.equal(y, per_feature_reference(act, x))
    # finer than the tensor's scale on ordinary features: closer to the exact function
    act_t = LUTSiLU()
    calibrate(nn.Sequential(act_t), [x], scales="tensor")
    assert act_t.channel_index.numel() == 0
    normal = [c for c in range(x.shape[-1]) if c not in (3, 7)]
    err_c = (y - F.silu(x))[..., normal].pow(2).mean()
    err_t = (act_t(x) - F.silu(x))[..., normal].pow(2).mean()
    assert err_c < 0.5 * err_t


def test_scales_argument_is_checked():
    with pytest.raises(ValueError, match="scales='row' is not allowed"):
        calibrate(nn.Sequential(LUTSiLU()), [torch.randn(2, 3)], scales="row")
    with pytest.raises(ValueError, match="fit='yes' is not allowed: use True or False"):
        calibrate(nn.Sequential(LUTSiLU()), [torch.randn(2, 3)], fit="yes")


def test_images_learned_scales_and_slope_gradients_keep_one_scale():
    images = nn.Sequential(LUTGELU())
    calibrate(images, [torch.randn(2, 3, 5, 5) * torch.tensor([1.0, 10.0, 0.1])[:, None, None]])
    assert images[0].channel_index.numel() == 0  # NCHW: the last dim is not a feature dim
    learned = nn.Sequential(LUTGELU(scale_mode="learned"))
    calibrate(learned, [outlier_batch()])
    assert learned[0].channel_index.numel() == 0
    slope = nn.Sequential(LUTGELU(grad="slope"))
    calibrate(slope, [outlier_batch()])
    assert slope[0].channel_index.numel() == 0
    changing = nn.Sequential(LUTGELU())  # a site that sees two feature counts
    calibrate(changing, [outlier_batch(shape=(2, 3, 8)), outlier_batch(shape=(2, 3, 9))])
    assert changing[0].channel_index.numel() == 0


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 70), features=st.integers(1, 40), seed=st.integers(0, 2**16),
       spread=st.floats(0.01, 300.0))
def test_compiled_kernel_equals_torch_reference(rows, features, seed, spread):
    g = torch.Generator().manual_seed(seed)
    act = LUTSiLU()
    x = torch.randn(rows, features, generator=g) * spread
    flat = x.view(-1)
    for i, v in enumerate((float("nan"), float("inf"), -float("inf"))[: flat.numel()]):
        flat[(i * 7919) % flat.numel()] = v
    index = torch.randint(0, len(act.table.scales), (features,), generator=g)
    d = act.scales.index_select(0, index)
    ref = lookup_channels(x, act.table_real, index, d, 8)
    fast = cpu_kernel.lookup_channels_cpu(x, act.table_real, index, d, -128, 127)
    if fast is None:
        pytest.skip("no C compiler: the torch ops serve")
    assert torch.equal(fast, ref)
    assert torch.equal(dispatch.lookup_channels(x, act.table_real, index, d, 8), ref)


def test_backward_is_each_features_straight_through_gradient():
    act = LUTSiLU()
    x = outlier_batch()
    calibrate(nn.Sequential(act), [x])
    xa = x.clone().requires_grad_(True)
    act(xa).sum().backward()
    parts = []
    for c in range(x.shape[-1]):
        xc = x[..., c].contiguous().requires_grad_(True)
        i = act.channel_index[c]
        act._lut(xc, i, act.scales[i]).sum().backward()
        parts.append(xc.grad)
    torch.testing.assert_close(xa.grad, torch.stack(parts, -1), rtol=1e-6, atol=1e-7)


def test_bfloat16_and_float64_inputs_use_each_features_scale():
    act = LUTSiLU()
    x = outlier_batch()
    calibrate(nn.Sequential(act), [x])
    for dt in (torch.bfloat16, torch.float64):
        xd = x.to(dt)
        assert torch.equal(act(xd), per_feature_reference(act, xd))


def test_state_dict_round_trip_and_bad_channel_index():
    x = outlier_batch()
    model = nn.Sequential(nn.Linear(24, 24), nn.SiLU())
    replace_ops(model)
    calibrate(model, [x])
    fresh = nn.Sequential(nn.Linear(24, 24), nn.SiLU())
    replace_ops(fresh)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))
    assert fresh[1].channel_scales() == model[1].channel_scales()
    state = model.state_dict()
    state["1.channel_index"] = torch.full((24,), 99)
    with pytest.raises(ValueError, match="channel_index"):
        fresh.load_state_dict(state)


def test_meta_device_model_keeps_its_channel_scales():
    x = outlier_batch()
    act = LUTSiLU()
    calibrate(nn.Sequential(act), [x])
    want = act(x)
    meta = act.to("meta").to_empty(device="cpu")
    assert torch.equal(meta(x), want)


# --- softmax: exp through the table after range reduction ------------------------------------

def test_softmax_keeps_small_weights_relatively_exact():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 256) * 4
    p, ref = LUTSoftmax(-1)(x), x.softmax(-1)
    z = x - x.amax(-1, keepdim=True)
    gone = z < -(softmax_mod.N_MAX + 1.01) * softmax_mod.LN2  # more than N_MAX + 1 halvings down: 0 by design
    assert gone.any() and torch.equal(p[gone], torch.zeros_like(p[gone]))
    kept = z > -softmax_mod.N_MAX * softmax_mod.LN2
    # every kept weight within ~1.5% of itself plus the 1/sum table's share (one factor per row)
    assert ((p - ref).abs() / ref)[kept].max() < 0.03
    assert torch.allclose(p.sum(-1), torch.ones(4, 8), atol=0.01)
    # the old [-8, 0] exp table had ~0.003 absolute error: weights far below the max now keep
    # their size instead of being that error
    small = kept & (ref < 1e-3)
    assert small.any() and ((p - ref).abs()[small] / ref[small]).max() < 0.03


def test_softmax_masks_and_empty_rows_are_exact_zeros():
    sm = LUTSoftmax(-1)
    x = torch.randn(3, 6)
    x[0, :2] = -math.inf
    x[1] = -math.inf
    x[2, 0] = -1e30
    p = sm(x)
    assert torch.equal(p[0, :2], torch.zeros(2)) and torch.equal(p[1], torch.zeros(6))
    assert p[2, 0] == 0 and torch.isfinite(p).all()
    xg = x.clone().requires_grad_(True)
    sm(xg)[0].sum().backward()
    assert torch.isfinite(xg.grad).all()


def test_softmax_exp_uses_the_scale_of_the_reduced_range_even_from_an_old_checkpoint():
    sm = LUTSoftmax(-1)
    want = covering_scale(sm.exp.table, softmax_mod.LN2)
    assert sm.exp.scale == want
    state = sm.state_dict()
    old = sm.exp.table.scales.index(covering_scale(sm.exp.table, 8.0))
    state["exp.scale_index"] = torch.tensor(old)  # a checkpoint from before range reduction
    sm.load_state_dict(state)
    assert sm.exp.scale == want


def _as_pickled_before_channels(m: nn.Module) -> nn.Module:
    """What torch.save(model) of an older release holds: no channel state in any activation, no
    load hook and the [-8, 0] exp scale in any softmax."""
    for sub in m.modules():
        if isinstance(sub, LUTActivation):
            del sub._buffers["channel_index"]
            for name in ("per_channel", "_channel_list", "_channels_differ", "_channel_amax", "_channels_ok",
                         "collect_samples", "_samples"):
                del sub.__dict__[name]
        if isinstance(sub, LUTSoftmax):
            sub._load_state_dict_post_hooks.clear()
            sub.exp.set_scale(covering_scale(sub.exp.table, 8.0))
    return m


def test_a_whole_model_pickled_by_an_older_release_loads_and_runs_as_a_new_one(tmp_path):
    x = outlier_batch()
    new = nn.Sequential(LUTSiLU(), LUTSoftmax(-1))
    old = _as_pickled_before_channels(nn.Sequential(LUTSiLU(), LUTSoftmax(-1)))
    torch.save(old, tmp_path / "old.pt")
    loaded = torch.load(tmp_path / "old.pt", weights_only=False)
    assert torch.equal(loaded(x), new(x))
    assert loaded[0].channel_index.numel() == 0 and loaded[1].exp.scale == new[1].exp.scale
    calibrate(loaded, [x])  # and it calibrates per feature like a new one
    calibrate(new, [x])
    assert loaded[0].channel_scales() == new[0].channel_scales()
    assert torch.equal(loaded(x), new(x))
    state = new.state_dict()  # the load hook is back: an old state dict's exp scale is replaced
    state["1.exp.scale_index"] = torch.tensor(new[1].exp.table.scales.index(covering_scale(new[1].exp.table, 8.0)))
    loaded.load_state_dict(state)
    assert loaded[1].exp.scale == new[1].exp.scale


def test_softmax_range_reduction_is_exp_of_r_times_a_power_of_two():
    sm = LUTSoftmax(-1)
    z = torch.tensor([[0.0, -0.5, -0.7, -1.2, -5.0, -16.0, -18.0]])
    n = torch.floor(-z / softmax_mod.LN2)
    e = sm.exp(z + n * softmax_mod.LN2) * torch.exp2(-n)
    e = torch.where(n > softmax_mod.N_MAX, torch.zeros_like(e), e)
    assert torch.equal(sm(z), e * sm.reciprocal(e.sum(-1, keepdim=True)))
    assert np.all(n.numpy()[0, :-1] <= softmax_mod.N_MAX) and n[0, -1] > softmax_mod.N_MAX


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), seed=st.integers(0, 2**16), spread=st.floats(0.1, 60.0),
       specials=st.integers(0, 4))
def test_softmax_kernel_equals_its_torch_ops(rows, cols, seed, spread, specials):
    """The compiled CPU pass (eager, no gradient) gives the torch ops' bits, masks and NaN rows included."""
    g = torch.Generator().manual_seed(seed)
    sm = LUTSoftmax(-1)
    x = torch.randn(rows, cols, generator=g) * spread
    flat = x.view(-1)
    for i, v in enumerate((-math.inf, math.nan, math.inf, -math.inf)[:specials]):
        flat[(i * 104729 + seed) % flat.numel()] = v
    with torch.no_grad():
        e = dispatch.softmax_numerators(x, sm.exp, softmax_mod.Z_MIN, -1.0 / softmax_mod.LN2, softmax_mod.LN2,
                                        softmax_mod.N_MAX)
        if e is None:
            pytest.skip("no C compiler: the torch ops serve")
        want = sm.numerators(x, -1)
    assert torch.equal(e, want)
    assert torch.equal(torch.isnan(sm(x)), torch.isnan(want * sm.reciprocal(want.sum(-1, keepdim=True))))

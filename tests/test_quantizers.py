"""The study's quantizers: every one puts values on its grid, learned ones learn, the choice is
a QuantSpec of quantize_ and bad choices get one-line errors."""
import copy

import pytest
import torch

from gqa_lut.errors import UsageError
from retnet_integration.layers import ActQuant, QuantLinear
from retnet_integration.model import RetNet, RetNetConfig
from retnet_integration.quantize import parse_mode, quantize_
from retnet_integration.quantizers import ACT_METHODS, QuantSpec, lsq, pact, parse_spec, tqt, weight_quant

SPECS = ["tqt", "tqt:channel", "pact:w8a6", "pact:channel", "lsq:w4a8:wlsq", "lsq:channel:wtensor",
         "minmax:w8a4", "minmax:channel", "percentile", "percentile:channel:w6a6"]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return RetNet(RetNetConfig(d_model=32, n_layers=1, n_heads=2, max_len=64))


def grid_of(q: ActQuant, x: torch.Tensor) -> torch.Tensor:
    """The scale each element of x is quantized with (per tensor or per last-dim channel)."""
    m = q.spec.act_method
    if m == "tqt":
        s = torch.exp2(torch.ceil(q.qparam.detach()) - (q.bits - 1))
    elif m == "pact":
        s = q.qparam.detach().abs() / (2 ** (q.bits - 1) - 1)
    elif m == "lsq":
        s = q.qparam.detach().abs()
    else:
        s = q.scale
    return s.expand(x.shape[-1]) if s.dim() else s


@pytest.mark.parametrize("spec", SPECS)
def test_values_lie_on_their_grid(net, spec):
    m = copy.deepcopy(net)
    info = quantize_(m, "all-lut", [torch.randint(0, 256, (4, 24))], spec=spec)
    s = parse_spec(spec)
    assert info["quantizer"] == s.label
    seen = []
    hooks = [a.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0], out)))
             for a in m.modules() if isinstance(a, ActQuant) and a.enabled and a.spec is not None]
    with torch.no_grad():
        m(torch.randint(0, 256, (2, 16)))
    for h in hooks:
        h.remove()
    assert seen
    for mod, x, y in seen:
        if mod.spec.act_method == "tqt" and mod.spec.act_granularity == "tensor":
            continue  # the fused TQT kernel: tested in test_ops_torch
        step = grid_of(mod, x).to(y.dtype)
        codes = y / step
        assert torch.allclose(codes, torch.round(codes), atol=1e-3), spec  # float32 division: stated tolerance
        lo, hi = -(2 ** (mod.bits - 1)), 2 ** (mod.bits - 1) - 1
        assert codes.min() >= lo - 1e-3 and codes.max() <= hi + 1e-3
    for lin in (x for x in m.modules() if isinstance(x, QuantLinear)):
        if lin.weight_spec is None:
            continue  # the fused per-channel kernel: tested in test_ops_torch
        wq = weight_quant(lin.weight, lin.weight_spec, getattr(lin, "weight_step", None)).detach()
        levels = [torch.unique(r).numel() for r in (wq if s.weight_granularity == "channel" else wq.reshape(1, -1))]
        assert max(levels) <= 2 ** s.weight_bits


def test_learned_parameters_learn():
    x = torch.randn(64, 16) * 3
    for fn, p0, kw in ((tqt, torch.tensor(1.0), {}), (pact, torch.tensor(2.0), {}), (lsq, torch.tensor(0.05), {"per_element": x.numel()})):
        p = p0.clone().requires_grad_()
        y = fn(x, p, 4, **kw)
        (y - x).pow(2).sum().backward()
        assert p.grad is not None and torch.isfinite(p.grad) and p.grad != 0, fn.__name__
    # and under QAT in the model: thresholds, clips and steps move
    torch.manual_seed(0)
    m = RetNet(RetNetConfig(d_model=32, n_layers=1, n_heads=2, max_len=64))
    for spec in ("tqt:channel", "lsq:wlsq", "pact"):
        mm = copy.deepcopy(m)
        quantize_(mm, "w8a8", [torch.randint(0, 256, (4, 24))], spec=spec)
        learned = {n: p.detach().clone() for n, p in mm.named_parameters() if "qparam" in n or "weight_step" in n}
        assert learned
        if spec == "pact":  # start with a clip below the data, so the clip's gradient is not 0
            for n, p in mm.named_parameters():
                if "qparam" in n:
                    p.data.mul_(0.5)
            learned = {n: p.detach().clone() for n, p in mm.named_parameters() if "qparam" in n}
        opt = torch.optim.SGD(mm.parameters(), lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            mm.loss(torch.randint(0, 256, (4, 17))).backward()
            opt.step()
        now = dict(mm.named_parameters())
        moved = sum(not torch.equal(v, now[n].detach()) for n, v in learned.items())
        assert moved >= len(learned) // 2, (spec, moved, len(learned))


def test_default_spec_is_the_fused_path(net):
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    calib = [torch.randint(0, 256, (4, 24))]
    quantize_(a, "all-lut", calib)
    quantize_(b, "all-lut", calib, spec=QuantSpec())
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(a(x)[0], b(x)[0])  # the same code path: identical bits


def test_bad_choices_get_one_line_errors():
    for text, words in [("adaround", "activation method 'adaround' is not one of"),
                        ("lsq:w1a8", "weight bits 1 is not allowed: use an integer from 2 to 16"),
                        ("lsq:w8a17", "activation bits 17"), ("pact:rows", "quantizer option 'rows'"),
                        ("tqt:wxa8", "bit widths 'wxa8'"), ("", "is empty")]:
        with pytest.raises(UsageError, match=words):
            parse_spec(text)
    with pytest.raises(UsageError, match="weight bits 1 in mode 'w1a8'"):
        parse_mode("w1a8")
    with pytest.raises(UsageError, match="activation bits 20"):
        parse_mode("w8a20")
    with pytest.raises(UsageError, match="LUT op 'relu'"):
        parse_mode("w4a8+relu")
    assert parse_mode("w4a8+all").lut_ops == parse_mode("all-lut").lut_ops
    assert set(ACT_METHODS) == {"tqt", "pact", "lsq", "minmax", "percentile"}

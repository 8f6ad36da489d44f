"""GPU path (Triton kernel): bit-exact with the CPU path. Skipped cleanly without CUDA."""
import numpy as np
import pytest
import torch

from gqa_lut.evaluator import evaluate
from gqa_lut.quantization import int_range
from ops.nn import LUTActivation, LUTGELU, LUTSiLU
from ops.tables import TABLE_DIR, default_table

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SHIPPED = sorted(p.stem for p in TABLE_DIR.glob("*.json"))


@pytest.mark.parametrize("op", SHIPPED)
def test_every_code_every_scale_matches_numpy(op):
    from ops.kernels import triton_lut
    assert triton_lut.AVAILABLE, "Triton should be there on a CUDA machine"
    t = default_table(op)
    m = LUTActivation(t).cuda()
    qmin, qmax = int_range(t.input_bits)
    codes = np.arange(qmin, qmax + 1)
    for d in t.scales:
        m.set_scale(d)
        x = torch.tensor(codes * 2.0 ** -d, dtype=torch.float32, device="cuda")
        assert np.array_equal(m(x).cpu().numpy(), evaluate(t, codes, d).astype(np.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (7, 13), (3, 5, 1000), (1 << 20,)])
def test_random_inputs_equal_cpu(dtype, shape):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 5).to(dtype)
    special = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)
    x.view(-1)[:3] = special[: x.numel()]
    for m in (LUTGELU(), LUTSiLU()):
        cpu = m(x)
        gpu = m.cuda()(x.cuda()).cpu()
        assert gpu.dtype == dtype and torch.equal(cpu, gpu)


def test_backward_on_gpu_matches_cpu():
    x = torch.randn(10000) * 3
    m = LUTGELU()
    xc = x.clone().requires_grad_(True)
    m(xc).sum().backward()
    xg = x.cuda().requires_grad_(True)
    m.cuda()(xg).sum().backward()
    assert torch.allclose(xc.grad, xg.grad.cpu(), atol=1e-6)


def test_learned_scale_on_gpu():
    m = LUTSiLU(scale_mode="learned").cuda()
    x = torch.randn(4096, device="cuda") * 5
    loss = (m(x) - torch.nn.functional.silu(x)).pow(2).mean()
    loss.backward()
    assert torch.isfinite(m.log2_threshold.grad)


def random_table(rng: np.random.Generator):
    from gqa_lut.table import OutputFormat, Table
    pbits, qbits = int(rng.integers(4, 12)), int(rng.integers(4, 12))
    n = int(rng.integers(2, min(40, 1 << qbits)))
    plo, phi = int_range(pbits)
    qlo, qhi = int_range(qbits)
    scales = sorted(rng.choice(np.arange(-3, 9), size=int(rng.integers(1, 4)), replace=False).tolist())
    bps = {d: np.sort(rng.choice(np.arange(qlo - 3, qhi + 4), size=n - 1, replace=False)) for d in scales}
    out = OutputFormat(int(rng.integers(4, 16)), int(rng.integers(-2, 10))) if rng.random() < 0.5 else None
    return Table(op="gelu", range=(-1.0, 1.0), slopes=rng.integers(plo, phi + 1, n), intercepts=rng.integers(plo, phi + 1, n),
                 breakpoints=bps, frac_bits=int(rng.integers(0, 10)), param_bits=pbits, input_bits=qbits, output=out)


def test_kernel_random_tables_every_code():
    rng = np.random.default_rng(1)
    for _ in range(40):
        t = random_table(rng)
        m = LUTActivation(t).cuda()
        qmin, qmax = int_range(t.input_bits)
        codes = np.arange(qmin - 2, qmax + 3)
        for d in t.scales:
            m.set_scale(d)
            x = torch.tensor(codes * 2.0 ** -d, dtype=torch.float32, device="cuda")
            want = evaluate(t, np.clip(codes, qmin, qmax), d).astype(np.float32)
            assert np.array_equal(m(x).cpu().numpy(), want), (t.to_json(), d)


def test_replace_ops_puts_drop_ins_on_the_models_device():
    from ops import replace_ops
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.LayerNorm(8), torch.nn.SiLU()).cuda()
    replace_ops(model)
    assert all(b.is_cuda for b in model.buffers())
    assert model(torch.randn(4, 8, device="cuda")).is_cuda


def test_call_sites_on_gpu_match_the_cpu_tables_and_compile():
    """A converted HF-class model on CUDA: sites created on the model's device, the LUT outputs
    equal to the CPU path's on the same inputs, torch.compile in one graph and close to eager.
    Not bit-exact here, unlike on the CPU: inductor fuses the float arithmetic around the tables
    (RMSNorm's mean of squares, rotary) and rounds it differently on CUDA, so an input near a
    code boundary can land on the neighbouring code (one output LSB)."""
    pytest.importorskip("transformers")
    from bench.model_zoo import build, output
    from ops import calibrate, replace_ops

    model, batch = build("llama")
    model = model.cuda()
    replace_ops(model)
    to_cuda = lambda b: {k: v.cuda() for k, v in b.items()}  # noqa: E731
    calibrate(model, [to_cuda(batch(s)) for s in range(2)], forward=lambda m, b: output(m, b))
    assert all(t.is_cuda for t in model.buffers())
    x = to_cuda(batch(9))
    with torch.no_grad():
        eager = output(model, x)
        compiled = output(torch.compile(model, fullgraph=True), x)
    rel = float((compiled - eager).norm() / eager.norm())
    print(f"compiled vs eager on CUDA: rel-L2 {rel:.2e}")
    assert rel < 1e-2
    site = model.model.layers[0].mlp.act_fn  # the SiLU drop-in: same table, same inputs, same bits
    v = torch.randn(1 << 16) * 4
    assert torch.equal(site(v.cuda()).cpu(), site.cpu()(v))


def test_custom_op_backward_on_gpu_equals_cpu_for_every_op():
    for op in ("gelu", "swish", "tanh", "softplus", "hsigmoid"):
        m = LUTActivation(default_table(op))
        x = torch.randn(4096) * 3
        xc = x.clone().requires_grad_(True)
        m(xc).sum().backward()
        xg = x.cuda().requires_grad_(True)
        m.cuda()(xg).sum().backward()
        assert torch.allclose(xc.grad, xg.grad.cpu(), rtol=1e-5, atol=1e-6), op
        m.cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad", ["exact", "slope"])
@pytest.mark.parametrize("op", SHIPPED)
def test_backward_kernel_equals_cpu_for_every_table(op, grad, dtype):
    """The fused backward kernel (derivative in registers, or the segment's slope) against the
    CPU path: equal within float32 rounding of erf/exp/tanh (libdevice vs the CPU's), and
    bit-equal for the slope (no transcendental)."""
    from ops.kernels import triton_lut
    t = default_table(op)
    m = LUTActivation(t, grad=grad)
    from ops.kernels.derivatives import DERIVATIVE_NUMBERS
    named = m.derivative if grad == "exact" else ""
    # a derivative the kernel has no number for (erf's, log's) takes the torch path: same check
    assert triton_lut.backward_usable(torch.empty(1, device="cuda"), named) == (named in DERIVATIVE_NUMBERS)
    lo, hi = t.range
    torch.manual_seed(0)
    x = (lo + (hi - lo) * torch.rand(1 << 16) * 1.2 - 0.1 * (hi - lo)).to(dtype)
    x[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)
    g = torch.randn(x.shape).to(dtype)
    xc = x.clone().requires_grad_(True)
    m(xc).backward(g)
    xg = x.cuda().requires_grad_(True)
    m.cuda()(xg).backward(g.cuda())
    if grad == "slope":
        assert torch.equal(xc.grad, xg.grad.cpu())
    else:
        # absolute 1e-5: tanh-GELU's derivative cancels (1 - t^2 times up to ~8); one ulp of
        # libdevice's tanh against the CPU's moved it by 6e-7 at x = -4.1 on the H100
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-5)
        assert torch.allclose(xc.grad.float(), xg.grad.cpu().float(), **tol), op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_tqt_kernels_equal_cpu(bits, dtype):
    from ops.nn.fake_quant import tqt_quantize, weight_fake_quant
    torch.manual_seed(0)
    x = (torch.randn(100_003) * 3).to(dtype)
    x[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)
    g = torch.randn(x.shape).to(dtype)
    outs = {}
    for dev in ("cpu", "cuda"):
        lt = torch.tensor(1.3, device=dev, requires_grad=True)
        xr = x.detach().to(dev).clone().requires_grad_(True)  # a leaf on each device
        y, d = tqt_quantize(xr, lt, bits, -40, 40)
        y.backward(g.to(dev))
        outs[dev] = (y.detach().cpu(), d.cpu(), xr.grad.cpu(), lt.grad.cpu())
    (yc, dc, gxc, glc), (yg, dg, gxg, glg) = outs["cpu"], outs["cuda"]
    assert torch.equal(yc, yg) and torch.equal(dc, dg) and torch.equal(gxc, gxg)
    assert torch.allclose(glc, glg, rtol=1e-4, atol=1e-3)  # a sum of 1e5 terms in another order
    w = torch.randn(96, 300)
    assert torch.equal(weight_fake_quant(w, bits), weight_fake_quant(w.cuda(), bits).cpu())


def test_all_lut_training_step_captures_as_one_cuda_graph():
    """A whole QAT step of the quantized RetNet (every LUT op, W8A8) captures in a CUDA graph:
    no host sync anywhere in forward, backward or the update. Replays train the model."""
    from bench.qat_speed import captured, make_step, retnet_case, retnet_loss
    build, batch = retnet_case("cuda", quick=True)
    model = build("all-lut")
    step = make_step(model, retnet_loss, "cuda", capturable=True)
    before = [p.detach().clone() for p in model.parameters()]
    replay = captured(step, batch)
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad", ["exact", "slope"])
@pytest.mark.parametrize("op", ["rsqrt", "reciprocal"])
def test_fused_range_reduction_equals_cpu_at_every_magnitude(op, grad, dtype):
    """The one-kernel RangeReducedLUT (exponent bits, table, exact 2^-k) against the torch ops
    on the CPU: forward bit for bit from 1e-38 to 3e38 and at NaN, +-inf, 0 and negatives;
    the straight-through gradient within float32 rounding (0 where the input was cut)."""
    from ops.nn import RangeReducedLUT
    torch.manual_seed(0)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e-39, 1.17549435e-38, 3.4e38,
                            2.0 ** 127, 2.0 ** -126, 1.0, 4.0, 3.9999998])
    v = torch.cat([special, torch.exp(torch.randn(20000) * 20)]).to(dtype)
    g = torch.randn(v.shape).to(dtype)
    r = RangeReducedLUT(op, grad=grad)
    vc = v.clone().requires_grad_(True)
    yc = r(vc)
    yc.backward(g)
    r = r.cuda()
    vg = v.cuda().requires_grad_(True)
    assert r._fused(vg.detach()) is not None  # the one-kernel path serves this input
    yg = r(vg)
    yg.backward(g.cuda())
    same = dict(rtol=0, atol=0, equal_nan=True)  # bit for bit, NaN (propagated) included
    torch.testing.assert_close(yc.detach(), yg.detach().cpu(), **same)
    torch.testing.assert_close(r(v.cuda()).cpu(), yc.detach(), **same)  # the no-grad launch too
    assert torch.isnan(yc[0]) and torch.isfinite(yc[1:]).all()
    tol = dict(rtol=1e-5, atol=0) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=0)
    assert torch.allclose(vc.grad.float(), vg.grad.cpu().float(), **tol)


def test_cuda_operator_is_built_and_equals_the_triton_kernels():
    """Where nvcc is there, the C++ operator serves eager calls (ops/kernels/cuda_kernel.py); against the
    Triton kernels: the same forward bits and backward within float32 rounding, for aligned,
    unaligned (a view one element in), strided, channels-last and empty inputs, every dtype."""
    from ops.kernels import cuda_kernel, triton_lut
    from ops.kernels.dispatch import lookup_backward
    if cuda_kernel._nvcc() is None:
        pytest.skip("no nvcc: the Triton kernels serve CUDA")
    fast = cuda_kernel.op()
    assert fast is not None, cuda_kernel.status()
    torch.manual_seed(0)
    for m in (LUTGELU().cuda(), LUTSiLU(grad="slope").cuda()):
        qmin, qmax = int_range(m.table.input_bits)
        kind = triton_lut.DERIVATIVE_NUMBERS[m.derivative if m.grad == "exact" else ""]
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            base = (torch.randn(2, 8, 9, 7, device="cuda") * 4).to(dtype)
            base.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")], device="cuda").to(dtype)
            for x in (base, base.view(-1)[1:], base.transpose(1, 3), base.to(memory_format=torch.channels_last),
                      base[:, :0]):
                xr = x.detach().requires_grad_(True)
                y = fast(xr, m.table_real, m.slopes_real, m.breakpoints, m.scale_index, m.d_current, qmin, qmax, kind)
                want = triton_lut.lookup_triton(x, m.table_real, m.scale_index, m.d_current, qmin, qmax)
                assert y.dtype == dtype and y.shape == x.shape and torch.equal(y, want)
                g = torch.randn(x.shape, device="cuda").to(dtype)
                y.backward(g)
                gw = lookup_backward(g, x, m.slopes_real, m.breakpoints, m.scale_index, m.d_current,
                                     m.table.input_bits, m.derivative if m.grad == "exact" else "")
                tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
                assert torch.allclose(xr.grad.float(), gw.float(), **tol), (dtype, x.shape, x.stride())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["layer", "layer-noaffine", "group", "group-padded"])
def test_fused_norm_kernels_follow_the_torch_ops(case, dtype, monkeypatch):
    """ops/kernels/triton_norm.py against the torch ops of ops.nn on the same CUDA inputs: outputs
    and every gradient (input, weight, bias) within 2e-3 relative L2 in float32, 8e-3 in
    bfloat16 (a bfloat16 ulp is 2^-8 relative: a float32 difference in the last bits rounds to
    the neighbouring bfloat16 now and then). The row sums run in another order, so an occasional
    variance crosses a table code; the rsqrt table's slope and exact derivative both checked."""
    from ops.kernels import triton_norm
    from ops.nn import LUTGroupNorm, LUTLayerNorm
    torch.manual_seed(0)
    if case.startswith("layer"):
        m = LUTLayerNorm(256, elementwise_affine=case == "layer").cuda()
        x = torch.randn(8, 37, 256, device="cuda") * 3 + 1
    else:
        groups, c = (4, 256) if case == "group" else (3, 96)
        m = LUTGroupNorm(groups, c).cuda()
        x = torch.randn(300, c, device="cuda") * 2 - 0.5
    for p in m.parameters():
        with torch.no_grad():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() and p is m.weight else 0.0))
    x = x.to(dtype)
    g = torch.randn(x.shape, device="cuda").to(dtype)
    for grad in ("exact", "slope"):
        m.rsqrt.lut.grad = grad
        runs = []
        for on in (True, False):
            monkeypatch.setattr(triton_norm, "ENABLED", on)
            xr = x.detach().requires_grad_(True)
            for p in m.parameters():
                p.grad = None
            y = m(xr)
            y.backward(g)
            runs.append([y.detach(), xr.grad] + [p.grad for p in m.parameters()])
        fused, torch_ops = runs
        assert fused[0].dtype == dtype and fused[0].shape == x.shape
        tol = 2e-3 if dtype == torch.float32 else 8e-3
        for a, b in zip(fused, torch_ops):
            assert _rel(a, b) < tol, (case, grad, dtype, _rel(a, b))


def test_cuda_fake_quant_operators_equal_the_triton_kernels():
    """The C++ TQT and weight fake-quant (ops/kernels/csrc/lut_cuda.cu) against ops/kernels/triton_quant.py: the
    same y, d, input gradient and weight bits; the threshold's gradient within float32 rounding
    of a sum in another order. Aligned, unaligned (a view one element in) and empty inputs."""
    from ops.kernels import cuda_kernel, triton_quant
    if cuda_kernel._nvcc() is None:
        pytest.skip("no nvcc: the Triton kernels serve CUDA")
    ext = cuda_kernel.extension()
    assert ext is not None, cuda_kernel.status()
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        base = (torch.randn(70_001, device="cuda") * 3).to(dtype)
        base[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")], device="cuda").to(dtype)
        for x in (base, base[1:], base[:0]):
            for bits in (8, 4):
                lt = torch.tensor(1.3, device="cuda", requires_grad=True)
                xr = x.detach().requires_grad_(True)
                y, d = ext.tqt(xr, lt, bits, -40, 40)
                yw, dw = triton_quant.tqt_forward(x, lt.detach(), bits, -40, 40)
                assert torch.equal(y, yw) and torch.equal(d, dw) and y.dtype == dtype
                g = torch.randn(x.shape, device="cuda").to(dtype)
                y.backward(g)
                gxw, glw = triton_quant.tqt_backward(g, x, dw, bits)
                assert torch.equal(xr.grad, gxw)
                assert torch.allclose(lt.grad, glw, rtol=1e-4, atol=1e-3)
    w = torch.randn(96, 300, device="cuda", requires_grad=True)
    for bits in (8, 4):
        assert torch.equal(ext.weight_fake_quant(w, bits), triton_quant.weight_fake_quant(w.detach(), bits))
    ext.weight_fake_quant(w, 8).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through


# --- the fused attention with the LUT softmax (ops/kernels/triton_attention.py) ----------------
def _attention_inputs(dtype, B=2, H=4, HK=2, L=200, S=200, D=64, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, L, D, device="cuda", generator=gen).to(dtype)
    k = torch.randn(B, HK, S, D, device="cuda", generator=gen).to(dtype)
    v = torch.randn(B, HK, S, D, device="cuda", generator=gen).to(dtype)
    return q, k, v


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _both(site, q, k, v, grad_out=None, **kw):
    """(output, grads) of the fused path and of the written-out path on the same inputs."""
    from ops.convert.call_sites import sdpa, sdpa_written_out
    from ops.kernels import triton_attention
    outs = []
    for fn in (sdpa, sdpa_written_out):
        qi, ki, vi = (t.detach().clone().requires_grad_(grad_out is not None) for t in (q, k, v))
        calls = triton_attention.CALLS
        o = fn(site, qi, ki, vi, **kw)
        if fn is sdpa:
            assert triton_attention.CALLS == calls + 1, "sdpa on CUDA should have run the fused kernel"
        grads = ()
        if grad_out is not None:
            o.backward(grad_out)
            grads = (qi.grad, ki.grad, vi.grad)
        outs.append((o.detach(), grads))
    return outs


def test_fused_attention_is_bit_exact_where_scores_and_sums_are_exact():
    """Integer scores (exact in any summation order) and V = I: the output is P itself, and
    every table input, table output, row sum and reciprocal is the written-out path's."""
    from ops.nn import LUTSoftmax
    site = LUTSoftmax(-1).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    L = D = 64
    q = torch.randint(-3, 4, (2, 4, L, D), device="cuda", generator=gen).float()
    k = torch.randint(-3, 4, (2, 2, L, D), device="cuda", generator=gen).float() / 8
    v = torch.eye(L, device="cuda").expand(2, 2, L, D).contiguous()
    for causal in (False, True):
        (fused, _), (written, _) = _both(site, q, k, v, is_causal=causal, enable_gqa=True, scale=0.125)
        assert torch.equal(fused, written)


# the fused path against the written-out one, relative L2 of the output and of each gradient:
# the sums run in another order and P is rounded to the dtype after P V (written out: before),
# so a score on a code boundary can take the next table entry (measured on an H200 in
# tests/test_gpu.py: see bench/NOTES-gpu.md)
ATTN_TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["causal", "bool-mask", "float-mask", "gqa-causal", "scale-0.1", "cross"])
@pytest.mark.parametrize("D", [64, 128])
def test_fused_attention_matches_written_out(dtype, case, D):
    from ops.nn import LUTSoftmax
    site = LUTSoftmax(-1).cuda()
    L, S = (150, 333) if case == "cross" else (257, 257)
    q, k, v = _attention_inputs(dtype, L=L, S=S, D=D, HK=2 if case.startswith("gqa") else 4)
    kw = {"enable_gqa": True}
    gen = torch.Generator(device="cuda").manual_seed(1)
    if case in ("causal", "gqa-causal"):
        kw["is_causal"] = True
    elif case == "bool-mask":
        kw["attn_mask"] = torch.rand(2, 1, L, S, device="cuda", generator=gen) > 0.3
    elif case == "float-mask":
        kw["attn_mask"] = (torch.randn(L, S, device="cuda", generator=gen) * 2).to(dtype)
    elif case == "scale-0.1":
        kw["scale"] = 0.1
    g = torch.randn(q.shape, device="cuda", generator=gen).to(dtype)
    (fo, fg), (wo, wg) = _both(site, q, k, v, grad_out=g, **kw)
    tol = ATTN_TOL[dtype]
    assert fo.dtype == dtype and fo.shape == wo.shape
    assert _rel(fo, wo) < tol
    for name, a, b in zip("qkv", fg, wg):
        assert a.dtype == dtype and a.shape == b.shape
        assert _rel(a, b) < tol, name


def test_fused_attention_empty_rows_give_zero_and_finite_gradients():
    """A row whose every key is masked weighs nothing: output 0, gradients finite, as written out."""
    from ops.nn import LUTSoftmax
    site = LUTSoftmax(-1).cuda()
    q, k, v = _attention_inputs(torch.bfloat16, L=70, S=90)
    mask = torch.ones(70, 90, dtype=torch.bool, device="cuda")
    mask[5] = False
    g = torch.randn_like(q)
    (fo, fg), (wo, wg) = _both(site, q, k, v, grad_out=g, attn_mask=mask, enable_gqa=True)
    assert torch.equal(fo[:, :, 5], torch.zeros_like(fo[:, :, 5]))
    assert all(torch.isfinite(t).all() for t in fg)


def test_fused_attention_memory_is_linear_in_length():
    """Training through the fused kernel keeps no L x S tensor: at 8192 tokens the written-out
    scores alone would be 8 heads x 8192^2 x 2 bytes = 1 GiB. What it keeps (q, k, v, their
    gradients and the kernel's float32 accumulators, about 89 MiB at 8192 on an H200) doubles
    with the length instead of growing fourfold."""
    from ops.convert.call_sites import sdpa
    from ops.nn import LUTSoftmax
    site = LUTSoftmax(-1).cuda()
    peaks = []
    for L in (4096, 8192):
        q, k, v = (t.requires_grad_() for t in _attention_inputs(torch.bfloat16, B=1, H=8, HK=8, L=L, S=L))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        sdpa(site, q, k, v, is_causal=True).sum().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        del q, k, v
    assert peaks[1] < 256 * 2**20, peaks
    assert peaks[1] < 2.5 * peaks[0], peaks


def test_dropout_and_tracing_take_the_written_out_path():
    from ops.convert.call_sites import sdpa
    from ops.kernels import triton_attention
    from ops.nn import LUTSoftmax
    site = LUTSoftmax(-1).cuda()
    q, k, v = _attention_inputs(torch.float16, L=64, S=64)
    calls = triton_attention.CALLS
    torch.manual_seed(0)
    out = sdpa(site, q, k, v, dropout_p=0.5, enable_gqa=True)
    assert triton_attention.CALLS == calls and torch.isfinite(out).all()


def test_converted_llama_runs_its_attention_fused():
    """replace_ops on a Hugging Face Llama: each layer's SDPA call site runs the fused kernel in
    eager forward and backward, close to the same model with the kernel switched off."""
    transformers = pytest.importorskip("transformers")
    from ops import calibrate, replace_ops
    from ops.kernels import triton_attention
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).cuda()
    replace_ops(model)
    tokens = torch.randint(0, 256, (2, 300), device="cuda")
    calibrate(model, [tokens], forward=lambda m, t: m(input_ids=t))
    calls = triton_attention.CALLS
    fused = model(input_ids=tokens).logits
    assert triton_attention.CALLS == calls + 2
    triton_attention.ENABLED = False
    try:
        written = model(input_ids=tokens).logits
    finally:
        triton_attention.ENABLED = True
    assert _rel(fused, written) < 2e-3
    fused.float().pow(2).mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())

"""replace_ops on real models: every non-linear call through a table (counted), the probe, the
report, saving and loading, compile, export and ONNX."""
import io
import math
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.model_zoo import HF_MODELS, MODELS, build, float_calls, output
from ops import LUTActivation, LUTRMSNorm, calibrate, load_converted, replace_ops
from ops.convert.call_sites import sdpa
from ops.nn import LUTSoftmax
from ops.convert.report import _bypass
from gqa_lut.evaluator import covering_scale
from ops.tables import default_table

# the kinds of call a converted model may leave float, each with (a fragment of) the reason its
# report gives. How many such calls a family makes is its code's business (transformers 5.25's
# Mamba computes exp(A_log) twice per layer, 5.17's once): the test counts them against the report
PARAMETER = "input is a parameter"
ALLOWED_FLOAT = {"mamba": {"exp": PARAMETER}, "rwkv": {"exp": PARAMETER},  # exp(A_log), the time decay: constants
                 # soft-caps tanh(x / cap) whose inputs reach < 8 codes at the finest step: exact, with a reason
                 "gemma2": {"tanh": "codes"}, "xlstm": {"tanh": "codes"},
                 "whisper": {"gelu": "codes"}}  # its random-init conv stem's second GELU sees inputs below 0.1
# rel-L2 of the outputs against float after calibration, random-init small models (measured
# 0.006 .. 0.14 by bench.model_zoo; ViT's random LayerNorms sit near its worst)
MAX_REL = 0.25
N_CALIB = 2  # calibration batches
WARN_REL = 0.15  # above it the report must carry a resolution note


def convert(name):
    model, batch = build(name)
    test = batch(99)
    with torch.no_grad():
        ref = output(model, test)
    report = replace_ops(model)
    calibrate(model, [batch(s) for s in range(N_CALIB)], forward=lambda m, b: output(m, b))
    return model, batch, test, ref, report


HEAVY = {"xlstm", "bart", "whisper", "wav2vec2_conformer", "qwen3_moe", "rwkv"}  # over ~3 s each on 2 cores


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in MODELS])
def test_every_nonlinear_call_runs_through_a_table(name):
    if name in HF_MODELS:
        pytest.importorskip("transformers")
    model, batch, test, ref, report = convert(name)
    left = float_calls(model, test)
    rows = report.rows()
    floats = [r for r in rows if not r.through]
    allowed = ALLOWED_FLOAT.get(name, {})
    assert set(left) == set(allowed), report  # the listed kinds stay float, nothing else does
    assert all(r.kind in allowed and allowed[r.kind] in r.reason for r in floats), report
    # every float call of one forward is a listed row's: the rows counted N_CALIB forwards each
    per_forward = Counter()
    for r in floats:
        per_forward[r.kind] += r.calls // N_CALIB
    assert dict(left) == dict(per_forward), report
    assert all(r.calls % N_CALIB == 0 for r in floats)
    assert report.coverage().startswith(f"{len(rows) - len(floats)} of {len(rows)} call sites through tables")
    with torch.no_grad():
        out = output(model, test)
    rel = float((out - ref).norm() / ref.norm())
    assert 1e-4 < rel < MAX_REL  # tables in place, model not broken
    assert rel < WARN_REL or any(n.startswith("resolution") for n in report.notes), report  # or its report says why


def test_report_prints_a_coverage_line_and_a_row_per_site():
    pytest.importorskip("transformers")
    _, _, _, _, report = convert("llama")
    text = str(report)
    assert text.splitlines()[0] == "9 of 9 call sites through tables (18 of 18 calls at calibration)"
    assert "model.layers.0.mlp.act_fn" in text and "LlamaRMSNorm" in text
    assert "model.layers.0.self_attn.lut_calls.sdpa_0" in text


class ChannelsFirstRMSNorm(nn.Module):
    """Named like the *RMSNorm family, but normalises dim 1 of NCHW: the adapter's guess is wrong."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        v = x.pow(2).mean(1, keepdim=True)
        return x * torch.rsqrt(v + self.variance_epsilon) * self.weight[:, None, None]


def test_probe_undoes_a_swap_that_changes_the_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), ChannelsFirstRMSNorm(8))
    x = torch.randn(2, 3, 8, 8)
    ref = m(x)
    report = replace_ops(m)
    assert isinstance(m[1], LUTRMSNorm)  # by its name
    calibrate(m, [x])
    assert isinstance(m[1], ChannelsFirstRMSNorm)  # the probe gave it back...
    assert "probe: output differs" in report.kept()[0].reason
    assert [r.kind for r in report.rows()] == ["rsqrt"]  # ...and its rsqrt is a call site
    out = m(x).detach()
    assert 1e-5 < float((out - ref.detach()).norm() / ref.norm()) < 0.02


def test_sdpa_decomposition_matches_torch_in_every_form():
    torch.manual_seed(0)
    site = LUTSoftmax()
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    bool_mask = torch.rand(5, 7) > 0.3
    bool_mask[:, 0] = True
    float_mask = torch.randn(2, 1, 5, 7)
    cases = [dict(is_causal=True), dict(attn_mask=bool_mask), dict(attn_mask=float_mask, scale=0.3), {}]
    with _bypass(site):  # exact functions in place of the tables: the arithmetic alone
        for kw in cases:
            ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
            mine = sdpa(site, q, k, v, enable_gqa=True, **kw)
            assert (mine - ref).abs().max() < 1e-5, kw
    with torch.no_grad():  # and with the 8-bit exp and 1/x tables, within a few percent
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        mine = sdpa(site, q, k, v, is_causal=True, enable_gqa=True)
        assert float((mine - ref).norm() / ref.norm()) < 0.03


class Functional(nn.Module):
    """Every spelling: functional, tensor methods, in-place, softmax with dtype and no dim."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        a = F.gelu(h) + F.gelu(h, approximate="tanh") + F.silu(h) + h.sigmoid() + torch.tanh(h)
        a = a + F.hardswish(h) + F.hardsigmoid(h) + F.softplus(h) + F.softplus(h, beta=2.0)
        b = h.clone()
        b.sigmoid_()
        s = F.softmax(h, dim=-1, dtype=torch.float64).float() + h.softmax(-1) + F.softmin(h, -1)
        n = F.layer_norm(h, (8,)) + F.rms_norm(h, (8,), eps=1e-6) + F.group_norm(h[..., None], 2)[..., 0]
        r = torch.rsqrt(h.abs() + 1) + torch.exp(h - h.amax(-1, keepdim=True))
        return a + b + s + n + r


def test_every_spelling_is_a_call_site_and_close_to_float():
    torch.manual_seed(0)
    m = Functional()
    x = torch.randn(16, 8)
    ref = m(x)
    report = replace_ops(m)
    calibrate(m, [x])
    kinds = sorted(r.kind for r in report.rows())
    assert kinds == sorted(["gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "softplus",
                            "softplus", "sigmoid", "softmax", "softmax", "softmax", "layer_norm", "rms_norm",
                            "group_norm", "rsqrt", "exp"])
    assert all(r.through for r in report.rows())
    assert float_calls_plain(m, x) == {}
    out = m(x)
    assert 1e-4 < float((out - ref).norm() / ref.norm()) < 0.02


def float_calls_plain(m, x):
    from bench.model_zoo import CountFloatCalls

    with torch.no_grad(), CountFloatCalls() as c:
        m(x)
    return dict(c.calls)


def test_calibration_keeps_range_reduced_tables_and_needs_data():
    pytest.importorskip("transformers")
    model, batch = build("gpt2")
    replace_ops(model)
    model(**batch(0))  # meet the call sites at their constructed scales
    before = {n: m.scale for n, m in model.named_modules() if isinstance(m, LUTActivation) and m.range_reduced}
    assert len(before) == 5 + 2 * 2  # 5 norms' rsqrt; exp and 1/x in 2 attentions
    calibrate(model, [batch(s) for s in range(3)], forward=lambda m, b: output(m, b))
    assert {n: m.scale for n, m in model.named_modules() if n in before} == before
    with pytest.raises(ValueError, match="no batches"):
        calibrate(model, [])


# --- bad input ---------------------------------------------------------------------------------

def test_nothing_to_convert_says_so():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    report = replace_ops(m)
    m(torch.randn(2, 4))
    assert report.coverage().startswith("nothing to convert")


def test_a_table_for_the_wrong_op_is_refused():
    with pytest.raises(ValueError, match=r"tables\['gelu'\] is a table for 'tanh'"):
        replace_ops(nn.Sequential(nn.GELU()), tables={"gelu": default_table("tanh")})


def test_integer_inputs_to_a_converted_model_stay_float_with_a_reason():
    class IntExp(nn.Module):
        def forward(self, x):
            return torch.exp(x) + torch.sigmoid(x.float())

    m = IntExp()
    report = replace_ops(m)
    y = m(torch.tensor([-1, -2, 0]))
    assert torch.allclose(y[:1], torch.exp(torch.tensor(-1.0)) + torch.sigmoid(torch.tensor(-1.0)), atol=0.02)
    rows = {r.kind: r for r in report.rows()}
    assert rows["sigmoid"].through and not rows["exp"].through
    assert rows["exp"].reason == "non-float input: kept float"


# --- save, load, compile, export -----------------------------------------------------------------

def converted_gpt2():
    pytest.importorskip("transformers")
    model, batch = build("gpt2")
    replace_ops(model)
    calibrate(model, [batch(s) for s in range(N_CALIB)], forward=lambda m, b: output(m, b))
    return model, batch


def test_state_dict_is_tensors_only_and_recreates_the_call_sites():
    model, batch = converted_gpt2()
    sd = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert any(".lut_calls.sdpa_0." in k for k in sd)
    fresh, _ = build("gpt2", seed=1)
    replace_ops(fresh)  # no forward yet: no call sites
    fresh.load_state_dict(sd, strict=True)
    x = batch(7)
    with torch.no_grad():
        assert torch.equal(output(fresh, x), output(model, x))


def test_safetensors_and_save_pretrained(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model, batch = converted_gpt2()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.save_file({k: v.clone() for k, v in sd.items()}, tmp_path / "m.safetensors")
    back = safetensors.load_file(tmp_path / "m.safetensors")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    model.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()
    import transformers
    transformers.logging.set_verbosity_error()
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()  # float, tables dropped
    report = load_converted(again, tmp_path / "hf")  # one call: convert, then the saved tables and scales
    test = batch(5)
    with torch.no_grad():
        assert torch.equal(output(again, test), output(model, test))
    assert all(r.through for r in report.rows()) and len(report.rows()) == len(model._gqa_lut_report.rows())
    with pytest.raises(ValueError, match="is not a file"):
        load_converted(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf"), tmp_path / "nowhere")


def test_torch_save_of_the_whole_model():
    model, batch = converted_gpt2()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    x = batch(3)
    with torch.no_grad():
        assert torch.equal(output(back, x), output(model, x))
    assert str(back._gqa_lut_report).splitlines()[0] == str(model._gqa_lut_report).splitlines()[0]


def test_a_float_checkpoint_loads_strictly_into_a_converted_model():
    model, batch = converted_gpt2()
    float_model, _ = build("gpt2", seed=5)
    scales = {n: m.scale for n, m in model.named_modules() if isinstance(m, LUTActivation)}
    model.load_state_dict(float_model.state_dict(), strict=True)
    assert {n: m.scale for n, m in model.named_modules() if isinstance(m, LUTActivation)} == scales
    assert torch.equal(model.lm_head.weight, float_model.lm_head.weight)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        h = self.norm(nn.functional.gelu(self.a(x)))
        return torch.softmax(self.b(h), -1) + F.silu(h).mean()


def small_converted():
    torch.manual_seed(0)
    m = Small()
    x = torch.randn(8, 16)
    replace_ops(m)
    calibrate(m, [x])
    return m, x


@pytest.mark.slow
def test_compile_is_one_graph_and_bit_exact_with_eager_forward_and_backward():
    # the tables themselves: every input code, compiled == eager bit for bit (no float math
    # before the lookup but the exact x * 2^d)
    g, codes = gelu_every_code()
    assert torch.equal(torch.compile(g, fullgraph=True)(codes), g(codes))
    # a model: one graph (fullgraph: any break is an error). Inductor computes the float ops
    # around the tables (linear, the norm's mean) in its own kernels, whose rounding may differ
    # from eager's on another CPU and move an input to the next code: a stated tolerance
    m, x = small_converted()
    x = x.requires_grad_(True)
    eager = m(x)
    (g_eager,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(x)
    (g_comp,) = torch.autograd.grad(out.sum(), x)
    assert float((out - eager).norm() / eager.norm()) < 1e-2
    assert torch.allclose(g_comp, g_eager, rtol=1e-5, atol=1e-6)  # the backward's own float math


def test_compile_of_multihead_attention_runs_its_softmax_through_the_tables():
    """nn.MultiheadAttention's composite runs as a copy whose attention calls the router; its
    globals are a module of their own, so torch.compile can guard them (under F's name dynamo
    failed with an internal error). Compiled within a stated tolerance of eager, which itself
    differs from the float model (the tables are on)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        ref = model(x)
    replace_ops(model)
    calibrate(model, [x])
    with torch.no_grad():
        eager = model(x)
        out = torch.compile(model, backend="eager")(x)  # the failure was in dynamo: no codegen needed
    assert not torch.equal(eager, ref)
    assert float((out - eager).norm() / eager.norm()) < 1e-2


@pytest.mark.slow
def test_compiled_model_with_a_float_call_site_compiles_once():
    """A site left float (exp of a parameter) kept a per-call counter on a module: dynamo guards
    module integers, so every forward recompiled (RWKV: 47 s a forward). And the eager backend
    runs the traced graph's calls under the mode again: they met new sites (an uncalibrated
    exp_2 at the graph's code). Now a second and third forward reuse the first graph, and the
    model's sites are the ones calibration met."""
    m = ExpOf()
    replace_ops(m)
    calibrate(m, [torch.linspace(-3.0, 0.0, 64)])
    sites = [n for n, _ in m.named_modules()]
    x = torch.linspace(-2.0, 1.0, 32)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="eager")
    with torch.no_grad():
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            y, a = compiled(x)
            compiled(x)
    want_y, want_a = m(x)
    assert [n for n, _ in m.named_modules()] == sites
    assert torch.allclose(y, want_y, rtol=1e-6, atol=0) and torch.allclose(a, want_a, rtol=1e-6, atol=0)


class Pow2(nn.Module):
    """exp2 and log2 on activations (the model's own code), beside a swapped activation and a
    helper of the package that calls them on activations for its own range reduction (what
    the drop-ins do under the interception: not the model's op, not to be listed)."""

    def __init__(self):
        super().__init__()
        self.act = nn.GELU()

    def forward(self, x):
        from ops.nn.range_reduced import octave
        h = self.act(x)
        return torch.exp2(h) + torch.log2(h.abs() + 1) + 2 ** torch.tensor(3.0) + octave(h.abs() + 1)


def test_exp2_and_log2_of_the_models_own_code_are_listed_float_and_the_drop_ins_are_not():
    from bench.model_zoo import float_calls
    m = Pow2()
    report = replace_ops(m, scale_mode="learned")
    calibrate(m, [torch.randn(4, 16)])
    rows = [r for r in report.rows() if not r.through]
    assert sorted(r.kind for r in rows) == ["exp2", "log2"], [(r.kind, r.reason) for r in rows]
    assert all("has no table" in r.reason for r in rows)
    # what a mode outside the model sees left float is what the report names, no more
    assert dict(float_calls(m, {"x": torch.randn(4, 16)})) == {"exp2": 1, "log2": 1}


def gelu_every_code():
    g = nn.Sequential(nn.GELU())
    replace_ops(g, calls=False)
    d = g[0].scale
    return g, torch.arange(-130, 131, dtype=torch.float32) * 2.0 ** -d  # every code, and beyond


def test_export_has_one_node_per_table():
    m, x = small_converted()
    ep = torch.export.export(m, (x,))
    luts = [n for n in ep.graph.nodes if n.op == "call_function" and "gqa_lut.lookup" in str(n.target)]
    # gelu, the norm's rsqrt, softmax's exp and 1/x, silu
    assert len(luts) == 5
    assert torch.equal(ep.module()(x), m(x))


def test_onnx_matches_eager_on_every_code_and_on_a_model(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from ops.convert.onnx_export import export_onnx

    def run(model, x):
        path = export_onnx(model, (x,), tmp_path / "m.onnx")
        sess = ort.InferenceSession(str(path))
        return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])

    g, codes = gelu_every_code()
    assert torch.equal(run(g, codes), g(codes).detach())  # every code: bit for bit
    # a model: onnxruntime's own linear and mean kernels may round differently (stated tolerance)
    m, x = small_converted()
    y, ref = run(m, x), m(x).detach()
    assert float((y - ref).norm() / ref.norm()) < 1e-2


def test_masked_softmax_positions_weigh_exactly_zero():
    site = LUTSoftmax()
    x = torch.tensor([[0.5, -math.inf, 1.0], [-math.inf, -math.inf, -math.inf]])
    y = site(x)
    assert y[0, 1] == 0 and torch.equal(y[1], torch.zeros(3))


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm, as Hugging Face writes it: scales by 1 + weight (weight starts at 0)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


def test_gemma_style_norm_is_adapted_with_its_offset_and_passes_the_probe():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), GemmaRMSNorm(8))
    m[1].weight.data.normal_(0, 0.5)
    x = torch.randn(16, 8)
    ref = m(x).detach()
    report = replace_ops(m)
    calibrate(m, [x])
    assert isinstance(m[1], LUTRMSNorm) and m[1].weight_offset == 1.0 and not report.kept()
    assert float((m(x).detach() - ref).norm() / ref.norm()) < 0.01


def test_a_hf_attention_kernel_no_call_site_sees_is_switched_to_the_lut_one():
    pytest.importorskip("transformers")
    model, batch = build("llama")
    model.set_attn_implementation("flex_attention")  # its softmax lives inside a kernel
    report = replace_ops(model)
    assert model.config._attn_implementation == "gqa_lut"
    assert "attention: flex_attention -> gqa_lut" in str(report)
    calibrate(model, [batch(0)], forward=lambda m, b: output(m, b))
    assert float_calls(model, batch(1)) == {}
    assert sum(r.kind == "sdpa" and r.through for r in report.rows()) == 2


def test_recorded_calls_give_the_same_model_and_scope_the_interception():
    pytest.importorskip("transformers")
    model, batch = build("llama")
    twin, _ = build("llama")
    for m, calls in ((model, True), (twin, "recorded")):
        replace_ops(m, calls=calls)
        calibrate(m, [batch(0)], forward=lambda mm, b: output(mm, b))
    report = twin._gqa_lut_report
    assert report.router.scope == "recorded" and "interception runs inside 2 modules only" in str(report)
    x = batch(4)
    with torch.no_grad():
        assert torch.equal(output(twin, x), output(model, x))
    assert float_calls(twin, x) == {}
    with pytest.raises(ValueError, match="calls='everything' is not allowed"):
        replace_ops(nn.Sequential(nn.GELU()), calls="everything")


class SoftmaxByHand(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        e = torch.exp(h - h.amax(-1, keepdim=True))
        return e / e.sum(-1, keepdim=True)


def test_a_float_checkpoint_loads_strictly_into_every_kind_of_call_site():
    torch.manual_seed(0)
    m = SoftmaxByHand()
    x = torch.randn(4, 8)
    report = replace_ops(m)
    calibrate(m, [x])
    assert [r.kind for r in report.rows()] == ["exp", "div"] and all(r.through for r in report.rows())
    before = m(x)
    m.load_state_dict(SoftmaxByHand().state_dict(), strict=True)  # new weights, same tables
    assert not torch.equal(m(x), before) and [r.through for r in report.rows()] == [True, True]


class ExpOf(nn.Module):
    """exp of an activation (xLSTM's exponential gates, a decay) and of a parameter."""

    def __init__(self):
        super().__init__()
        self.log_a = nn.Parameter(torch.tensor([0.5, -1.0]))

    def forward(self, x):
        return torch.exp(x), -torch.exp(self.log_a)


def test_exp_call_sites_are_right_for_either_sign_and_far_below_the_tables_range():
    m = ExpOf()
    report = replace_ops(m)
    calibrate(m, [torch.linspace(-3.0, 0.0, 64)])  # only x <= 0 while calibrating
    x = torch.cat([torch.linspace(-30.0, 12.0, 4001), torch.tensor([math.inf, -math.inf])])
    y, a = m(x)
    want = torch.exp(x)
    # the table's relative precision everywhere (r on the 1/64 grid of scale 6: up to 0.8% from
    # rounding r, plus the table's error): exp(-30) ~ 1e-13 is not 0, exp(12) is not exp(1)
    rel = ((y[:-2] - want[:-2]) / want[:-2]).abs()
    assert float(rel.max()) < 0.03 and float(rel.mean()) < 0.01, (float(rel.max()), float(rel.mean()))
    assert y[-2] == math.inf and y[-1] == 0.0 and torch.isnan(m(torch.tensor([math.nan]))[0]).all()
    assert torch.allclose(a, -torch.exp(m.log_a), rtol=0, atol=0)  # the parameter stays float
    rows = {r.kind: r for r in report.rows()}
    float_rows = [r for r in report.rows() if not r.through]
    assert len(float_rows) == 1 and "parameter" in float_rows[0].reason and rows["exp"].kind == "exp"
    xg = torch.tensor([-50.0, -1.0, 0.5, 80.0], requires_grad=True)  # exp(80) overflows float32 too
    m(xg)[0][:3].sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad[3] == 0


def test_an_exp_site_checkpoint_from_before_range_reduction_loads_strictly():
    m = ExpOf()
    replace_ops(m)
    calibrate(m, [torch.linspace(-3.0, 0.0, 64)])
    site = m.lut_calls.exp_0
    state = m.state_dict()
    state["lut_calls.exp_0.use_table"] = torch.tensor(True)  # what those checkpoints held
    t = site.lut.table
    state["lut_calls.exp_0.lut.scale_index"] = torch.tensor(t.scales.index(covering_scale(t, 8.0)))
    fresh = ExpOf()
    replace_ops(fresh)
    fresh.load_state_dict(state, strict=True)
    x = torch.linspace(-10.0, 5.0, 101)
    assert torch.equal(fresh(x)[0], m(x)[0])
    assert fresh.lut_calls.exp_0.lut.scale == covering_scale(t, math.log(2.0))


class Mixed(nn.Module):
    """A module swap (GELU), a call site in the root (F.silu) and a child with both."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.act = nn.GELU()
        self.block = Block()

    def forward(self, x):
        return F.silu(self.act(self.lin(x))) + self.block(x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.act = nn.SiLU()

    def forward(self, x):
        return torch.sigmoid(self.act(self.lin(x)))


def test_replace_ops_refuses_unknown_arguments_and_values():
    with pytest.raises(ValueError, match="unknown argument 'bits'"):
        replace_ops(Mixed(), bits=4)
    with pytest.raises(ValueError, match="scale_mode='tqt' is not allowed"):
        replace_ops(Mixed(), scale_mode="tqt")
    with pytest.raises(ValueError, match="filter_fn=3 is not allowed"):
        replace_ops(Mixed(), filter_fn=3)


def test_learned_scales_hold_for_module_swaps_and_call_sites_alike():
    torch.manual_seed(0)
    m = Mixed()
    report = replace_ops(m, scale_mode="learned")
    calibrate(m, [torch.randn(16, 8)])
    assert all(r.through for r in report.rows()) and len(report.rows()) == 4  # the probe kept every swap
    learned = {n for n, _ in m.named_parameters() if n.endswith("log2_threshold")}
    assert learned == {"act.log2_threshold", "block.act.log2_threshold", "lut_calls.silu_0.log2_threshold",
                       "block.lut_calls.sigmoid_0.log2_threshold"}
    m(torch.randn(16, 8)).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in m.named_parameters() if n in learned)


def test_filter_fn_keeps_a_module_and_its_own_calls_float(tmp_path):
    torch.manual_seed(0)
    m = Mixed()
    x = torch.randn(16, 8)
    with torch.no_grad():
        ref_block = m.block(x)
    report = replace_ops(m, filter_fn=lambda mod, name: not name.startswith("block"))
    calibrate(m, [x])
    assert isinstance(m.act, LUTActivation) and isinstance(m.block.act, nn.SiLU)
    rows = {r.name: r for r in report.rows()}
    assert rows["lut_calls.silu_0"].through
    assert not rows["block:sigmoid_0"].through and "filter_fn" in rows["block:sigmoid_0"].reason
    with torch.no_grad():
        assert torch.equal(m.block(x), ref_block)  # the excluded block is the float one
    torch.save(m, tmp_path / "m.pt")  # a lambda filter does not make the model unpicklable
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(again(x), m(x))


def test_calibrate_takes_dict_batches_without_forward():
    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, input_ids, attention_mask=None):
            h = F.gelu(self.lin(input_ids))
            return h if attention_mask is None else h * attention_mask

    m = Keywords()
    report = replace_ops(m)
    calibrate(m, [{"input_ids": torch.randn(4, 8), "attention_mask": torch.ones(4, 8)}])
    assert [r.through for r in report.rows()] == [True]


class Powers(nn.Module):
    """The calls a Gemma RMSNorm, a GLU, an MoE renormalisation and a log-domain op make."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 16)

    def forward(self, x):
        h = self.lin(x)
        ms = h.pow(2).mean(-1, keepdim=True) + 1e-6
        normed = h * torch.pow(ms, -0.5) + h * ms ** -0.5 + torch.sqrt(ms) + ms ** 0.5
        gated = F.glu(h, dim=-1)
        w = torch.sigmoid(h)
        share = w * torch.reciprocal(w.sum(-1, keepdim=True))
        scale = torch.sqrt(torch.tensor(16.0))  # a constant: not a site, not listed
        return (normed.sum(-1) + gated.sum(-1) + share.sum(-1) + torch.log1p(w).sum(-1) / scale
                + torch.expm1(-w).sum(-1))  # expm1: no table (exp(x) - 1 would lose its small-x digits)


def test_powers_glu_and_reciprocal_go_through_tables_and_the_rest_is_listed():
    torch.manual_seed(0)
    m = Powers()
    x = torch.randn(32, 8)
    with torch.no_grad():
        ref = m(x)
    report = replace_ops(m)
    calibrate(m, [x])
    rows = report.rows()
    kinds = sorted(r.kind for r in rows if r.through)
    assert kinds == ["glu", "log1p", "reciprocal", "rsqrt", "rsqrt", "sigmoid", "sqrt", "sqrt"], kinds
    floats = [r for r in rows if not r.through]
    assert [(r.kind, r.reason[:20]) for r in floats] == [("expm1", "expm1 has no table (")]
    assert dict(float_calls(m, {"x": x})) == {"expm1": 1}  # nothing else reaches a mode outside the model
    with torch.no_grad():
        y = m(x)
    assert float((y - ref).norm() / ref.norm()) < 0.02
    assert report.coverage().startswith("8 of 9 call sites through tables (8 of 9 calls at calibration)")


def test_sqrt_and_reciprocal_sites_keep_torchs_special_values():
    class Special(nn.Module):
        def forward(self, x):
            return torch.sqrt(x), torch.reciprocal(x)

    m = Special()
    replace_ops(m)
    x = torch.tensor([-4.0, -0.5, 0.0, 0.25, 9.0, 1e6])
    calibrate(m, [x])
    s, r = m(x)
    assert torch.isnan(s[:2]).all() and s[2] == 0 and r[2] == math.inf
    assert torch.allclose(s[3:], torch.sqrt(x[3:]), rtol=0.02) and torch.allclose(r[[0, 1, 3, 4, 5]],
                                                                                   1 / x[[0, 1, 3, 4, 5]], rtol=0.02)


RECURRENT = [(nn.LSTM, {}), (nn.LSTM, {"proj_size": 5}), (nn.GRU, {}), (nn.RNN, {})]


@pytest.mark.parametrize("cls,kw", RECURRENT, ids=["lstm", "lstm_proj", "gru", "rnn"])
@pytest.mark.parametrize("layout", ["seq_first", "batch_first_bidirectional_2_layers"])
def test_recurrent_layers_run_their_gates_through_tables(cls, kw, layout):
    """The drop-in's recurrence with exact functions equals torch's fused kernel within float
    rounding (1e-5), every output and state; with the tables it stays close, gradients flow,
    and a float checkpoint loads into it strictly."""
    from ops.convert.report import _bypass
    from torch.utils._pytree import tree_flatten

    torch.manual_seed(0)
    deep = layout != "seq_first"
    m = nn.Sequential(cls(7, 9, num_layers=2 if deep else 1, batch_first=deep, bidirectional=deep, **kw))
    float_state = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(3, 11, 7)
    h0 = torch.randn((4 if deep else 1), 11 if not deep else 3, kw.get("proj_size", 9))
    c0 = torch.randn(h0.shape[:-1] + (9,))
    hx = (h0, c0) if cls is nn.LSTM else h0
    with torch.no_grad():
        ref, _ = tree_flatten((m(x), m[0](x, hx)))
    report = replace_ops(m)
    calibrate(m, [x])
    assert type(m[0]).__name__ == f"LUT{cls.__name__}" and isinstance(m[0], cls)
    assert report.coverage().startswith("1 of 1 call sites through tables (1 of 1 calls at calibration)")
    with torch.no_grad(), _bypass(m):
        exact, _ = tree_flatten((m(x), m[0](x, hx)))
    with torch.no_grad():
        tables, _ = tree_flatten((m(x), m[0](x, hx)))
    for r, e, t in zip(ref, exact, tables):
        assert r.shape == e.shape and torch.allclose(e, r, atol=1e-5, rtol=1e-5)
        assert 0 < float((t - r).norm() / r.norm()) < 0.1
    xr = x.clone().requires_grad_(True)
    m(xr)[0].sum().backward()
    assert torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.parameters())
    m.load_state_dict(float_state, strict=True)


def test_recurrent_drop_ins_take_unbatched_inputs_and_refuse_packed_sequences():
    from ops.convert.report import _bypass

    torch.manual_seed(0)
    m = nn.Sequential(nn.GRU(4, 6))
    x = torch.randn(5, 4)  # unbatched: (L, H_in)
    with torch.no_grad():
        ref = m(x)
    report = replace_ops(m)
    calibrate(m, [x])
    with torch.no_grad(), _bypass(m):
        out = m(x)
    assert out[0].shape == ref[0].shape and torch.allclose(out[0], ref[0], atol=1e-5)
    assert torch.allclose(out[1], ref[1], atol=1e-5)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 4), [5, 3])

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 6)

        def forward(self, p):
            return self.rnn(p)[0].data

    pm = Packed()
    report = replace_ops(pm)
    calibrate(pm, [packed])  # the probe: the drop-in cannot take a PackedSequence, the float LSTM stays
    [row] = report.rows()
    assert isinstance(pm.rnn, nn.LSTM) and type(pm.rnn) is nn.LSTM and not row.through
    assert "PackedSequence" in row.reason and "kept float" in row.reason


def test_a_recurrent_layer_left_out_by_ops_is_a_float_row():
    m = nn.Sequential(nn.LSTM(4, 8, batch_first=True))
    report = replace_ops(m, ops=["swish"])
    rows = report.rows()
    assert len(rows) == 1 and not rows[0].through and "fused RNN kernel" in rows[0].reason
    assert not report.rows() or replace_ops(nn.Sequential(nn.RNN(4, 4, nonlinearity="relu"))).rows() == []


class LogDomain(nn.Module):
    """The log-domain calls of xLSTM-style gating, CTC/LM heads and Gaussian tails."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 16)

    def forward(self, x):
        h = self.lin(x)
        return (F.logsigmoid(h), torch.log(h.abs() + 0.1), torch.log1p(h.abs()), torch.logsumexp(h, -1),
                F.log_softmax(h, dim=-1), h.log_softmax(-1), torch.erf(h), torch.special.erfc(h))


def test_log_domain_and_erf_calls_go_through_tables():
    """log, log1p (the log table after range reduction), logsumexp and log_softmax (the exp table
    after the max, the sum, the log table), logsigmoid (-softplus(-x)), erf and erfc (the erf
    table): each a site, each within the table's error of torch's result."""
    torch.manual_seed(0)
    m = LogDomain()
    x = torch.randn(32, 8) * 2
    with torch.no_grad():
        ref = m(x)
    report = replace_ops(m)
    calibrate(m, [x])
    rows = report.rows()
    assert all(r.through for r in rows) and len(rows) == 8, report
    assert sorted(r.kind for r in rows) == ["erf", "erfc", "log", "log1p", "log_softmax", "log_softmax",
                                            "logsigmoid", "logsumexp"]
    assert float_calls_plain(m, x) == {}
    with torch.no_grad():
        out = m(x)
    for o, r in zip(out, ref):  # absolute: an 8-bit table of ln on [1, 2) is within 1/128 of it
        assert o.shape == r.shape and float((o - r).abs().max()) < 0.03, (o - r).abs().max()


def test_log_and_logsumexp_sites_keep_torchs_special_values():
    from ops.convert.call_sites import make_site
    from ops.tables import default_table

    tables = {"exp": default_table("exp"), "log": default_table("log")}
    log = make_site("log", tables)
    v = torch.tensor([0.0, -1.0, math.inf, math.nan, 1e-30, 3.0, 1e30])
    y = log(v)
    assert y[0] == -math.inf and torch.isnan(y[1]) and y[2] == math.inf and torch.isnan(y[3])
    assert torch.allclose(y[4:], torch.log(v[4:]), atol=0.01)
    lse = make_site("logsumexp", tables)
    z = torch.randn(4, 50) * 5
    z[0] = -math.inf  # a row of nothing: -inf, as torch's
    got = lse(z, -1)
    assert got[0] == -math.inf and torch.allclose(got[1:], torch.logsumexp(z[1:], -1), atol=0.01)
    assert lse(z, (0, 1)).shape == torch.logsumexp(z, (0, 1)).shape


def test_a_swapped_module_below_resolution_runs_float_without_becoming_a_call_site():
    """The exact function of a swapped module runs out of sight of the call-site mode: its F.gelu
    once became a call site of the Sequential around it, during the Sequential's iteration."""
    m = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    with torch.no_grad():
        m[0].weight.mul_(1e-4)
        m[0].bias.zero_()
    x = torch.randn(4, 8)
    report = replace_ops(m)
    calibrate(m, [x])
    y = m(x)
    assert torch.equal(y, F.gelu(m[0](x))) and len(report.rows()) == 1 and not hasattr(m, "lut_calls")


class TwoPaths(nn.Module):
    """A swapped module on a code path the model never takes (as Mamba2's gated norm)."""

    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.SiLU(), nn.GELU()

    def forward(self, x):
        return self.used(x) + torch.tanh(x) + torch.tanh(2 * x)


def test_the_report_counts_calls_and_leaves_out_what_never_ran():
    m = TwoPaths()
    report = replace_ops(m)
    assert len(report.rows()) == 2  # before calibration: every swap (the call sites come with it)
    calibrate(m, [torch.randn(8, 4) for _ in range(3)])
    rows = {r.name: r.calls for r in report.rows()}
    assert rows == {"used": 3, "lut_calls.tanh_0": 3, "lut_calls.tanh_1": 3}
    assert report.idle() == ["unused"]
    assert report.coverage() == "3 of 3 call sites through tables (9 of 9 calls at calibration)"
    assert "not run at calibration (not counted): unused" in str(report)
    assert report.to_dict()["idle"] == ["unused"]
    assert report.router.counts is None  # nothing counted after calibration


class Recurrent(nn.Module):
    """A Python loop over time steps, as RWKV and xLSTM run their recurrences."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.zeros_like(x[:, 0])
        for t in range(x.shape[1]):
            h = torch.tanh(self.lin(x[:, t]) + h) * torch.sigmoid(x[:, t])
        return h


def test_a_loop_has_one_site_per_code_location_whatever_its_length():
    torch.manual_seed(0)
    m = Recurrent()
    report = replace_ops(m)
    calibrate(m, [torch.randn(4, 32, 8)])
    assert sorted(r.kind for r in report.rows()) == ["sigmoid", "tanh"]
    keys = set(m.state_dict())
    long = torch.randn(4, 256, 8)
    y = m(long)
    assert set(m.state_dict()) == keys and len(report.rows()) == 2  # no new sites at 256 steps
    fresh = Recurrent()
    replace_ops(fresh)
    fresh.load_state_dict(m.state_dict(), strict=True)
    assert torch.equal(fresh(long), y)


class SoftCap(nn.Module):
    """Gemma2's logit soft-capping: tanh(x / cap) * cap."""

    def __init__(self, cap: float):
        super().__init__()
        self.cap = cap

    def forward(self, x):
        return torch.tanh(x / self.cap) * self.cap


def test_a_site_below_the_tables_resolution_runs_float_and_the_report_says_so(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 32) * 0.05  # x / 30 stays below half of the finest step (1/128)
    m = SoftCap(30.0)
    report = replace_ops(m)
    calibrate(m, [x])
    assert torch.equal(m(x), SoftCap(30.0)(x))  # not all zeros: the exact function
    [row] = report.rows()
    assert not row.through and "resolution" in row.reason and "1 of 1" not in report.coverage()
    assert any("runs float" in n for n in report.notes) and "runs float" in str(report)
    fresh = SoftCap(30.0)
    replace_ops(fresh)
    fresh(x)
    fresh.load_state_dict(m.state_dict(), strict=True)  # the decision is saved
    assert torch.equal(fresh(x), m(x))
    coarse = SoftCap(30.0)  # inputs up to ~0.15: a few codes only, warned about but through the table
    report = replace_ops(coarse)
    calibrate(coarse, [torch.randn(64, 32) * 1.5])
    assert report.rows()[0].through and any("warning" in n and "reach only" in n for n in report.notes)
    calibrate(coarse, [torch.randn(64, 32) * 100])  # calibrating again on wide inputs clears it
    assert not any(n.startswith("resolution") for n in report.notes)


def test_division_by_a_tensor_normaliser_goes_through_the_reciprocal_table():
    class Renorm(nn.Module):  # an MoE's top-k weights over their sum, in place and not
        def forward(self, w):
            w = torch.sigmoid(w)
            a = w / w.sum(-1, keepdim=True)
            b = w.clone()
            b /= b.sum(-1, keepdim=True)
            return a + b + w / 4.0 + w / torch.tensor(2.0) + torch.div(w, 3, rounding_mode="floor")

    torch.manual_seed(0)
    m = Renorm()
    x = torch.randn(16, 4)
    ref = m(x)
    report = replace_ops(m)
    calibrate(m, [x])
    assert sorted(r.kind for r in report.rows()) == ["div", "div", "sigmoid"]
    assert dict(float_calls(m, {"w": x})) == {}
    assert torch.allclose(m(x), ref, rtol=0.03, atol=0.01)
    from ops.convert.call_sites import _signed_reciprocal
    r = _signed_reciprocal(m.lut_calls.div_0, torch.tensor([0.0, -0.0, -4.0]))  # 1/+-0 as torch's
    assert r[0] == math.inf and r[1] == -math.inf and abs(float(r[2]) + 0.25) < 0.005

"""`replace_ops` on the models people use. Run: python -m bench.model_zoo [--models a,b] [--reps N]

Small random-init configs of 28 Hugging Face families (decoders: GPT-2, Llama, Mistral, Qwen2/3,
Gemma2/3, Phi-3, GPT-NeoX, OPT, BLOOM, Falcon; mixtures of experts: Qwen3-MoE, Mixtral; state-space and
recurrent: Mamba (its plain-PyTorch path), RWKV, xLSTM; encoders: BERT, DeBERTa-v2, DistilBERT,
ELECTRA, ViT, CLIP's vision and text towers; encoder-decoders: T5, BART; audio: Whisper,
wav2vec2-Conformer), local mimics of timm's LayerNorm2d and GroupNormAct and of a MobileNetV3 block
(no timm/torchvision: their wheels need a CUDA torch here), nn.TransformerEncoder and an nn.LSTM
language model. Per model: the non-linear calls one forward of the float model makes, the calls
per forward through tables after conversion (the report's counts at calibration), the call
sites through tables and which stay float (why), the calls a counting TorchFunctionMode
still sees in float after conversion, the rel-L2 of the output against float after
calibration, and the forward time against float and against the module-swap path alone
(`calls=False`) and of `calls="recorded"` (interception only inside the modules calibration
met calls in), all in one process; with --compile also the torch.compile'd models (the
interception traced once: no per-call Python). JSON to bench/results/model_zoo.json
(model_zoo_compiled.json with --compile).
"""
from __future__ import annotations

import argparse
import copy
from collections import Counter
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from bench._common import machine, names_in, positive_int, print_table, timer, timers_interleaved, write_results
from ops import calibrate, replace_ops
from ops.convert.call_sites import KIND_OF, NO_TABLE, POW2, constant_input, pow2_of_activation, table_call

Inputs = dict[str, torch.Tensor]


# --- local mimics (timm-style and torchvision-style blocks) ----------------------------------

class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: LayerNorm over channels of an NCHW tensor (permutes in forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GroupNormAct(nn.GroupNorm):
    """timm's GroupNormAct: GroupNorm then an activation module, in one forward."""

    def __init__(self, channels: int, groups: int = 4):
        super().__init__(groups, channels)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class MobileNetV3Block(nn.Module):
    """Inverted residual with hardswish and a hardsigmoid squeeze-excite (torchvision's)."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.expand = nn.Conv2d(c, 4 * c, 1)
        self.bn = nn.BatchNorm2d(4 * c)
        self.dw = nn.Conv2d(4 * c, 4 * c, 3, padding=1, groups=4 * c)
        self.se = SqueezeExcite(4 * c)
        self.project = nn.Conv2d(4 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.hardswish(self.bn(self.expand(x)))
        h = self.se(F.hardswish(self.dw(h)))
        return x + self.project(h)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = LayerNorm2d(16)
        self.block = MobileNetV3Block(16)
        self.gn = GroupNormAct(16)
        self.head = nn.Linear(16, 10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.gn(self.block(self.norm(self.stem(pixel_values))))
        return self.head(h.mean((2, 3)))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, activation="gelu", batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 100)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(input_ids)))


class Recurrent(nn.Module):
    """An nn.LSTM language model: its gates run inside torch's fused kernel, so it is swapped for
    the drop-in that runs them step by step through tables (ops/nn/recurrent.py)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        self.lstm = nn.LSTM(64, 64, num_layers=2, batch_first=True)
        self.act = nn.GELU()
        self.head = nn.Linear(64, 100)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.lstm(self.embed(input_ids))[0]))


# --- the zoo ---------------------------------------------------------------------------------

def _hf(kind: str) -> tuple[nn.Module, str]:
    import transformers as T
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    causal = dict(small, num_key_value_heads=2, vocab_size=100)
    table: dict[str, Callable[[], tuple[nn.Module, str]]] = {
        "bert": lambda: (T.BertForMaskedLM(T.BertConfig(vocab_size=100, **small)), "ids"),
        "gpt2": lambda: (T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100,
                                                        n_positions=64, bos_token_id=0, eos_token_id=0)), "ids"),
        "vit": lambda: (T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, **small)), "pixels"),
        "llama": lambda: (T.LlamaForCausalLM(T.LlamaConfig(**causal)), "ids"),
        "mistral": lambda: (T.MistralForCausalLM(T.MistralConfig(**causal)), "ids"),
        "qwen2": lambda: (T.Qwen2ForCausalLM(T.Qwen2Config(**causal)), "ids"),
        "t5": lambda: (T.T5ForConditionalGeneration(T.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4,
                                                               d_kv=16, vocab_size=100,
                                                               feed_forward_proj="gated-gelu")), "t5"),
        "mamba": lambda: (T.MambaForCausalLM(T.MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=100,
                                                           state_size=8)), "ids"),
        "gemma2": lambda: (T.Gemma2ForCausalLM(T.Gemma2Config(**causal, head_dim=16, final_logit_softcapping=30.0,
                                                              attn_logit_softcapping=50.0)), "ids"),
        "gemma3": lambda: (T.Gemma3ForCausalLM(T.Gemma3TextConfig(**causal, head_dim=16)), "ids"),
        "qwen3": lambda: (T.Qwen3ForCausalLM(T.Qwen3Config(**causal, head_dim=16)), "ids"),
        "qwen3_moe": lambda: (T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**causal, head_dim=16, num_experts=4,
                                                                     num_experts_per_tok=2, moe_intermediate_size=32)),
                              "ids"),
        "mixtral": lambda: (T.MixtralForCausalLM(T.MixtralConfig(**causal, num_local_experts=4, num_experts_per_tok=2)),
                            "ids"),
        "phi3": lambda: (T.Phi3ForCausalLM(T.Phi3Config(**causal, pad_token_id=0)), "ids"),
        "gpt_neox": lambda: (T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=100, **small)), "ids"),
        "opt": lambda: (T.OPTForCausalLM(T.OPTConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
                                                     max_position_embeddings=64)), "ids"),
        "bloom": lambda: (T.BloomForCausalLM(T.BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=4)), "ids"),
        "falcon": lambda: (T.FalconForCausalLM(T.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                              num_attention_heads=4)), "ids"),
        "rwkv": lambda: (T.RwkvForCausalLM(T.RwkvConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                        attention_hidden_size=64, intermediate_size=128,
                                                        context_length=64)), "ids"),
        "xlstm": lambda: (T.xLSTMForCausalLM(T.xLSTMConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                           num_heads=4, qk_dim_factor=1.0)), "ids"),
        "deberta_v2": lambda: (T.DebertaV2Model(T.DebertaV2Config(vocab_size=100, **small)), "ids"),
        "distilbert": lambda: (T.DistilBertModel(T.DistilBertConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4,
                                                                    hidden_dim=128)), "ids"),
        "electra": lambda: (T.ElectraModel(T.ElectraConfig(vocab_size=100, embedding_size=64, **small)), "ids"),
        "bart": lambda: (T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64)), "t5"),
        "clip_vision": lambda: (T.CLIPVisionModel(T.CLIPVisionConfig(image_size=32, patch_size=8, **small)), "pixels"),
        "clip_text": lambda: (T.CLIPTextModel(T.CLIPTextConfig(vocab_size=100, max_position_embeddings=64, **small)),
                              "ids"),
        "whisper": lambda: (T.WhisperForConditionalGeneration(T.WhisperConfig(
            vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
            max_source_positions=32, max_target_positions=64, decoder_start_token_id=0, pad_token_id=0)), "audio"),
        "wav2vec2_conformer": lambda: (T.Wav2Vec2ConformerModel(T.Wav2Vec2ConformerConfig(
            **small, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4)), "wave"),
    }
    # inputs (build): 8 x 64 tokens (GPT-2's 64 positions), 8 x 3 x 32 x 32 images, 8 x 16 mel bins x 64
    # frames (Whisper), or 8 x 1600 samples of audio (wav2vec2)
    return table[kind]()


HF_MODELS = ("bert", "gpt2", "vit", "llama", "mistral", "qwen2", "t5", "mamba", "gemma2", "gemma3", "qwen3",
             "qwen3_moe", "mixtral", "phi3", "gpt_neox", "opt", "bloom", "falcon", "rwkv", "xlstm", "deberta_v2",
             "distilbert", "electra", "bart", "clip_vision", "clip_text", "whisper", "wav2vec2_conformer")
LOCAL_MODELS = ("convnet", "encoder", "lstm")
MODELS = HF_MODELS + LOCAL_MODELS


def build(name: str, seed: int = 0) -> tuple[nn.Module, Callable[[int], Inputs]]:
    """(model in eval mode, batch maker: seed -> keyword inputs)."""
    torch.manual_seed(seed)
    if name == "convnet":
        model, kind = ConvNet(), "pixels3"
    elif name == "encoder":
        model, kind = Encoder(), "ids"
    elif name == "lstm":
        model, kind = Recurrent(), "ids"
    elif name in HF_MODELS:
        model, kind = _hf(name)
    else:
        raise ValueError(f"unknown model {name!r}: choose from {', '.join(MODELS)}")

    def batch(s: int) -> Inputs:
        g = torch.Generator().manual_seed(1000 + s)
        ids = torch.randint(0, 100, (8, 64), generator=g)
        if kind == "ids":
            return {"input_ids": ids}
        if kind == "t5":
            return {"input_ids": ids, "decoder_input_ids": ids}
        if kind == "pixels":
            return {"pixel_values": torch.randn(8, 3, 32, 32, generator=g)}
        if kind == "audio":
            return {"input_features": torch.randn(8, 16, 64, generator=g), "decoder_input_ids": ids[:, :16]}
        if kind == "wave":
            return {"input_values": torch.randn(8, 1600, generator=g)}
        return {"pixel_values": torch.randn(8, 3, 32, 32, generator=g)}

    return model.eval(), batch


def output(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


class CountFloatCalls(TorchFunctionMode):
    """Counts the listed non-linear calls that reach it. Entered outside the model, it sits
    under the model's own interception mode: a call handled by a table never reaches it (only
    the table's integer arithmetic does); a call left in float does."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = KIND_OF.get(func)
        if kind is not None and table_op_call(kind.rstrip("_"), args, kwargs or {}):
            self.calls[kind.rstrip("_")] += 1
        elif func in NO_TABLE:  # non-linear with no table: the report must name it
            self.calls[func.__name__] += 1
        elif func in POW2 and pow2_of_activation(args, kwargs or {}, (__file__,)):  # the router's rule
            self.calls[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def table_op_call(kind: str, args: tuple, kwargs: dict) -> bool:
    """Whether a call of this kind is one a table stands for, by the router's own rules
    (ops/convert/call_sites.py): x ** 2 is not, nor a division by a number, nor the sqrt of a
    constant (sqrt(head_dim))."""
    if not table_call(kind, args, kwargs):
        return False
    x = args[0] if args else kwargs.get("input")
    routed_as = "sqrt" if kind == "pow" else kind  # x ** +-0.5 runs as sqrt or rsqrt: their constant rule
    return not (isinstance(x, torch.Tensor) and constant_input(routed_as, x))


def float_calls(model: nn.Module, inputs: Inputs) -> Counter:
    with torch.no_grad(), CountFloatCalls() as c:
        output(model, inputs)
    return c.calls


N_CALIB = 4  # calibration batches per model


def convert(model: nn.Module, batch: Callable[[int], Inputs], calls: bool = True, n_calib: int = N_CALIB) -> Any:
    report = replace_ops(model, calls=calls)
    calibrate(model, [batch(s) for s in range(n_calib)], forward=lambda m, b: output(m, b))
    return report


def measure(name: str, reps: int, compiled: bool = False) -> dict:
    model, batch = build(name)
    test = batch(99)
    with torch.no_grad():
        ref = output(model, test)
    float_before = float_calls(model, test)
    float_model = copy.deepcopy(model)
    swap_only = copy.deepcopy(model)
    convert(swap_only, batch, calls=False)
    recorded = copy.deepcopy(model)
    convert(recorded, batch, calls="recorded")
    report = convert(model, batch)
    with torch.no_grad():
        out = output(model, test)
        rel = float((out - ref).norm() / ref.norm())
    left = float_calls(model, test)
    rows = report.rows()
    floats = Counter(f"{r.kind}: {r.reason}" for r in rows if not r.through)
    with torch.no_grad():
        t_float, t_swap, t_lut, t_rec = timers_interleaved(
            [lambda m=m: output(m, test) for m in (float_model, swap_only, model, recorded)], reps)
        more = {"recorded_equal": bool(torch.equal(output(recorded, test), out))}
        if compiled:  # the call sites recorded once: no per-call Python left
            # three copies of one model share their code objects: dynamo guards each copy's
            # modules apart, so the copies' compiles count against one frame's recompile limit
            # (8: past it a frame runs eagerly); a fresh dynamo per model and room for the three
            torch._dynamo.reset()
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            c_float, c_swap, c_lut = (torch.compile(m) for m in (float_model, swap_only, model))
            out_c, ref_c = output(c_lut, test), output(c_float, test)
            # inductor's own kernels for the float ops (matmuls, norms' means) round differently
            # from eager's: the float model's compiled difference is the yardstick for the tables'
            more |= {"compiled_bit_exact": bool(torch.equal(out_c, out)),
                     "compiled_rel_diff": float((out_c - out).norm() / out.norm()),
                     "compiled_float_rel_diff": float((ref_c - ref).norm() / ref.norm()),
                    "ms_float_compiled": 1e3 * timer("cpu", lambda: output(c_float, test), reps),
                    "ms_module_swaps_compiled": 1e3 * timer("cpu", lambda: output(c_swap, test), reps),
                    "ms_tables_compiled": 1e3 * timer("cpu", lambda: output(c_lut, test), reps)}
    per_forward = sum(r.calls for r in rows) / N_CALIB  # the report's call counts (calibration's batches)
    through_per_forward = sum(r.calls for r in rows if r.through) / N_CALIB
    return {**more, "model": name, "nonlinear_calls_float_model": sum(float_before.values()),
            "sites": len(rows), "through_tables": sum(r.through for r in rows),
            "calls_per_forward": per_forward, "calls_through_tables_per_forward": through_per_forward,
            "idle": report.idle(),
            "float_sites": dict(floats), "float_calls_left": dict(left), "rel_l2_vs_float": rel,
            "kept_modules": [f"{s.name} ({s.old}): {s.reason}" for s in report.kept()],
            "ms_float": 1e3 * t_float, "ms_module_swaps": 1e3 * t_swap, "ms_tables": 1e3 * t_lut,
            "ms_tables_recorded": 1e3 * t_rec,
            "coverage": report.coverage(rows)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=names_in(tuple(MODELS)), default=",".join(MODELS))
    ap.add_argument("--reps", type=positive_int, default=10)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    args = ap.parse_args(argv)
    results = [measure(n, args.reps, args.compile) for n in args.models]
    rows = [[r["model"], str(r["nonlinear_calls_float_model"]),
             f"{r['calls_through_tables_per_forward']:g}/{r['calls_per_forward']:g}",
             f"{r['through_tables']}/{r['sites']}",
             "; ".join(f"{n} {k}" for k, n in r["float_sites"].items()) or "-",
             str(sum(r["float_calls_left"].values())), f"{r['rel_l2_vs_float']:.4f}",
             f"{r['ms_tables'] / r['ms_float']:.2f}x", f"{r['ms_tables'] / r['ms_module_swaps']:.2f}x",
             f"{r['ms_tables_recorded'] / r['ms_module_swaps']:.2f}x"]
            for r in results]
    headers = ["model", "calls", "calls through tables", "sites through tables", "float sites (why)", "float calls left", "rel-L2", "time/float",
               "time/swaps", "recorded: time/swaps"]
    if args.compile:
        headers += ["compiled: time/swaps", "bit-exact", "rel diff vs eager (float model's)"]
        for row, r in zip(rows, results):
            row += [f"{r['ms_tables_compiled'] / r['ms_module_swaps_compiled']:.2f}x", str(r["compiled_bit_exact"]),
                    f"{r['compiled_rel_diff']:.1e} ({r['compiled_float_rel_diff']:.1e})"]
    print_table(headers, rows)
    name = "model_zoo_compiled.json" if args.compile else "model_zoo.json"
    path = write_results(name, {"machine": machine(), "torch": torch.__version__, "reps": args.reps,
                                "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

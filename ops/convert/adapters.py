"""Library classes whose meaning is known, swapped by class name.

Hugging Face's activations and norms are not subclasses of torch's (`GELUActivation`,
`NewGELUActivation`, `LlamaRMSNorm` and the whole *RMSNorm family, `T5LayerNorm`), so an
isinstance test never finds them. They are matched here by class name, so `transformers` is
never imported unless the model itself brought it in; each adapter reads the module's own
attributes (eps under whichever name, Gemma's `1 + weight`). A wrong guess cannot change a
model silently: `ops.replace.calibrate` probes every swap on the first batch and undoes one
whose output differs from the original's beyond float rounding.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.nn as nn

from gqa_lut.table import Table
from ops import nn as lut_nn


@dataclass(frozen=True)
class Adapter:
    pattern: str  # full match on the class name
    op: str  # the ops/registry.py op it stands for (replace_ops(ops=...) filters on it)
    build: Callable[[nn.Module, dict[str, Table]], Optional[nn.Module]]  # None: this instance is not it
    doc: str


def _activation(cls: type) -> Callable[[nn.Module, dict[str, Table]], nn.Module]:
    def build(m: nn.Module, tables: dict[str, Table], **kw: Any) -> nn.Module:
        return cls(tables[cls.op], **kw)
    return build


def _eps(m: nn.Module) -> Optional[float]:
    for name in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(m, name, None)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def _rms(offset: float) -> Callable[..., Optional[nn.Module]]:
    def build(m: nn.Module, tables: dict[str, Table], **kw: Any) -> Optional[nn.Module]:
        w = getattr(m, "weight", None)
        eps = _eps(m)
        if not isinstance(w, nn.Parameter) or w.dim() != 1 or eps is None:
            return None  # a shape this adapter does not know: leave it to the call sites
        new = lut_nn.LUTRMSNorm(w.shape[0], eps=eps, elementwise_affine=True, table=tables.get("rsqrt"))
        new.weight_offset = offset
        new.weight.data.copy_(w.detach())
        return new
    return build


ADAPTERS = (
    Adapter("GELUActivation", "gelu", _activation(lut_nn.LUTGELU), "Hugging Face's erf GELU"),
    Adapter("NewGELUActivation|GELUTanh|PytorchGELUTanh|GELUPytorchTanh|FastGELUActivation", "gelu_tanh",
            _activation(lut_nn.LUTGELUTanh), "Hugging Face's tanh GELUs (GPT-2's NewGELU)"),
    Adapter("SiLUActivation", "swish", _activation(lut_nn.LUTSiLU), "Hugging Face's SiLU"),
    Adapter("Gemma\\d*RMSNorm", "rmsnorm", _rms(1.0), "Gemma's RMSNorm: scales by 1 + weight"),
    Adapter("(?!Gemma)\\w*RMSNorm|T5LayerNorm|LongT5LayerNorm|Pix2StructLayerNorm", "rmsnorm", _rms(0.0),
            "the *RMSNorm family (Llama, Mistral, Qwen2, Mamba...) and T5's RMS LayerNorm"),
)


def find(module: nn.Module) -> Optional[Adapter]:
    """The adapter for a library module (not torch's own classes: ops/registry.py has those)."""
    cls = type(module)
    if cls.__module__.startswith("torch.") or cls.__module__.startswith("ops."):
        return None
    for a in ADAPTERS:
        if re.fullmatch(a.pattern, cls.__name__):
            return a
    return None


# --- Hugging Face attention ------------------------------------------------------------------
HF_ATTENTION = "gqa_lut"
DECOMPOSED = ("eager", "sdpa", HF_ATTENTION)  # implementations whose softmax the call sites reach


def lut_attention(module: nn.Module, query, key, value, attention_mask, **kwargs: Any):
    """Hugging Face's sdpa attention path, registered as `gqa_lut`: its
    F.scaled_dot_product_attention is a call site (written out, softmax through the tables)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def route_hf_attention(model: nn.Module) -> Optional[str]:
    """A Hugging Face model picks its attention by name; flash, flex or paged kernels compute
    their softmax where no call site sees it. Register `gqa_lut` through transformers'
    AttentionInterface and switch the model to it; returns the name it had (None: no switch)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if not isinstance(impl, str) or impl in DECOMPOSED or not hasattr(model, "set_attn_implementation"):
        return None
    from transformers import AttentionInterface
    AttentionInterface.register(HF_ATTENTION, lut_attention)
    model.set_attn_implementation(HF_ATTENTION)
    return impl

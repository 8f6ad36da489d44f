"""The torch side of every op: one record each, the only map between ops, torch and drop-ins.

A `TorchOp` names the op (its one spelling, as in gqa_lut.functions; aliases resolve there),
its float torch function (the reference a drop-in is compared with and the source of the exact
derivative of its straight-through backward), the tables its LUT form evaluates, the torch
module classes `replace_ops` swaps for its drop-in, that drop-in's class in ops.nn, and the
number the GPU kernels know its derivative by. A `CallKind` is one kind of functional call
the call sites route (F.silu, torch.exp, F.scaled_dot_product_attention...): the op it
stands for, its torch spellings and which LUT module serves its site.

Everything else is derived from these records: the drop-ins' defaults, `replace_ops`, the
call sites' maps (ops/convert/call_sites.py), the derivative numbers of the Triton and CUDA
kernels (ops.kernels.derivatives.DERIVATIVE_NUMBERS, passed to the CUDA build as -D defines; a test reads
both kernels' sources against them), the RetNet's quantization modes and `ops.__all__`.
Adding an activation = a record in gqa_lut/functions.py, a record here (and a CallKind for
its functional form), and its one-line class in ops/nn/activation.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gqa_lut.errors import UsageError
from gqa_lut.functions import OPS

TorchFn = Callable[[torch.Tensor], torch.Tensor]
# nn.RMSNorm and F.rms_norm arrived in torch 2.4; pyproject.toml states the same floor (tested)
MIN_TORCH = (2, 4)


def check_torch_version(version: str) -> None:
    major, minor = (int(v) for v in version.split("+")[0].split(".")[:2])
    if (major, minor) < MIN_TORCH:
        raise ImportError(f"gqa-lut's ops need torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (nn.RMSNorm, F.rms_norm); "
                          f"this is torch {version}")


check_torch_version(torch.__version__)


@dataclass(frozen=True)
class TorchOp:
    name: str
    reference: Callable  # the torch function it stands for (1-argument for table functions)
    tables: tuple[str, ...]
    replaces: tuple[type, ...] = ()  # exact torch classes (and subclasses) swapped by replace_ops
    drop_in: Optional[str] = None  # class name in ops.nn, with a `from_float` constructor
    doc: str = ""
    when: Optional[Callable[[nn.Module], bool]] = None  # which modules of those classes it stands for
    derivative: Optional[int] = None  # its exact derivative's number in the GPU kernels (0 is the slope)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)  # the erf form, like gqa_lut.functions.gelu


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _erf_gelu(m: nn.Module) -> bool:
    return getattr(m, "approximate", "none") == "none"


def _tanh_gelu(m: nn.Module) -> bool:
    return getattr(m, "approximate", "none") == "tanh"


def _unit_softplus(m: nn.Module) -> bool:
    return getattr(m, "beta", 1.0) == 1.0  # the table is softplus itself: beta != 1 goes through the call site


def _tanh_rnn(m: nn.Module) -> bool:
    return getattr(m, "nonlinearity", "tanh") == "tanh"  # a ReLU RNN has no table to put in


def _decay(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-x)


RECORDS = (
    TorchOp("gelu", _gelu, ("gelu",), (nn.GELU,), "LUTGELU", "GELU", when=_erf_gelu, derivative=1),
    TorchOp("gelu_tanh", _gelu_tanh, ("gelu_tanh",), (nn.GELU,), "LUTGELUTanh", "GELU(approximate='tanh')",
            when=_tanh_gelu, derivative=2),
    TorchOp("swish", F.silu, ("swish",), (nn.SiLU,), "LUTSiLU", "SiLU", derivative=3),
    TorchOp("hswish", F.hardswish, ("hswish",), (nn.Hardswish,), "LUTHardswish", "Hardswish", derivative=4),
    TorchOp("hsigmoid", F.hardsigmoid, ("hsigmoid",), (nn.Hardsigmoid,), "LUTHardsigmoid", "Hardsigmoid",
            derivative=5),
    TorchOp("softplus", F.softplus, ("softplus",), (nn.Softplus,), "LUTSoftplus", "Softplus (beta=1)",
            when=_unit_softplus, derivative=8),
    TorchOp("sigmoid", torch.sigmoid, ("sigmoid",), (nn.Sigmoid,), "LUTSigmoid", "Sigmoid", derivative=6),
    TorchOp("tanh", torch.tanh, ("tanh",), (nn.Tanh,), "LUTTanh", "Tanh", derivative=7),
    TorchOp("exp", torch.exp, ("exp",), derivative=9),
    TorchOp("decay", _decay, ("decay",), derivative=10),
    TorchOp("rsqrt", torch.rsqrt, ("rsqrt",), derivative=11),
    TorchOp("reciprocal", torch.reciprocal, ("reciprocal",), derivative=12),
    TorchOp("erf", torch.erf, ("erf",)),
    TorchOp("log", torch.log, ("log",)),
    TorchOp("logsumexp", torch.logsumexp, ("exp", "log")),
    TorchOp("layernorm", F.layer_norm, ("rsqrt",), (nn.LayerNorm,), "LUTLayerNorm", "LayerNorm"),
    TorchOp("rmsnorm", F.rms_norm, ("rsqrt",), (nn.RMSNorm,), "LUTRMSNorm", "RMSNorm"),
    TorchOp("groupnorm", F.group_norm, ("rsqrt",), (nn.GroupNorm,), "LUTGroupNorm", "GroupNorm"),
    TorchOp("softmax", F.softmax, ("exp", "reciprocal"), (nn.Softmax,), "LUTSoftmax", "Softmax"),
    # the recurrent layers, whose gates torch runs inside one fused kernel (ops/nn/recurrent.py)
    TorchOp("lstm", torch.lstm, ("sigmoid", "tanh"), (nn.LSTM,), "LUTLSTM", "LSTM"),
    TorchOp("gru", torch.gru, ("sigmoid", "tanh"), (nn.GRU,), "LUTGRU", "GRU"),
    TorchOp("rnn", torch.rnn_tanh, ("tanh",), (nn.RNN,), "LUTRNN", "RNN (tanh)", when=_tanh_rnn),
)
TORCH_OPS: dict[str, TorchOp] = {r.name: r for r in RECORDS}


def torch_op(name: str) -> TorchOp:
    """The record of an op by any of its spellings (`silu` is `swish`), or a one-line error."""
    key = OPS[name].name if name in OPS else name
    try:
        return TORCH_OPS[key]
    except KeyError:
        raise UsageError(f"op {name!r} has no torch record: known ops are {', '.join(TORCH_OPS)}") from None


def reference(table_op: str) -> Optional[TorchFn]:
    """The float torch function a table of `table_op` approximates, if the op is known."""
    key = OPS[table_op].name if table_op in OPS else table_op
    rec = TORCH_OPS.get(key)
    return rec.reference if rec is not None and rec.tables == (key,) else None


def swappable() -> list[TorchOp]:
    """The records replace_ops acts on, in registry order."""
    return [r for r in RECORDS if r.replaces]


def table_names() -> set[str]:
    """Every table a drop-in may be given (`replace_ops(tables=...)` keys)."""
    return {t for r in swappable() for t in r.tables}


def derivative_numbers() -> dict[str, int]:
    """The GPU kernels' derivative numbers by op ("" is the active segment's slope)."""
    return {"": 0, **{r.name: r.derivative for r in RECORDS if r.derivative is not None}}


@dataclass(frozen=True)
class CallKind:
    """One kind of functional call a call site routes: `functions` are its torch spellings as a
    TorchFunctionMode receives them; each of `methods` is looked up on torch and on Tensor, with
    its in-place `name_` where torch has one. `site` names the LUT module serving it."""

    name: str
    op: str  # the TorchOp it stands for (`replace_ops(ops=...)`)
    site: str  # one of SITES
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()


SITES = ("activation", "softmax", "rsqrt", "exp", "reciprocal", "log", "logsumexp")
CALLS = (
    CallKind("gelu", "gelu", "activation", (F.gelu,)),
    CallKind("gelu_tanh", "gelu_tanh", "activation"),  # F.gelu(approximate="tanh"), told apart per call
    CallKind("silu", "swish", "activation", (F.silu,)),
    CallKind("sigmoid", "sigmoid", "activation", (torch.special.expit,), ("sigmoid",)),
    CallKind("tanh", "tanh", "activation", (), ("tanh",)),
    CallKind("hardswish", "hswish", "activation", (F.hardswish,)),
    CallKind("hardsigmoid", "hsigmoid", "activation", (F.hardsigmoid,)),
    CallKind("softplus", "softplus", "activation", (F.softplus,)),
    CallKind("logsigmoid", "softplus", "activation", (F.logsigmoid,)),  # -softplus(-x)
    CallKind("erf", "erf", "activation", (torch.special.erf,), ("erf",)),
    CallKind("erfc", "erf", "activation", (torch.special.erfc,), ("erfc",)),  # 1 - erf(x)
    CallKind("softmax", "softmax", "softmax", (F.softmax, torch.special.softmax), ("softmax",)),
    CallKind("softmin", "softmax", "softmax", (F.softmin,)),  # routed as the softmax of -x
    CallKind("sdpa", "softmax", "softmax", (F.scaled_dot_product_attention,)),
    CallKind("layer_norm", "layernorm", "rsqrt", (F.layer_norm,)),
    CallKind("rms_norm", "rmsnorm", "rsqrt", (F.rms_norm,)),
    CallKind("group_norm", "groupnorm", "rsqrt", (F.group_norm,)),
    CallKind("rsqrt", "rsqrt", "rsqrt", (), ("rsqrt",)),
    CallKind("exp", "exp", "exp", (), ("exp",)),
    CallKind("sqrt", "rsqrt", "rsqrt", (), ("sqrt",)),  # x * rsqrt(x)
    # x ** 0.5 and x ** -0.5 (Gemma's RMSNorm): routed as sqrt / rsqrt; other exponents run as they are
    CallKind("pow", "rsqrt", "rsqrt", (torch.Tensor.__pow__,), ("pow",)),
    CallKind("glu", "sigmoid", "activation", (F.glu,)),  # a * sigmoid(b) of the two halves
    CallKind("reciprocal", "reciprocal", "reciprocal", (), ("reciprocal",)),  # sign(x) / |x|, range-reduced
    # a / b by a tensor b (a normaliser: MoE top-k weights over their sum): a * reciprocal(b)
    CallKind("div", "reciprocal", "reciprocal", (torch.Tensor.__truediv__, torch.Tensor.__itruediv__,
                                                  torch.true_divide), ("div",)),
    # ln through the float's exponent and a table on [1, 2): ln(m * 2^E) = ln(m) + E ln 2
    CallKind("log", "log", "log", (), ("log",)),
    CallKind("log1p", "log", "log", (torch.special.log1p,), ("log1p",)),  # ln(1 + x)
    # max + ln(sum(exp(x - max))): the exp table after the max, the sum, the log table
    CallKind("logsumexp", "logsumexp", "logsumexp", (torch.special.logsumexp,), ("logsumexp",)),
    CallKind("log_softmax", "logsumexp", "logsumexp", (F.log_softmax, torch.special.log_softmax),
             ("log_softmax",)),  # x - logsumexp(x)
)
CALL_KINDS: dict[str, CallKind] = {c.name: c for c in CALLS}


def call_spellings() -> dict[Callable, str]:
    """Each torch spelling of a call -> its kind; in-place spellings -> kind + "_"."""
    out: dict[Callable, str] = {}
    for c in CALLS:
        out.update({f: c.name for f in c.functions})
        for name in c.methods:
            for owner in (torch, torch.Tensor):
                out[getattr(owner, name)] = c.name
                if hasattr(owner, name + "_"):
                    out[getattr(owner, name + "_")] = c.name + "_"
    return out

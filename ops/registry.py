"""The torch side of every op: one record each, the only map between ops, torch and drop-ins.

A record names the op (its one spelling, as in gqa_lut.functions; aliases resolve there), its
float torch function (the reference a drop-in is compared with and the source of the exact
derivative of its straight-through backward), the tables its LUT form evaluates, the torch
module classes `replace_ops` swaps for its drop-in, and that drop-in's class in ops.modules.
Everything else (the drop-ins' defaults, `replace_ops`, the RetNet's quantization modes,
`ops.__all__`) is derived from these records. Adding an activation = a record in
gqa_lut/functions.py, a record here, and its one-line class in ops/modules.py.
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
    drop_in: Optional[str] = None  # class name in ops.modules, with a `from_float` constructor
    doc: str = ""
    when: Optional[Callable[[nn.Module], bool]] = None  # which modules of those classes it stands for


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


def _decay(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-x)


RECORDS = (
    TorchOp("gelu", _gelu, ("gelu",), (nn.GELU,), "LUTGELU", "GELU", when=_erf_gelu),
    TorchOp("gelu_tanh", _gelu_tanh, ("gelu_tanh",), (nn.GELU,), "LUTGELUTanh", "GELU(approximate='tanh')",
            when=_tanh_gelu),
    TorchOp("swish", F.silu, ("swish",), (nn.SiLU,), "LUTSiLU", "SiLU"),
    TorchOp("hswish", F.hardswish, ("hswish",), (nn.Hardswish,), "LUTHardswish", "Hardswish"),
    TorchOp("hsigmoid", F.hardsigmoid, ("hsigmoid",), (nn.Hardsigmoid,), "LUTHardsigmoid", "Hardsigmoid"),
    TorchOp("softplus", F.softplus, ("softplus",), (nn.Softplus,), "LUTSoftplus", "Softplus (beta=1)",
            when=_unit_softplus),
    TorchOp("sigmoid", torch.sigmoid, ("sigmoid",), (nn.Sigmoid,), "LUTSigmoid", "Sigmoid"),
    TorchOp("tanh", torch.tanh, ("tanh",), (nn.Tanh,), "LUTTanh", "Tanh"),
    TorchOp("exp", torch.exp, ("exp",)),
    TorchOp("decay", _decay, ("decay",)),
    TorchOp("rsqrt", torch.rsqrt, ("rsqrt",)),
    TorchOp("reciprocal", torch.reciprocal, ("reciprocal",)),
    TorchOp("layernorm", F.layer_norm, ("rsqrt",), (nn.LayerNorm,), "LUTLayerNorm", "LayerNorm"),
    TorchOp("rmsnorm", F.rms_norm, ("rsqrt",), (nn.RMSNorm,), "LUTRMSNorm", "RMSNorm"),
    TorchOp("groupnorm", F.group_norm, ("rsqrt",), (nn.GroupNorm,), "LUTGroupNorm", "GroupNorm"),
    TorchOp("softmax", F.softmax, ("exp", "reciprocal"), (nn.Softmax,), "LUTSoftmax", "Softmax"),
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

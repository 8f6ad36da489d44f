"""The registry's ops as torch functions: the float reference of each table, and the source of
the exact derivative used by the straight-through backward."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

TORCH_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda x: F.gelu(x),  # erf form, like the registry's
    "swish": F.silu,
    "silu": F.silu,
    "hswish": F.hardswish,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "exp": torch.exp,
    "decay": lambda x: torch.exp(-x),
    "rsqrt": torch.rsqrt,
    "reciprocal": torch.reciprocal,
}

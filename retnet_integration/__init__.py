"""A quantized RetNet with the LUT ops plugged in, trained and evaluated end to end on fortunes.

The front door: `from retnet_integration import RetNet, RetNetConfig, quantize_, QuantSpec`
(imported on first use: the CLI registers the RetNet commands without importing torch).
Sub-packages: `integer` (the integer model, its numpy reference and its C) and
`experiments` (the pipeline, the study and the integer commands).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"RetNet": "retnet_integration.model", "RetNetConfig": "retnet_integration.model",
            "quantize_": "retnet_integration.quantize", "QuantSpec": "retnet_integration.quantizers"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'retnet_integration' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

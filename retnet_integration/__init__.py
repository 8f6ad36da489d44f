"""A quantized RetNet with the LUT ops plugged in, trained and evaluated end to end on fortunes.

The front door: `from retnet_integration import RetNet, RetNetConfig, quantize_, QuantSpec`
(imported on first use: the CLI registers the RetNet commands without importing torch).
Sub-packages: `integer` (the integer model, its numpy reference and its C) and
`experiments` (the pipeline, the study and the integer commands).
"""
from gqa_lut.lazy import lazy_exports

_EXPORTS = {"RetNet": "retnet_integration.model", "RetNetConfig": "retnet_integration.model",
            "quantize_": "retnet_integration.quantize", "QuantSpec": "retnet_integration.quantizers"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

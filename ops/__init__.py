"""The non-linear ops: exact numpy references (registry), their PyTorch LUT drop-ins, and
`replace_ops`/`calibrate` to put them into any model. Torch is imported on first use of a
drop-in, so the fitting CLI starts fast."""
from ops.registry import OPS, Op, custom_op, get_op, op_names

_TORCH_NAMES = {"LUTActivation", "LUTGELU", "LUTSiLU", "LUTHardswish", "LUTSigmoid", "LUTTanh",
                "LUTLayerNorm", "LUTRMSNorm", "LUTGroupNorm", "LUTSoftmax", "RangeReducedLUT", "lut_exp"}


def __getattr__(name):
    if name in _TORCH_NAMES:
        from ops import modules
        return getattr(modules, name)
    if name in ("replace_ops", "calibrate"):
        from ops import replace
        return getattr(replace, name)
    raise AttributeError(name)


__all__ = ["OPS", "Op", "custom_op", "get_op", "op_names", *sorted(_TORCH_NAMES), "replace_ops", "calibrate"]

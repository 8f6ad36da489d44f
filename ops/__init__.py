"""The non-linear ops in PyTorch: integer-table drop-ins bit-exact with gqa_lut's evaluator, and
`replace_ops`/`calibrate` to put them into any model. The numpy functions the tables
approximate live in gqa_lut.functions; ops/registry.py adds each op's torch side."""
from ops.nn import (LUTActivation, LUTGELU, LUTGELUTanh, LUTGroupNorm, LUTGRU, LUTHardsigmoid, LUTHardswish,
                    LUTLayerNorm, LUTLSTM, LUTRMSNorm, LUTRNN, LUTSigmoid, LUTSiLU, LUTSoftmax, LUTSoftplus,
                    LUTTanh, RangeReducedLUT, lut_exp)
from ops.convert.replace import calibrate, load_converted, replace_ops

# the drop-ins ops/registry.py names (a test keeps the two in step), and the building blocks
__all__ = ["LUTGELU", "LUTGELUTanh", "LUTSiLU", "LUTHardswish", "LUTHardsigmoid", "LUTSoftplus", "LUTSigmoid",
           "LUTTanh", "LUTLayerNorm", "LUTRMSNorm", "LUTGroupNorm", "LUTSoftmax", "LUTLSTM", "LUTGRU", "LUTRNN", "LUTActivation", "RangeReducedLUT",
           "calibrate", "load_converted", "lut_exp", "replace_ops"]

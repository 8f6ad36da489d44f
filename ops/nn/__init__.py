"""The drop-in modules (activations, range-reduced rsqrt/reciprocal/log, norms, softmax, the
recurrent layers) and the
fake quantizers. They ask ops.kernels.dispatch for kernels and import no backend."""
from ops.nn.activation import (LUTActivation, LUTGELU, LUTGELUTanh, LUTHardsigmoid, LUTHardswish, LUTSigmoid,
                               LUTSiLU, LUTSoftplus, LUTTanh, covering_scale, device_of)
from ops.nn.norms import LUTGroupNorm, LUTLayerNorm, LUTRMSNorm, group_norm, layer_norm, rms_norm
from ops.nn.range_reduced import RangeReducedLUT
from ops.nn.recurrent import LUTGRU, LUTLSTM, LUTRNN
from ops.nn.softmax import LUTSoftmax, exp_module, lut_exp

__all__ = ["LUTActivation", "LUTGELU", "LUTGELUTanh", "LUTHardsigmoid", "LUTHardswish", "LUTSigmoid", "LUTSiLU",
           "LUTSoftplus", "LUTTanh", "LUTGRU", "LUTLSTM", "LUTRNN", "LUTGroupNorm", "LUTLayerNorm", "LUTRMSNorm", "LUTSoftmax", "RangeReducedLUT",
           "covering_scale", "device_of", "exp_module", "group_norm", "layer_norm", "lut_exp", "rms_norm"]

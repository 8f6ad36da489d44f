"""ONNX export of a converted model: each table as quantize + Gather over its expanded table.

`gqa_lut::lookup` has no ONNX function of its own; this gives it one, the portable encoding of a
LUT (TOSA's TABLE op is the same idea): X = clip(round(x * 2^d), qmin, qmax) (ONNX's Round
rounds half to even, as torch does), then Gather of the 2^Q exact outputs of the active scale
row at X - qmin. Needs `onnx` and `onnxscript` (pip install onnxscript); onnxruntime runs it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _translation() -> dict:
    from onnxscript import opset18 as op

    def lookup(x, table_real, slopes_real, breakpoints, scale_index, d, input_bits, derivative):
        qmin = float(-(1 << (input_bits - 1)))
        qmax = float((1 << (input_bits - 1)) - 1)
        row = op.Gather(table_real, scale_index, axis=0)
        step = op.Pow(op.Constant(value_float=2.0), op.Cast(d, to=1))
        v = op.Round(op.Mul(op.Cast(x, to=1), step))
        v = op.Where(op.IsNaN(v), op.Constant(value_float=0.0), v)
        v = op.Clip(v, op.Constant(value_float=qmin), op.Constant(value_float=qmax))
        idx = op.Cast(op.Sub(v, op.Constant(value_float=qmin)), to=7)
        return op.CastLike(op.Gather(row, idx, axis=0), x)

    def lookup_channels(x, table_real, channel_index, d, input_bits, derivative):
        """A scale per feature of the last dim: the same quantizer with d broadcast over the
        features, then one Gather from the flattened table at row * width + code."""
        qmin = float(-(1 << (input_bits - 1)))
        qmax = float((1 << (input_bits - 1)) - 1)
        step = op.Pow(op.Constant(value_float=2.0), op.Cast(d, to=1))
        v = op.Round(op.Mul(op.Cast(x, to=1), step))
        v = op.Where(op.IsNaN(v), op.Constant(value_float=0.0), v)
        v = op.Clip(v, op.Constant(value_float=qmin), op.Constant(value_float=qmax))
        width = op.Cast(op.Gather(op.Shape(table_real), op.Constant(value_int=1), axis=0), to=7)
        idx = op.Add(op.Cast(op.Sub(v, op.Constant(value_float=qmin)), to=7), op.Mul(channel_index, width))
        return op.CastLike(op.Gather(op.Reshape(table_real, op.Constant(value_ints=[-1])), idx, axis=0), x)

    return {torch.ops.gqa_lut.lookup.default: lookup, torch.ops.gqa_lut.lookup_channels.default: lookup_channels}


def export_onnx(model: torch.nn.Module, args: tuple, path: str | Path, **kwargs: Any) -> Path:
    """torch.onnx.export (the dynamo exporter) with the tables' translation; returns the path."""
    try:
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError("ONNX export needs onnxscript and onnx: pip install onnxscript") from e
    path = Path(path)
    kwargs.setdefault("verbose", False)
    program = torch.onnx.export(model, args, dynamo=True, custom_translation_table=_translation(), **kwargs)
    program.save(str(path))
    return path

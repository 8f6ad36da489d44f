"""nn.LSTM, nn.GRU and nn.RNN (tanh) with their gates through tables.

torch runs a recurrent layer as one fused kernel: no call site can see its sigmoid and tanh.
These drop-ins run the same recurrence step by step in torch ops (the input projection of all
steps in one matmul, then per step the hidden projection and the gates), with the gates'
non-linearities through LUT activations, one per kind of gate per layer and direction, so
each is calibrated (per feature) to the pre-activations it sees. They keep the float module's
parameters under their own names, so a float checkpoint loads into the converted model.

PackedSequence inputs are refused with a TypeError (the probe of `calibrate` then keeps the
float module and says why).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gqa_lut.table import Table
from ops.nn.activation import LUTSigmoid, LUTTanh

Tensor = torch.Tensor


def _gates(rnn: nn.RNNBase, tables: dict[str, Table], kw: dict[str, Any]) -> nn.ModuleList:
    """Per layer and direction: the LUT modules of that cell's gates (names say which)."""
    cells = nn.ModuleList()
    for _ in range(rnn.num_layers * (2 if rnn.bidirectional else 1)):
        cell = nn.ModuleDict()
        if rnn.mode in ("LSTM", "GRU"):
            cell["sigmoid"] = LUTSigmoid(tables.get("sigmoid"), **kw)  # i, f, o (LSTM); r, z (GRU)
        cell["tanh"] = LUTTanh(tables.get("tanh"), **kw)  # the candidate (g of LSTM, n of GRU, RNN's h)
        if rnn.mode == "LSTM":
            cell["tanh_cell"] = LUTTanh(tables.get("tanh"), **kw)  # tanh(c) into the output
        cells.append(cell)
    return cells


def _cell(mode: str, gates: nn.ModuleDict, xw: Tensor, h: Tensor, c: Optional[Tensor], w_hh: Tensor,
          b_hh: Optional[Tensor], w_hr: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """One step of one layer and direction, as torch's cells compute it (gate order i, f, g, o
    for LSTM; r, z, n for GRU, whose n adds r * (W_hn h + b_hn))."""
    hw = F.linear(h, w_hh, b_hh)
    if mode == "LSTM":
        i, f, g, o = (xw + hw).chunk(4, -1)
        s = gates["sigmoid"](torch.cat((i, f, o), -1))
        i, f, o = s.chunk(3, -1)
        c = f * c + i * gates["tanh"](g)
        h = o * gates["tanh_cell"](c)
        return (F.linear(h, w_hr) if w_hr is not None else h), c
    if mode == "GRU":
        xr, xz, xn = xw.chunk(3, -1)
        hr, hz, hn = hw.chunk(3, -1)
        r, z = gates["sigmoid"](torch.cat((xr + hr, xz + hz), -1)).chunk(2, -1)
        n = gates["tanh"](xn + r * hn)
        return (1 - z) * n + z * h, None
    return gates["tanh"](xw + hw), None


class _Recurrent:
    """The step-by-step forward shared by the three drop-ins (mixed into the torch class, so the
    attributes, parameter names and isinstance checks stay torch's)."""

    gates: nn.ModuleList

    @classmethod
    def from_float(cls, m: nn.RNNBase, tables: dict[str, Table], **kw: Any) -> nn.Module:
        args = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first, dropout=m.dropout,
                    bidirectional=m.bidirectional, device="meta")
        if m.mode == "LSTM":
            args["proj_size"] = m.proj_size
        if m.mode.startswith("RNN"):
            args["nonlinearity"] = m.nonlinearity
        new = cls(m.input_size, m.hidden_size, **args)
        new.load_state_dict(m.state_dict(), assign=True)  # the float module's tensors (also on meta)
        new.gates = _gates(m, tables, kw).to(device=next(m.parameters()).device)
        return new

    def forward(self, input: Any, hx: Any = None) -> tuple[Tensor, Any]:
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise TypeError(f"{type(self).__name__} takes padded tensors, not a PackedSequence")
        lstm = self.mode == "LSTM"
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if self.batch_first and batched:
            x = x.transpose(0, 1)
        dirs = 2 if self.bidirectional else 1
        size = self.proj_size if lstm and self.proj_size > 0 else self.hidden_size
        if hx is None:
            h0 = x.new_zeros(self.num_layers * dirs, x.size(1), size)
            c0 = x.new_zeros(self.num_layers * dirs, x.size(1), self.hidden_size) if lstm else None
        else:
            h0, c0 = hx if lstm else (hx, None)
            if not batched:
                h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if c0 is not None else None)
        hs, cs = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                k = layer * dirs + d
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w = {n: getattr(self, f"{n}{sfx}", None) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                                                    "weight_hr")}
                xw = F.linear(x, w["weight_ih"], w["bias_ih"])
                h, c = h0[k], (c0[k] if lstm else None)
                steps = range(x.size(0) - 1, -1, -1) if d else range(x.size(0))
                out = [None] * x.size(0)
                for t in steps:
                    h, c = _cell(self.mode, self.gates[k], xw[t], h, c, w["weight_hh"], w["bias_hh"], w["weight_hr"])
                    out[t] = h
                outs.append(torch.stack(out))
                hs.append(h)
                cs.append(c)
            x = torch.cat(outs, -1) if dirs == 2 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout)
        h_n = torch.stack(hs)
        c_n = torch.stack(cs) if lstm else None
        if not batched:
            x, h_n = x.squeeze(1), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        elif self.batch_first:
            x = x.transpose(0, 1)
        return x, ((h_n, c_n) if lstm else h_n)


class LUTLSTM(_Recurrent, nn.LSTM):
    """Drop-in for nn.LSTM: i, f, o through the sigmoid table, g and tanh(c) through tanh tables."""


class LUTGRU(_Recurrent, nn.GRU):
    """Drop-in for nn.GRU: r, z through the sigmoid table, n through the tanh table."""


class LUTRNN(_Recurrent, nn.RNN):
    """Drop-in for nn.RNN(nonlinearity='tanh'): the tanh through its table."""

"""From the simulation to the reference: the integer model an `IntSim` simulates (its weights'
codes and its shifts), computed with the same torch functions the simulation uses, so the two
agree by construction and the numpy reference depends on neither."""
from __future__ import annotations

import math

import numpy as np
import torch

from gqa_lut.evaluator import output_frac_bits
from retnet_integration.integer.reference import IntegerModel, IntLayer, IntLinear, IntNorm
from retnet_integration.integer.simulation import IntSim, codes_of, fq, weight_exponents
from retnet_integration.integer.spec import ACT_BITS, NORM_FRAC, ROT_FRAC, eps_code


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.int64)


def _linear(lin: torch.nn.Linear, d_x: int, d_out: int | None, scale: float = 1.0,
            per_channel: bool = True) -> tuple[IntLinear, np.ndarray]:
    """The same codes IntSim._linear computes; d_out None keeps the accumulator."""
    with torch.no_grad():
        w = lin.weight * scale if scale != 1.0 else lin.weight
        dw = weight_exponents(w, per_channel)
        W = codes_of(fq(w, dw, ACT_BITS), dw)
        dwv = dw.reshape(-1).expand(w.shape[0]).long()
        bias = None
        if lin.bias is not None:
            bias = _np(codes_of(fq(lin.bias, d_x + dwv, 32), d_x + dwv))
    acc_frac = d_x + _np(dwv)
    shift = acc_frac - (acc_frac if d_out is None else d_out)
    return IntLinear(_np(W), shift, bias), acc_frac


def _norm(norm: torch.nn.LayerNorm | None, d_in: int, g_exp: int | None, d_out: int) -> IntNorm:
    if norm is None:
        return IntNorm(eps_code(d_in), NORM_FRAC - d_out)
    with torch.no_grad():
        gain = _np(codes_of(fq(norm.weight, g_exp, ACT_BITS), g_exp))
        bias = _np(codes_of(fq(norm.bias, g_exp + NORM_FRAC, 32), g_exp + NORM_FRAC))
    return IntNorm(eps_code(d_in), NORM_FRAC + g_exp - d_out, gain, bias)


def export_integer(sim: IntSim) -> IntegerModel:
    """The integer model an `IntSim` simulates: the codes of its weights and its shifts."""
    e, net = sim.exps, sim.net
    if not e:
        raise ValueError("the simulation has no exponents: calibrate it first")
    cfg = net.cfg
    layers = []
    for i, blk in enumerate(net.blocks):
        p, ret = f"{i}.", blk.retention
        d_a = e[p + "ln1"]
        q, _ = _linear(ret.q_proj, d_a, e[p + "q0"], 1.0 / math.sqrt(ret.dk))
        k, _ = _linear(ret.k_proj, d_a, e[p + "k0"])
        v, _ = _linear(ret.v_proj, d_a, e[p + "v"])
        g, _ = _linear(ret.g_proj, d_a, e[p + "gate.in"])
        o, _ = _linear(ret.out_proj, e[p + "p"], e["res"])
        up, _ = _linear(blk.ffn.up, e[p + "ln2"], e[p + "gelu.in"])
        down, _ = _linear(blk.ffn.down, e[p + "gelu"], e["res"])
        layers.append(IntLayer(
            ln1=_norm(blk.norm1, e["res"], e[p + "ln1.g"], d_a), q=q, k=k, v=v, g=g, o=o,
            q_rot_shift=ROT_FRAC + e[p + "q0"] - e[p + "q"], k_rot_shift=ROT_FRAC + e[p + "k0"] - e[p + "k"],
            o_shift=e[p + "q"] + e[p + "k"] + e[p + "v"] + sim.state_frac - e[p + "o"],
            gn=_norm(None, e[p + "o"], None, e[p + "gn"]),
            gate_scale=e[p + "gate.in"],
            gate_shift=output_frac_bits(sim.tables["swish"], e[p + "gate.in"]) - e[p + "gate"],
            p_shift=e[p + "gate"] + e[p + "gn"] - e[p + "p"],
            ln2=_norm(blk.norm2, e["res"], e[p + "ln2.g"], e[p + "ln2"]), up=up,
            gelu_scale=e[p + "gelu.in"],
            gelu_shift=output_frac_bits(sim.tables["gelu"], e[p + "gelu.in"]) - e[p + "gelu"], down=down))
    head, head_frac = _linear(net.head, e["lnf"], None, per_channel=False)
    with torch.no_grad():
        E = _np(codes_of(fq(net.embed.weight, e["embed"], ACT_BITS), e["embed"]))
    return IntegerModel(
        d_model=cfg.d_model, n_heads=cfg.n_heads, vocab=cfg.vocab_size, embed=E, embed_shift=e["embed"] - e["res"],
        layers=layers, lnf=_norm(net.norm, e["res"], e["lnf.g"], e["lnf"]), head=head, gammas=list(sim.gammas), state_frac=sim.state_frac,
        tables={k: sim.tables[k] for k in ("gelu", "swish", "rsqrt")}, d_rsqrt=sim.d_rsqrt,
        logit_frac=int(head_frac[0]), exps=dict(e))

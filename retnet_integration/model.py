"""A Retentive Network language model (arXiv 2307.08621) in one readable file.

Retention is written as three free functions that compute the same thing:
  parallel:   O = ((Q K^T) * D) V,                D[n, m] = gamma^(n-m) for n >= m, else 0
  recurrent:  S_n = gamma S_{n-1} + k_n^T v_n,    o_n = q_n S_n          (O(1) state per token)
  chunkwise:  parallel inside chunks of C tokens, the recurrent state carried between them.
Q and K carry rotary position (relative position, like xPos without its scaling); each head h
decays with gamma_h = 1 - 2^(-5-h). The model's quantizers (`ActQuant`, `QuantLinear`) are
always there and off in float mode, so quantizing is switching them on (retnet_integration/
quantize.py), not building a parallel copy of the model.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from retnet_integration.layers import ActQuant, Decay, QuantLinear


@dataclass
class RetNetConfig:
    vocab_size: int = 256  # bytes
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    ffn_mult: int = 2
    max_len: int = 1024  # positions with precomputed rotary angles; later ones are computed when met
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# --- retention, the three forms ---------------------------------------------------------------

def decay_mask(log_gamma: torch.Tensor, length: int) -> torch.Tensor:
    """(H, L, L) with gamma^(n-m) below the diagonal, 0 above; computed in float64."""
    n = torch.arange(length, device=log_gamma.device, dtype=torch.float64)
    dist = n[:, None] - n[None, :]
    mask = torch.exp(log_gamma.double()[:, None, None] * dist.clamp_min(0))
    return torch.where(dist >= 0, mask, torch.zeros_like(mask))


def retention_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                       score_quant: Optional[nn.Module] = None) -> torch.Tensor:
    """q, k: (B, H, L, Dk), v: (B, H, L, Dv), log_gamma: (H,) -> (B, H, L, Dv)."""
    D = decay_mask(log_gamma, q.shape[2]).to(q.dtype)
    scores = (q @ k.transpose(-1, -2)) * D
    if score_quant is not None:
        scores = score_quant(scores)
    return scores @ v


def retention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                        state: torch.Tensor, state_quant: Optional[nn.Module] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: q, k: (B, H, Dk), v: (B, H, Dv), state: (B, H, Dk, Dv) -> (o (B, H, Dv), state)."""
    gamma = torch.exp(log_gamma.double()).to(q.dtype)[None, :, None, None]
    state = gamma * state + k.unsqueeze(-1) * v.unsqueeze(-2)
    if state_quant is not None:
        state = state_quant(state)
    return (q.unsqueeze(-2) @ state).squeeze(-2), state


def retention_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                        chunk_size: int, state: Optional[torch.Tensor] = None,
                        score_quant: Optional[nn.Module] = None, state_quant: Optional[nn.Module] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel within chunks, recurrent across them. Returns (o, state after the last token)."""
    B, H, L, Dk = q.shape
    Dv = v.shape[-1]
    if state is None:
        state = q.new_zeros(B, H, Dk, Dv)
    lg = log_gamma.double()
    outs = []
    for s in range(0, L, chunk_size):
        qc, kc, vc = q[:, :, s:s + chunk_size], k[:, :, s:s + chunk_size], v[:, :, s:s + chunk_size]
        c = qc.shape[2]
        j = torch.arange(c, device=q.device, dtype=torch.float64)
        inner = retention_parallel(qc, kc, vc, log_gamma, score_quant)
        xi = torch.exp(lg[:, None] * (j + 1)).to(q.dtype)  # decay from the previous state to token j
        cross = (qc * xi[None, :, :, None]) @ state
        outs.append(inner + cross)
        zeta = torch.exp(lg[:, None] * (c - 1 - j)).to(q.dtype)  # decay from token j to the chunk's end
        state = torch.exp(lg * c).to(q.dtype)[None, :, None, None] * state \
            + (kc * zeta[None, :, :, None]).transpose(-1, -2) @ vc
        if state_quant is not None:
            state = state_quant(state)
    return torch.cat(outs, dim=2), state


# --- rotary position ----------------------------------------------------------------------------

def rotary_angles(head_dim: int, start: int, length: int, base: float = 10000.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of positions start..start+length-1, (length, head_dim / 2), computed in
    float64 and rounded once, by the same formula whether a position is precomputed or not."""
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(start, start + length, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def rotary_tables(head_dim: int, max_len: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    return rotary_angles(head_dim, 0, max_len, base)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by the position's angles; cos/sin broadcast over x[..., ::2]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


# --- modules ------------------------------------------------------------------------------------

class MultiScaleRetention(nn.Module):
    def __init__(self, cfg: RetNetConfig):
        super().__init__()
        d, h = cfg.d_model, cfg.n_heads
        if d % h or (d // h) % 2:
            raise ValueError(f"d_model {d} must split into {h} heads of even size")
        self.h, self.dk = h, d // h
        self.q_proj, self.k_proj = QuantLinear(d, d, bias=False), QuantLinear(d, d, bias=False)
        self.v_proj, self.g_proj = QuantLinear(d, d, bias=False), QuantLinear(d, d, bias=False)
        self.out_proj = QuantLinear(d, d, bias=False)
        self.decay = Decay(h)
        self.group_norm = nn.GroupNorm(h, d, affine=False)
        self.gate_act = nn.SiLU()
        self.q_quant, self.k_quant, self.v_quant = ActQuant(), ActQuant(), ActQuant()
        self.score_quant, self.state_quant = ActQuant(), ActQuant()
        cos, sin = rotary_tables(self.dk, cfg.max_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _qkv(self, x: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, _ = x.shape
        split = lambda t: t.view(B, L, self.h, self.dk).transpose(1, 2)  # noqa: E731
        if offset + L <= self.cos.shape[0]:
            cos, sin = self.cos[offset:offset + L], self.sin[offset:offset + L]
        else:  # past the precomputed positions: streaming generation has no length cap
            cos, sin = (t.to(x.device) for t in rotary_angles(self.dk, offset, L))
        q = rotate(split(self.q_proj(x)), cos, sin) / math.sqrt(self.dk)
        k = rotate(split(self.k_proj(x)), cos, sin)
        return self.q_quant(q), self.k_quant(k), self.v_quant(split(self.v_proj(x)))

    def _finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        B, H, L, Dv = o.shape
        y = o.transpose(1, 2).reshape(B * L, H * Dv)
        y = self.group_norm(y).view(B, L, H * Dv)
        return self.out_proj(self.gate_act(self.g_proj(x)) * y)

    def forward(self, x: torch.Tensor, form: str = "parallel", chunk_size: int = 32,
                state: Optional[torch.Tensor] = None, offset: int = 0
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        q, k, v = self._qkv(x, offset)
        lg = self.decay.log_gamma()
        if form == "parallel":
            o, new_state = retention_parallel(q, k, v, lg, self.score_quant), None
        elif form == "chunkwise":
            o, new_state = retention_chunkwise(q, k, v, lg, chunk_size, state, self.score_quant, self.state_quant)
        elif form == "recurrent":
            if state is None:
                state = q.new_zeros(q.shape[0], self.h, self.dk, self.dk)
            outs = []
            for t in range(q.shape[2]):
                o_t, state = retention_recurrent(q[:, :, t], k[:, :, t], v[:, :, t], lg, state, self.state_quant)
                outs.append(o_t)
            o, new_state = torch.stack(outs, dim=2), state
        else:
            raise ValueError(f"form {form!r} is not parallel, recurrent or chunkwise")
        return self._finish(x, o), new_state


class FeedForward(nn.Module):
    def __init__(self, cfg: RetNetConfig):
        super().__init__()
        self.up = QuantLinear(cfg.d_model, cfg.ffn_mult * cfg.d_model)
        self.act = nn.GELU()
        self.down = QuantLinear(cfg.ffn_mult * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(self.act(self.up(x))))


class RetNetBlock(nn.Module):
    def __init__(self, cfg: RetNetConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.retention, self.ffn = MultiScaleRetention(cfg), FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, form="parallel", chunk_size=32, state=None, offset=0):
        y, state = self.retention(self.norm1(x), form, chunk_size, state, offset)
        x = x + self.drop(y)
        return x + self.ffn(self.norm2(x)), state


class RetNet(nn.Module):
    def __init__(self, cfg: RetNetConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(RetNetBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = QuantLinear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, form: str = "parallel", chunk_size: int = 32,
                states: Optional[list] = None, offset: int = 0) -> tuple[torch.Tensor, list]:
        """Logits (B, L, vocab) and the per-layer retention states (recurrent/chunkwise forms)."""
        x = self.embed_drop(self.embed(tokens))
        new_states = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, form, chunk_size, None if states is None else states[i], offset)
            new_states.append(s)
        return self.head(self.norm(x)), new_states

    def loss(self, tokens: torch.Tensor, form: str = "parallel") -> torch.Tensor:
        logits, _ = self(tokens[:, :-1], form)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample with the recurrent form: O(1) state per token, one token at a time."""
        states = None
        logits, states = self(prompt, "recurrent", states=states)
        out = [prompt]
        pos = prompt.shape[1]
        nxt = None
        for _ in range(new_tokens):
            probs = torch.softmax(logits[:, -1] / max(temperature, 1e-6), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
            out.append(nxt)
            logits, states = self(nxt, "recurrent", states=states, offset=pos)
            pos += 1
        return torch.cat(out, dim=1)

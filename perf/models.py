"""Realistic parameter-shape mixes and a GPT-2-shaped transformer, built from configs (no download).

* ``gpt2_small_shapes`` / ``bert_large_shapes``: the parameter shapes of GPT-2 small (124,439,808
  parameters, tied LM head) and BERT-Large with its pre-training heads (~336M), in module order.
* ``scaled_mix(name, total)``: the same model with every width (hidden size, MLP size, vocabulary,
  positions) multiplied by one factor, layer count kept, so that it has about ``total`` parameters.
  The number of tensors and the spread of their sizes (a few huge embeddings, many square matrices,
  many hidden-size vectors) stay those of the real model, which is what a multi-tensor kernel's
  chunking and launch overheads depend on.
* ``GPT``: a GPT-2 (pre-LayerNorm, learned positions, tied head) for the whole-step benchmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def gpt2_small_shapes(n_layer: int = 12, d: int = 768, vocab: int = 50257, ctx: int = 1024,
                      d_ff: int | None = None) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2 (HF ``GPT2LMHeadModel`` order; ``nn.Linear`` (out, in) layout)."""
    d_ff = d_ff or 4 * d
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),   # ln_1, attn.c_attn, attn.c_proj
                   (d,), (d,), (d_ff, d), (d_ff,), (d, d_ff), (d,)]  # ln_2, mlp.c_fc, mlp.c_proj
    return shapes + [(d,), (d,)]                                     # ln_f (lm_head tied to wte)


def bert_large_shapes(n_layer: int = 24, d: int = 1024, vocab: int = 30522, ctx: int = 512,
                      d_ff: int | None = None) -> list[tuple[int, ...]]:
    """Parameter shapes of BERT-Large with the MLM and NSP heads (HF ``BertForPreTraining`` order)."""
    d_ff = d_ff or 4 * d
    shapes = [(vocab, d), (ctx, d), (2, d), (d,), (d,)]               # embeddings + LayerNorm
    for _ in range(n_layer):
        shapes += [(d, d), (d,)] * 4 + [(d,), (d,)]                  # q, k, v, attention output, LN
        shapes += [(d_ff, d), (d_ff,), (d, d_ff), (d,), (d,), (d,)]  # intermediate, output, LN
    shapes += [(d, d), (d,)]                                          # pooler
    shapes += [(d, d), (d,), (d,), (d,), (vocab,)]                    # MLM transform, LN, decoder bias
    return shapes + [(2, d), (2,)]                                    # NSP head


MIXES = {
    "gpt2-small": (gpt2_small_shapes, dict(n_layer=12, d=768, vocab=50257, ctx=1024)),
    "bert-large": (bert_large_shapes, dict(n_layer=24, d=1024, vocab=30522, ctx=512)),
}


def numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


@dataclass(frozen=True)
class Mix:
    """A named list of parameter shapes."""

    name: str           # e.g. "gpt2-small"
    target: int         # the total asked for
    shapes: tuple       # the shapes
    width: int          # the hidden size used

    @property
    def total(self) -> int:
        return numel(self.shapes)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.target:.0e}".replace("e+0", "e")


def scaled_mix(name: str, total: int, n_layer: int | None = None, max_tensors: int | None = None) -> Mix:
    """The ``name`` model scaled (one width factor, layers kept or set to ``n_layer``) to ~``total`` params;
    ``max_tensors`` keeps only the first tensors (embeddings, then the first layer's) for the smoke run."""
    build, config = MIXES[name]
    config = dict(config, **({"n_layer": n_layer} if n_layer is not None else {}))

    def shapes_at(scale: float):
        cfg = dict(config, d=max(1, round(config["d"] * scale)), vocab=max(2, round(config["vocab"] * scale)),
                   ctx=max(2, round(config["ctx"] * scale)))
        return cfg["d"], build(**cfg)

    lo, hi = 1e-4, 16.0
    for _ in range(60):  # total(scale) is increasing: bisect for the closest scale
        mid = math.sqrt(lo * hi)
        if numel(shapes_at(mid)[1]) < total:
            lo = mid
        else:
            hi = mid
    d, shapes = min((shapes_at(s) for s in (lo, hi)), key=lambda ds: abs(numel(ds[1]) - total))
    return Mix(name, int(total), tuple(shapes[:max_tensors]), d)


# ----------------------------------------------------------------------------- GPT-2-shaped model


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    d: int = 768
    vocab: int = 50257
    ctx: int = 1024


GPT2_SMALL = GPTConfig()


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln_1 = nn.LayerNorm(cfg.d)
        self.c_attn = nn.Linear(cfg.d, 3 * cfg.d)
        self.attn_proj = nn.Linear(cfg.d, cfg.d)
        self.ln_2 = nn.LayerNorm(cfg.d)
        self.c_fc = nn.Linear(cfg.d, 4 * cfg.d)
        self.mlp_proj = nn.Linear(4 * cfg.d, cfg.d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2: token + learned position embeddings, pre-LN blocks, final LN, head tied to the embedding."""

    def __init__(self, cfg: GPTConfig = GPT2_SMALL):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.d)
        self.wpe = nn.Embedding(cfg.ctx, cfg.d)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

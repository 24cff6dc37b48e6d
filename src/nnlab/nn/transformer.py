"""The pre-LayerNorm Transformer block shared by the GPT language model and the Vision Transformer.

    x = x + SelfAttention(LN_1(x))      tokens exchange information (the only place they do)
    x = x + MLP(LN_2(x))                each token is transformed on its own: Dense, GELU, Dense

Pre-LN (normalise the input of each branch, not the sum) keeps the residual stream an untouched
sum of branch outputs, so gradients reach early layers without passing through any normalisation:
it trains stably without learning-rate warm-up tricks (GPT-2 and ViT both use it).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from nnlab.nn.layers import Dense, SelfAttention


class MLP(nn.Module):
    """y = GELU(X W_1 + b_1) W_2 + b_2, widening to `hidden` (4x n_embd in GPT and ViT) and back."""

    def __init__(self, n_embd: int, hidden: int, bias: bool = True, dropout: float = 0.0, explicit: bool = False):
        super().__init__()
        self.fc = Dense(n_embd, hidden, bias=bias, explicit=explicit)
        self.proj = Dense(hidden, n_embd, bias=bias, explicit=explicit)  # a residual projection
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))  # (B, T, C) -> (B, T, hidden) -> (B, T, C)


class Block(nn.Module):
    """One pre-LN Transformer block. `causal=True` for a language model, False for a ViT.

    forward(x, past_kv=None, need_weights=False, use_cache=False) -> (x, A or None, (K, V) or None),
    passing the attention's cache and weights through unchanged (see nnlab.nn.SelfAttention).
    """

    def __init__(self, n_embd: int, n_head: int, causal: bool, mlp_ratio: int = 4, bias: bool = True,
                 dropout: float = 0.0, explicit: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = SelfAttention(n_embd, n_head, causal=causal, bias=bias, dropout=dropout, explicit=explicit)
        self.ln2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, mlp_ratio * n_embd, bias=bias, dropout=dropout, explicit=explicit)

    def forward(self, x: Tensor, past_kv: tuple[Tensor, Tensor] | None = None, need_weights: bool = False,
                use_cache: bool = False):
        a, A, kv = self.attn(self.ln1(x), past_kv=past_kv, need_weights=need_weights, use_cache=use_cache)
        x = x + a  # (B, T, C)
        x = x + self.mlp(self.ln2(x))  # (B, T, C)
        return x, A, kv


def init_transformer_(model: nn.Module, n_layer: int, std: float = 0.02) -> None:
    """GPT-2 / nanoGPT initialisation, in place: every Dense and Embedding ~ N(0, 0.02^2), biases 0,
    LayerNorms at identity, and the two residual projections of each block (attn.proj, mlp.proj)
    scaled down to std 0.02/sqrt(2*n_layer).

    Why the scaling: the residual stream is a sum of 2*n_layer branch outputs; with independent
    branches its variance grows with their number, so shrinking each branch's last projection by
    1/sqrt(2*n_layer) keeps the stream's scale at initialisation independent of depth.
    Convolutions (a ViT's patch embedding) keep PyTorch's default init.
    """
    for m in model.modules():
        if isinstance(m, nn.Linear):  # nnlab.nn.Dense is an nn.Linear
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, Block):
            for proj in (m.attn.proj, m.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * n_layer))

"""A decoder-only Transformer language model (GPT-2's architecture, after nanoGPT).

    h_0 = E[idx] + P[0..T-1]                                  token + learned position embeddings
    h_l = h_{l-1} + SelfAttention(LN(h_{l-1}))   (causal)     for each block l = 1..n_layer
    h_l = h_l + MLP(LN(h_l))                                  (pre-LN: see nnlab.nn.transformer)
    logits = LN_f(h_L) E^T                                    lm_head tied to the token embedding

Each head of the causal SelfAttention is the article's A = softmax(QK^T/sqrt(d_k)), O = AV with
the scores of later positions set to -inf, so position t predicts token t+1 from tokens <= t only.
Tying lm_head to E (the same (vocab, C) matrix reads tokens in and scores them out) saves
vocab*C parameters and works as well or better than an untied head (Press & Wolf, 2017).

forward returns logits only: the loss (cross-entropy over vocab) belongs to the trainer.
`forward_with_cache` serves KV-cached decoding (nnlab.generate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nnlab.models import register
from nnlab.nn import Dense
from nnlab.nn.transformer import Block, init_transformer_

# One (K, V) pair per layer, each (B, n_head, T_past, d_k).
Past = list[tuple[Tensor, Tensor]]


@dataclass
class GPTConfig:
    vocab_size: int = 65  # set from the data (65 = the characters of tiny Shakespeare)
    block_size: int = 64  # the longest context; also the number of learned positions
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Dense and LayerNorm layers (GPT-2: True)
    explicit: bool = False  # True: the article's attention/dense formulas via nnlab.ops; False: SDPA, F.linear
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@register("gpt", GPTConfig, task="text")
class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # E: (vocab, C)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)  # P: (block_size, C)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.n_embd, cfg.n_head, causal=True, bias=cfg.bias, dropout=cfg.dropout, explicit=cfg.explicit)
            for _ in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = Dense(cfg.n_embd, cfg.vocab_size, bias=False, explicit=cfg.explicit)
        # Weight tying: one Parameter, two uses. Dense stores (out, in) = (vocab, C), the same
        # layout as the embedding table, so no transpose is needed.
        self.tok_emb.weight = self.lm_head.weight
        init_transformer_(self, cfg.n_layer)

    def _trunk(self, idx: Tensor, past: Past | None = None, need_weights: bool = False):
        """Embeddings and blocks: returns (h after ln_f (B, T, C), [A per layer], new past)."""
        B, T = idx.shape
        t0 = 0 if not past else past[0][0].shape[2]  # positions already in the cache
        if t0 + T > self.cfg.block_size:
            raise ValueError(
                f"sequence of length {t0 + T} (cached {t0} + new {T}) is longer than block_size="
                f"{self.cfg.block_size}: the model has no position embedding beyond it; crop the context"
            )
        # The new tokens sit at positions t0..t0+T-1, after the cached ones.
        pos = torch.arange(t0, t0 + T, device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        maps, new_past = [], []
        for i, block in enumerate(self.blocks):
            if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each block's input; its activations are recomputed during backward.
                x = checkpoint(lambda h, b=block: b(h)[0], x, use_reentrant=False)
                continue
            x, A, kv = block(x, past_kv=past[i] if past else None, need_weights=need_weights)
            maps.append(A)  # (B, n_head, T, t0 + T) or None
            new_past.append(kv)  # K, V each (B, n_head, t0 + T, d_k)
        return self.ln_f(x), maps, new_past

    def forward_features(self, idx: Tensor) -> Tensor:
        return self._trunk(idx)[0]  # (B, T, C)

    def forward_head(self, h: Tensor) -> Tensor:
        return self.lm_head(h)  # (B, T, vocab)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor:
        # `targets` is accepted (and ignored) for nanoGPT's call signature; the trainer owns the loss.
        return self.forward_head(self.forward_features(idx))  # (B, T, vocab)

    def attention_maps(self, idx: Tensor) -> list[Tensor]:
        """A = softmax(QK^T/sqrt(d_k)) of every layer, each (B, n_head, T, T); row t sums to 1 over keys <= t."""
        return self._trunk(idx, need_weights=True)[1]

    def forward_with_cache(self, idx: Tensor, past: Past | None = None) -> tuple[Tensor, Past]:
        """Logits for the new tokens `idx` (B, T) given the cached K, V of the earlier ones.

        Returns (logits (B, T, vocab), new_past) where new_past holds K, V of all t0 + T positions.
        Only the new tokens' queries are computed: the keys and values of the past never change
        (causal attention), so generating token t costs O(t) instead of recomputing O(t^2).
        """
        h, _, new_past = self._trunk(idx, past=past)
        return self.forward_head(h), new_past


PRESETS = {
    "tiny": dict(n_layer=1, n_head=2, n_embd=16, block_size=16),
    "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),  # nanoGPT's CPU "baby GPT"
}

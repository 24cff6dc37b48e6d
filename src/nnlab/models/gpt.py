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
import torch.nn.functional as F
from torch import Tensor, nn

from nnlab.config import documented
from nnlab.models import model_name, register
from nnlab.nn import Dense
from nnlab.nn.transformer import Block, init_transformer_

# One (K, V) pair per layer, each (B, n_head, T_past, d_k).
Past = list[tuple[Tensor, Tensor]]


@dataclass
class GPTConfig:
    name: str = model_name("gpt")
    vocab_size: int = documented(65, "tokens (set from the data; 65 = the characters of tiny Shakespeare)")
    block_size: int = documented(64, "the longest context; also the number of learned positions")
    n_layer: int = documented(4, "Transformer blocks")
    n_head: int = documented(4, "attention heads per block")
    n_embd: int = documented(128, "width C of every token vector; divisible by n_head")
    dropout: float = documented(0.0, "dropout on embeddings, attention and MLP outputs")
    bias: bool = documented(True, "biases in Dense and LayerNorm layers (GPT-2: True)")
    explicit: bool = documented(False, "True: the article's attention / dense formulas via nnlab.ops; False: SDPA, "
                                "F.linear")

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


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

    def _trunk(self, idx: Tensor, past: Past | None = None, need_weights: bool = False, use_cache: bool = False):
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
            x, A, kv = block(x, past_kv=past[i] if past else None, need_weights=need_weights, use_cache=use_cache)
            maps.append(A)  # (B, n_head, T, t0 + T) or None
            new_past.append(kv)  # K, V each (B, n_head, t0 + T, d_k); None unless use_cache
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
        h, _, new_past = self._trunk(idx, past=past, use_cache=True)
        return self.forward_head(h), new_past

    def decode_cache_from(self, past: Past, max_len: int) -> "KVCache":
        """A preallocated cache holding a prefill's K, V, with room up to max_len positions."""
        return KVCache.from_past(self.cfg, past, max_len)

    @torch.inference_mode()
    def decode_step(self, token: Tensor, cache: "KVCache") -> Tensor:
        """Logits (B, vocab) for one new token per row, appending its K and V to `cache` in place.

        The same function as forward_with_cache(token[:, None], past)[0][:, -1], written for the
        one-token case generation spends its time in: plain functional calls on this model's own
        parameters (one Python call per op, not one nn.Module call per layer), K and V written into a preallocated cache (no torch.cat re-copying
        the whole past each step), and no mask (one query at the newest position sees every key).
        tests/test_gpt_vit.py checks it against forward() position by position.
        """
        B, C, H = token.shape[0], self.cfg.n_embd, self.cfg.n_head
        t = cache.length
        if t >= cache.k.shape[3]:
            raise ValueError(f"decode_step: the cache is full ({t} positions)")
        x = (self.tok_emb.weight[token] + self.pos_emb.weight[t]).unsqueeze(1)  # (B, 1, C)
        for i, b in enumerate(self.blocks):
            a = b.attn
            qkv = F.linear(F.layer_norm(x, (C,), b.ln1.weight, b.ln1.bias), a.qkv.weight, a.qkv.bias)
            q, k, v = qkv.view(B, 3, H, 1, C // H).unbind(1)  # each (B, H, 1, d_k)
            cache.k[i, :, :, t : t + 1] = k
            cache.v[i, :, :, t : t + 1] = v
            o = F.scaled_dot_product_attention(q, cache.k[i, :, :, : t + 1], cache.v[i, :, :, : t + 1])
            x = x + F.linear(o.reshape(B, 1, C), a.proj.weight, a.proj.bias)
            h = F.layer_norm(x, (C,), b.ln2.weight, b.ln2.bias)
            x = x + F.linear(F.gelu(F.linear(h, b.mlp.fc.weight, b.mlp.fc.bias)), b.mlp.proj.weight, b.mlp.proj.bias)
        cache.length = t + 1
        return F.linear(self.ln_f(x), self.lm_head.weight)[:, 0]  # (B, vocab)


class KVCache:
    """Preallocated K and V of every layer: k, v (n_layer, B, n_head, max_len, d_k), positions
    0..length-1 filled. `from_past` takes the (K, V) list a forward_with_cache prefill returns."""

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @classmethod
    def from_past(cls, cfg: GPTConfig, past: Past, max_len: int) -> "KVCache":
        k0 = past[0][0]
        cache = cls(cfg, k0.shape[0], max_len, k0.dtype, k0.device)
        cache.length = k0.shape[2]
        for i, (k, v) in enumerate(past):
            cache.k[i, :, :, : cache.length] = k
            cache.v[i, :, :, : cache.length] = v
        return cache


PRESETS = {
    "tiny": dict(n_layer=1, n_head=2, n_embd=16, block_size=16),
    "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),  # nanoGPT's CPU "baby GPT"
}
register(GPTConfig, GPT, task="text", presets=PRESETS)

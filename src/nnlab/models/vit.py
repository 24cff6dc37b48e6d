"""A small Vision Transformer classifier (Dosovitskiy et al., 2020): an image as a sequence of patches.

    patches = Conv2d_{k=p, stride=p}(X)                   each p x p patch -> one C-vector (a dense
                                                          layer applied to every flattened patch)
    h_0 = [cls; patches] + P                              a learned CLS token, learned positions
    h_l = h_{l-1} + SelfAttention(LN(h_{l-1}))            non-causal: every patch sees every patch
    h_l = h_l + MLP(LN(h_l))                              (pre-LN blocks shared with gpt.py)
    logits = LN_f(h_L)[cls] W + b

Pooling: the output of the CLS token, as in the ViT paper. It starts as a learned vector that
carries no pixels, so everything it holds at the end it gathered through attention, and the CLS
row of the attention maps shows which patches the classification read. (Mean pooling over
patches works as well at this size; CLS keeps that explanation direct.)
Sequence length T = (image_size / patch_size)^2 + 1; 28x28 MNIST with p=4 gives 49 + 1 = 50.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nnlab.config import documented
from nnlab.models import model_name, register
from nnlab.nn import Conv2d, Dense
from nnlab.nn.transformer import Block, init_transformer_


@dataclass
class ViTConfig:
    name: str = model_name("vit")
    in_channels: int = documented(1, "image channels (set from the data)")
    image_size: int = documented(28, "side of the square images (set from the data)")
    num_classes: int = documented(10, "classes (set from the data)")
    patch_size: int = documented(4, "side of a patch; must divide image_size")
    n_layer: int = documented(6, "Transformer blocks")
    n_head: int = documented(4, "attention heads per block")
    n_embd: int = documented(128, "width C of every token vector; divisible by n_head")
    mlp_ratio: int = documented(4, "the MLP's hidden width is mlp_ratio * n_embd")
    dropout: float = documented(0.0, "dropout on embeddings, attention and MLP outputs")
    explicit: bool = documented(False, "True: unfold+matmul patch embedding, the article's attention; False: "
                                "fast kernels")

    def __post_init__(self):
        for name in ("in_channels", "image_size", "num_classes", "patch_size", "n_layer", "n_head", "n_embd",
                     "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be divisible by patch_size={self.patch_size}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        C, p = cfg.n_embd, cfg.patch_size
        # stride = kernel = p: non-overlapping patches, each mapped by the same (C, c_in*p*p) matrix.
        self.patch_embed = Conv2d(cfg.in_channels, C, p, stride=p, explicit=cfg.explicit)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, C))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(C, cfg.n_head, causal=False, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout, explicit=cfg.explicit)
            for _ in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(C)
        self.head = Dense(C, cfg.num_classes, explicit=cfg.explicit)
        init_transformer_(self, cfg.n_layer)
        # The CLS token and positions are free vectors: small random values, like the embeddings of a GPT.
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)

    def _trunk(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, list]:
        """Patches and blocks: returns (all tokens after ln_f (B, T, C), [A per layer])."""
        if x.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"expected {self.cfg.image_size}x{self.cfg.image_size} images, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x)  # (B, C, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C): patches in row-major order
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, C)
        x = self.drop(torch.cat([cls, x], dim=1) + self.pos_emb)  # (B, N + 1, C)
        maps = []
        for block in self.blocks:
            x, A, _ = block(x, need_weights=need_weights)
            maps.append(A)  # (B, n_head, N + 1, N + 1) or None
        return self.ln_f(x), maps

    def forward_features(self, x: Tensor) -> Tensor:
        return self._trunk(x)[0][:, 0]  # the CLS token: (B, C)

    def forward_head(self, h: Tensor) -> Tensor:
        return self.head(h)  # (B, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def attention_maps(self, x: Tensor) -> list[Tensor]:
        """A of every layer, each (B, n_head, N + 1, N + 1); index 0 is the CLS token, 1.. the patches."""
        return self._trunk(x, need_weights=True)[1]


PRESETS = {
    "tiny": dict(n_layer=1, n_head=2, n_embd=16, patch_size=7),
    "small": dict(n_layer=6, n_head=4, n_embd=128, patch_size=4),
}
register(ViTConfig, ViT, task="image", presets=PRESETS)

"""The article's CNN, made runnable: C = f(X * W + b), 2x2 max-pooling, then fully connected layers.

    conv 1->32 (3x3, pad 1) -> ReLU -> maxpool 2     (B, 32, 14, 14)
    conv 32->64 (3x3, pad 1) -> ReLU -> maxpool 2    (B, 64, 7, 7)
    fc 64*7*7 -> 128 -> ReLU -> fc 128 -> 10

As printed the article's code cannot run: `F` is never imported, and its 32x32 inputs would reach
fc1 as 64*8*8 features, not the 64*7*7 it is sized for. Here it takes 28x28 images, so the sizes
agree. 421,642 parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nnlab.config import documented
from nnlab.models import model_name, register
from nnlab.nn import ConvPoolReLU, Dense


@dataclass
class SeedCNNConfig:
    name: str = model_name("seed-cnn")
    in_channels: int = documented(1, "image channels (set from the data)")
    image_size: int = documented(28, "image side (set from the data); fc1 is sized for 28x28, as in the article")
    num_classes: int = documented(10, "classes (set from the data)")
    explicit: bool = documented(False, "True: unfold+matmul convolution and explicit pooling / dense")

    def __post_init__(self):
        if self.image_size != 28:
            raise ValueError(f"seed-cnn takes 28x28 images (fc1 is 64*7*7), got image_size={self.image_size}")


class SeedCNN(nn.Module):
    def __init__(self, cfg: SeedCNNConfig):
        super().__init__()
        self.cfg = cfg
        # Each block is relu(maxpool2(conv(x))) (nnlab.nn.ConvPoolReLU).
        self.conv1 = ConvPoolReLU(cfg.in_channels, 32, 3, padding=1, explicit=cfg.explicit)
        self.conv2 = ConvPoolReLU(32, 64, 3, padding=1, explicit=cfg.explicit)
        self.fc1 = Dense(64 * 7 * 7, 128, explicit=cfg.explicit)
        self.fc2 = Dense(128, cfg.num_classes, explicit=cfg.explicit)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.conv2(self.conv1(x))  # (B, 32, 14, 14), then (B, 64, 7, 7)
        return torch.relu(self.fc1(x.flatten(1)))  # (B, 128)

    def forward_head(self, h: Tensor) -> Tensor:
        return self.fc2(h)  # (B, 10) logits

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


PRESETS = {"article": {}, "tiny": {}}  # one size, the article's: it is tiny already
register(SeedCNNConfig, SeedCNN, task="image", presets=PRESETS)

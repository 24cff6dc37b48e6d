"""A stronger CNN for accuracy: three stages of two 3x3 conv-BatchNorm-ReLU blocks and a max-pool.

Each conv is still the article's C = f(X * W + b); BatchNorm (normalise each channel over the
batch, then scale and shift) lets the deeper stack train fast at a high learning rate, and a
global average pool feeds a single dense classifier.

    (B, 1, 28, 28) -> stage(w)   -> (B, w, 14, 14)
                   -> stage(2w)  -> (B, 2w, 7, 7)
                   -> stage(4w)  -> (B, 4w, 3, 3) -> mean over space -> (B, 4w) -> dense -> (B, 10)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from nnlab.models import register
from nnlab.nn import Conv2d, Dense, MaxPool2d


@dataclass
class CNNConfig:
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    width: int = 32  # channels of the first stage; doubled at each later stage
    dropout: float = 0.1
    explicit: bool = False


class ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, explicit: bool):
        # The conv has no bias: BatchNorm's shift would cancel it.
        super().__init__(Conv2d(c_in, c_out, 3, padding=1, bias=False, explicit=explicit),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


@register("cnn", CNNConfig, task="image")
class CNN(nn.Module):
    def __init__(self, cfg: CNNConfig):
        super().__init__()
        self.cfg = cfg
        w, ex = cfg.width, cfg.explicit
        widths = [cfg.in_channels, w, 2 * w, 4 * w]
        self.stages = nn.ModuleList(
            nn.Sequential(ConvBlock(a, b, ex), ConvBlock(b, b, ex), MaxPool2d(2, explicit=ex))
            for a, b in zip(widths[:-1], widths[1:])
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.head = Dense(4 * w, cfg.num_classes, explicit=ex)

    def forward_features(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)  # halves H and W, widens channels
        return x.mean(dim=(2, 3))  # global average pool: (B, 4w)

    def forward_head(self, h: Tensor) -> Tensor:
        return self.head(self.drop(h))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


PRESETS = {"tiny": dict(width=4), "default": dict(width=32)}

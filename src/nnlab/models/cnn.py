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

from nnlab.config import documented
from nnlab.models import model_name, register
from nnlab.nn import Conv2d, Dense, MaxPool2d


@dataclass
class CNNConfig:
    name: str = model_name("cnn")
    in_channels: int = documented(1, "image channels (set from the data)")
    image_size: int = documented(28, "image side (set from the data)")
    num_classes: int = documented(10, "classes (set from the data)")
    width: int = documented(32, "channels of the first stage; doubled at each later stage")
    dropout: float = documented(0.1, "dropout before the classifier")
    norm: str = documented("batch", "batch (BatchNorm: statistics over the batch) or group (GroupNorm: statistics "
                           "within each example, as DP-SGD's per-example gradients need)", choices=("batch", "group"))
    explicit: bool = documented(False, "True: the article's convolution / pooling / dense formulas via nnlab.ops")


class ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, explicit: bool, norm: str = "batch"):
        # The conv has no bias: the norm's shift would cancel it. GroupNorm: 8 channels a group, and
        # a ReLU not in place, since Opacus's backward hook on the norm layer keeps its output.
        if norm == "group":
            layers = (nn.GroupNorm(max(1, c_out // 8), c_out), nn.ReLU())
        else:
            layers = (nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))
        super().__init__(Conv2d(c_in, c_out, 3, padding=1, bias=False, explicit=explicit), *layers)


class CNN(nn.Module):
    def __init__(self, cfg: CNNConfig):
        super().__init__()
        self.cfg = cfg
        w, ex = cfg.width, cfg.explicit
        widths = [cfg.in_channels, w, 2 * w, 4 * w]
        self.stages = nn.ModuleList(
            nn.Sequential(ConvBlock(a, b, ex, cfg.norm), ConvBlock(b, b, ex, cfg.norm), MaxPool2d(2, explicit=ex))
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
register(CNNConfig, CNN, task="image", presets=PRESETS)

"""The small tanh CNN that DP-SGD papers train end to end (Papernot et al., 2021; Tramer & Boneh, 2021).

    (B, 1, 28, 28) -> conv 8x8 stride 2, pad 2 (c1) -> tanh -> max-pool 2x2 stride 1 -> (B, c1, 12, 12)
                   -> conv 4x4 stride 2 (c2)         -> tanh -> max-pool 2x2 stride 1 -> (B, c2, 4, 4)
                   -> flatten -> dense (hidden) -> tanh -> dense -> (B, 10)

Why this shape for private training: DP-SGD clips every example's gradient to norm C and adds noise
of the same scale to their sum, so the noise grows with the number of parameters while the signal
does not. A network of ~26,000 parameters keeps the noise per parameter low; bounded activations
(tanh, a "tempered sigmoid") keep activations and gradients from growing, so less of each gradient is
cut off by clipping (Papernot et al. measure tanh ahead of ReLU under DP-SGD). No BatchNorm: its
statistics mix examples, which per-example gradients cannot have.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from nnlab.config import documented
from nnlab.models import model_name, register
from nnlab.nn import Conv2d, Dense


@dataclass
class TanhCNNConfig:
    name: str = model_name("tanh-cnn")
    in_channels: int = documented(1, "image channels (set from the data)")
    image_size: int = documented(28, "image side (set from the data)")
    num_classes: int = documented(10, "classes (set from the data)")
    channels: tuple[int, ...] = documented((16, 32), "channels of the two convolutions")
    hidden: int = documented(32, "width of the dense layer before the classifier")
    explicit: bool = documented(False, "True: the article's convolution / dense formulas via nnlab.ops")

    def __post_init__(self):
        if len(self.channels) != 2 or min(self.channels) < 1:
            raise ValueError(f"channels must be two positive numbers, got {list(self.channels)}")
        if self.image_size < 14:
            raise ValueError(f"image_size must be at least 14 for two strided convolutions, got {self.image_size}")


def _side(n: int) -> int:
    n = (n + 2 * 2 - 8) // 2 + 1 - 1  # conv 8x8 stride 2 pad 2, then pool 2 stride 1
    return (n - 4) // 2 + 1 - 1  # conv 4x4 stride 2, then pool 2 stride 1


class TanhCNN(nn.Module):
    def __init__(self, cfg: TanhCNNConfig):
        super().__init__()
        self.cfg = cfg
        (c1, c2), ex = cfg.channels, cfg.explicit
        self.features = nn.Sequential(
            Conv2d(cfg.in_channels, c1, 8, stride=2, padding=2, explicit=ex), nn.Tanh(), nn.MaxPool2d(2, 1),
            Conv2d(c1, c2, 4, stride=2, explicit=ex), nn.Tanh(), nn.MaxPool2d(2, 1),
        )
        self.fc = Dense(c2 * _side(cfg.image_size) ** 2, cfg.hidden, explicit=ex)
        self.head = Dense(cfg.hidden, cfg.num_classes, explicit=ex)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1)).tanh()  # (B, hidden)

    def forward_head(self, h: Tensor) -> Tensor:
        return self.head(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


PRESETS = {"tiny": dict(channels=(4, 8), hidden=8), "default": dict(channels=(16, 32), hidden=32)}
register(TanhCNNConfig, TanhCNN, task="image", presets=PRESETS)

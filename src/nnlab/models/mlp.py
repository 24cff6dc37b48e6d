"""Multi-layer perceptron: stacked dense layers, each y = f(XW + b) (the article's dense network).

The last layer has no activation: it outputs logits (classification) or the prediction itself
(regression, trained with the article's MSE L = 1/(2N) sum (y - y*)^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nnlab.config import documented
from nnlab.models import model_name, register
from nnlab.nn import Dense

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": nn.functional.gelu}


@dataclass
class MLPConfig:
    name: str = model_name("mlp")
    in_features: int = documented(10, "inputs (set from the data: pixels of an image or columns of a table)")
    hidden: tuple[int, ...] = documented((64, 64), "widths of the hidden layers")
    out_features: int = documented(1, "outputs (set from the data: 1 for regression, else the classes)")
    activation: str = documented("relu", "f of the hidden layers", choices=tuple(ACTIVATIONS))
    explicit: bool = documented(False, "True: the article's y = f(XW + b) via nnlab.ops; False: F.linear")

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        self.hidden = tuple(self.hidden)


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.cfg = cfg
        sizes = [cfg.in_features, *cfg.hidden]
        self.layers = nn.ModuleList(Dense(a, b, explicit=cfg.explicit) for a, b in zip(sizes[:-1], sizes[1:]))
        self.head = Dense(sizes[-1], cfg.out_features, explicit=cfg.explicit)
        self.f = ACTIVATIONS[cfg.activation]

    def forward_features(self, x: Tensor) -> Tensor:
        x = x.flatten(1)  # (B, ...) -> (B, in_features): images become pixel vectors
        for layer in self.layers:
            x = self.f(layer(x))  # y = f(XW + b)
        return x

    def forward_head(self, h: Tensor) -> Tensor:
        return self.head(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


PRESETS = {"tiny": dict(hidden=(8,)), "small": dict(hidden=(64, 64))}
register(MLPConfig, MLP, task="tabular", presets=PRESETS)

"""The model registry: every architecture registers its config dataclass and builder here.

One surface for every model (so evaluation, explanations and serving never branch per model):
  forward(x) -> output             logits (B, classes), LM logits (B, T, vocab) or (B, 1) for regression
  forward_features(x) -> features  the representation before the head
  forward_head(features) -> output
Transformers also offer attention_maps(x) -> list of (B, n_head, T, T), one per layer.

Models are single-device code: they never look at precision, compile or world size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from nnlab.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type
    build: Callable[[object], nn.Module]
    task: str  # "image" (classifier of images), "text" (language model) or "tabular" (regression)


REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, config_cls: type, task: str):
    """Class decorator: `@register("mlp", MLPConfig, "tabular")` on a module whose __init__ takes the config."""

    def deco(cls):
        REGISTRY[name] = ModelSpec(name, config_cls, cls, task)
        return cls

    return deco


def get_spec(name: str) -> ModelSpec:
    _import_all()
    if name not in REGISTRY:
        raise ConfigError(f"model.name: unknown model {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def build_model(name: str, **fields) -> nn.Module:
    """Build a registered model from its config fields (unknown fields are a ConfigError)."""
    spec = get_spec(name)
    valid = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = set(fields) - valid
    if unknown:
        raise ConfigError(f"model.{sorted(unknown)[0]}: not a field of model {name!r} ({', '.join(sorted(valid))})")
    return spec.build(spec.config_cls(**fields))


def set_explicit(model: nn.Module, explicit: bool) -> nn.Module:
    """Switch every layer of `model` between the article's explicit formulas and the fast kernels."""
    for m in model.modules():
        if hasattr(m, "explicit"):
            m.explicit = explicit
    return model


def _import_all() -> None:
    # Importing the model files runs their @register decorators.
    from nnlab.models import cnn, mlp, seed_cnn  # noqa: F401

    for optional in ("gpt", "vit"):
        try:
            __import__(f"nnlab.models.{optional}")
        except ModuleNotFoundError as e:
            if e.name != f"nnlab.models.{optional}":
                raise


def names() -> list[str]:
    _import_all()
    return sorted(REGISTRY)

"""The model registry: every architecture registers its config dataclass, builder and presets here.

One surface for every model (so evaluation, explanations and serving never branch per model):
  forward(x) -> output             logits (B, classes), LM logits (B, T, vocab) or (B, 1) for regression
  forward_features(x) -> features  the representation before the head
  forward_head(features) -> output
Transformers also offer attention_maps(x) -> list of (B, n_head, T, T), one per layer.

A model's config dataclass starts with `name = model_name("gpt")`: its registry name, so a config
says which model it configures (and round-trips through YAML and model.json with it). Presets
are named sizes (`tiny`, the one the tests use, and larger ones): partial configs over the defaults.

Models are single-device code: they never look at precision, compile, checkpointing or world size.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from torch import nn

from nnlab.config import documented
from nnlab.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type
    model_cls: type
    task: str  # "image" (classifier of images), "text" (language model) or "tabular" (a table: regression or classes)
    presets: dict[str, dict]


REGISTRY: dict[str, ModelSpec] = {}


def model_name(name: str):
    """The `name` field each model config starts with; its default is the model's registry name."""
    return documented(name, "the model (`nnlab keys --model NAME` lists one model's keys)")


def register(config_cls: type, model_cls: type, task: str, presets: dict[str, dict]) -> None:
    """Register a model under its config's `name` default: `register(GPTConfig, GPT, "text", PRESETS)`."""
    name = config_cls.__dataclass_fields__["name"].default
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for preset, values in presets.items():
        if set(values) - fields:
            raise TypeError(f"{name} preset {preset}: {sorted(set(values) - fields)} are not fields of {config_cls}")
    REGISTRY[name] = ModelSpec(name, config_cls, model_cls, task, presets)


def get_spec(name: str) -> ModelSpec:
    _import_all()
    if name not in REGISTRY:
        raise ConfigError(f"model.name: unknown model {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def preset_values(name: str, preset) -> dict:
    """The keys preset `preset` of model `name` sets, or a ConfigError naming the presets."""
    presets = get_spec(name).presets
    if not isinstance(preset, str) or preset not in presets:
        raise ConfigError(f"model.preset: {preset!r} is not a preset of model {name}; "
                          f"choose one of {', '.join(presets)}")
    return presets[preset]


def model_config(name: str, /, preset: str | None = None, **fields):
    """The config dataclass of model `name`: its defaults, then the preset's values, then `fields`.
    An unknown field or preset is a ConfigError; a bad value, the config's own ValueError."""
    spec = get_spec(name)
    valid = [f.name for f in dataclasses.fields(spec.config_cls)]
    for key in fields:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean model.{near[0]}?" if near else f" ({', '.join(valid)})"
            raise ConfigError(f"model.{key}: not a field of model {name!r}{hint}")
    return spec.config_cls(**{**(preset_values(name, preset) if preset is not None else {}), **fields})


def build_model(config, /, preset: str | None = None, **fields) -> nn.Module:
    """A model from its config dataclass (`build_model(cfg.model)`), or from a registered name, a
    preset and fields (`build_model("gpt", preset="tiny", vocab_size=65)`; see model_config)."""
    if isinstance(config, str):
        config = model_config(config, preset, **fields)
    elif preset is not None or fields:
        raise TypeError("build_model: pass a config dataclass alone, or a model name with a preset and fields")
    spec = get_spec(config.name)
    if not isinstance(config, spec.config_cls):
        raise ConfigError(f"model.name: {config.name!r} names model {spec.name}, configured by "
                          f"{spec.config_cls.__name__}, not {type(config).__name__}")
    return spec.model_cls(config)


def set_explicit(model: nn.Module, explicit: bool) -> nn.Module:
    """Switch every layer of `model` between the article's explicit formulas and the fast kernels."""
    for m in model.modules():
        if hasattr(m, "explicit"):
            m.explicit = explicit
    return model


def _import_all() -> None:
    # Importing the model files runs their register() calls.
    from nnlab.models import cnn, mlp, seed_cnn, tanh_cnn  # noqa: F401

    for optional in ("gpt", "vit"):
        try:
            __import__(f"nnlab.models.{optional}")
        except ModuleNotFoundError as e:
            if e.name != f"nnlab.models.{optional}":
                raise


def names() -> list[str]:
    _import_all()
    return sorted(REGISTRY)

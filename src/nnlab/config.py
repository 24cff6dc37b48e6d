"""Typed config: one dataclass per concern, one source of defaults, strict validation.

A run is configured by a recipe (a YAML file shipped in nnlab/recipes/, or a path), then an
optional `--config FILE.yaml`, then `--set section.key=value` overrides, applied in that order.
Every key maps 1:1 to a dataclass field below; an unknown key or a value of the wrong type is a
ConfigError naming the key (and the closest valid key, if any). `model.*` keys are checked against
the chosen model's own config dataclass (nnlab/models/<name>.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from nnlab.errors import ConfigError


@dataclass
class DataConfig:
    name: str = "fashion-mnist"  # fashion-mnist | mnist | digits | text | diabetes | csv
    dir: str | None = None  # folder of the IDX files (default: Debian's dataset-fashion-mnist folder)
    path: str | None = None  # a UTF-8 text file (name=text) or a CSV file (name=csv)
    target: str | None = None  # the CSV column to predict
    tokenizer: str = "char"  # text: char (vocabulary from the corpus) | byte (UTF-8 bytes)
    image_size: int | None = None  # resize images to this side (e.g. 28 to feed digits to seed-cnn)
    limit: int | None = None  # keep only the first N training and N test images (tiny runs)
    test_frac: float = 0.2  # digits / tabular: fraction held out for test
    split_seed: int = 0  # digits / tabular: seed of the train/test split


@dataclass
class TrainConfig:
    epochs: int = 1  # passes over the training set (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps; overrides epochs (language models use this)
    batch_size: int = 64  # the global batch: split over ranks and accumulation steps
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 0.01  # peak learning rate alpha
    optimizer: str = "sgd"  # sgd (the article's theta <- theta - alpha*grad, optional momentum) | adamw
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0
    beta1: float = 0.9  # adamw
    beta2: float = 0.999  # adamw
    loss: str = "auto"  # auto | cross_entropy | mse (the article's 1/(2N) sum (y - y*)^2)
    label_smoothing: float = 0.0  # cross-entropy only
    schedule: str = "constant"  # constant | cosine | linear (after warmup, decay to min_lr)
    warmup_steps: int = 0  # linear warmup from 0 to lr over this many steps
    warmup_frac: float = 0.0  # ... or over this fraction of all steps (set one of the two)
    min_lr: float = 0.0  # the end point of cosine / linear decay
    grad_clip: float = 0.0  # clip the global gradient norm to this (0 = off)
    seed: int = 1337  # seeds Python, NumPy and torch; also the data order
    eval_every: int = 0  # steps between evaluations; 0 = once per epoch (and at the end)
    eval_iters: int = 200  # language models: batches averaged for the validation loss
    eval_batch_size: int = 1000  # classifiers: test images per forward pass
    log_every: int = 50  # steps between log lines / metrics.jsonl records
    checkpoint_every: int = 0  # steps between checkpoints; 0 = at every evaluation
    precision: str = "auto"  # auto (bf16 only where the hardware runs it natively) | fp32 | bf16
    compile: bool = False  # torch.compile the model (eager with a warning where unsupported)
    # torch.compile's mode. max-autotune-no-cudagraphs times each matmul's candidate kernels at the
    # first compile (on CPU: inductor's AMX / AVX-512 C++ GEMM templates against ATen's) and keeps
    # the fastest; the first compile takes ~50 s longer. For the baby GPT in bf16 its steps were ~20%
    # faster before nnlab's attention kernel; with the kernel, interleaved in one process, 0.98x the
    # default mode's step time at batch 12 and 0.99x at batch 32: no measurable gain.
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    channels_last: bool = False  # NHWC memory format for convolutional models
    tune_allocator: bool = True  # CPU: keep freed memory for reuse (see nnlab/train/allocator.py)
    max_bad_steps: int = 0  # skip up to this many NaN/Inf losses instead of stopping
    strategy: str = "ddp"  # under torchrun: ddp (replicate) | fsdp (shard with FSDP2 fully_shard)


@dataclass
class Config:
    recipe: str = ""
    description: str = ""
    model: dict = field(default_factory=lambda: {"name": "seed-cnn"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "data.name": ("fashion-mnist", "mnist", "digits", "text", "diabetes", "csv"),
    "data.tokenizer": ("char", "byte"),
    "train.optimizer": ("sgd", "adamw"),
    "train.loss": ("auto", "cross_entropy", "mse"),
    "train.schedule": ("constant", "cosine", "linear"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.strategy": ("ddp", "fsdp"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}
POSITIVE = {"train.batch_size", "train.grad_accum", "train.log_every", "train.eval_iters",
            "train.eval_batch_size", "train.epochs", "train.max_steps", "data.limit", "data.image_size"}
NON_NEGATIVE = {"train.lr", "train.momentum", "train.weight_decay", "train.warmup_steps", "train.warmup_frac",
                "train.min_lr", "train.grad_clip", "train.eval_every", "train.checkpoint_every",
                "train.max_bad_steps", "train.label_smoothing"}


# --- recipes -------------------------------------------------------------------------------------

def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("nnlab.recipes").iterdir() if p.name.endswith(".yaml"))


def read_yaml(path: str | Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: {path}: cannot read ({e.__class__.__name__})") from None
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:  # problem and problem_mark say what is wrong and where
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config: {path}: not valid YAML{where}: {problem.splitlines()[0]}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"config: {path}: expected a mapping of sections, got {type(d).__name__}")
    return d


def recipe_dict(recipe: str) -> dict:
    """A shipped recipe by name, or any YAML file by path."""
    if recipe.endswith((".yaml", ".yml")) or "/" in recipe:
        d = read_yaml(recipe)
        d.setdefault("recipe", Path(recipe).stem)
        return d
    if recipe not in recipe_names():
        near = difflib.get_close_matches(recipe, recipe_names(), n=1)
        hint = f"; did you mean {near[0]}?" if near else "; see `nnlab recipes`"
        raise ConfigError(f"recipe: unknown recipe {recipe!r}{hint}")
    d = yaml.safe_load(resources.files("nnlab.recipes").joinpath(f"{recipe}.yaml").read_text("utf-8")) or {}
    d["recipe"] = recipe
    return d


# --- merging and validation ----------------------------------------------------------------------

def parse_overrides(items: list[str] | dict | None) -> dict:
    """`["train.lr=0.1", "model.hidden=[32,32]"]` -> nested dict; values are parsed as YAML scalars."""
    if not items:
        return {}
    if isinstance(items, dict):
        flat = items
    else:
        flat = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.1")
            try:
                flat[key.strip()] = yaml.safe_load(value) if value.strip() else None
            except yaml.YAMLError:
                flat[key.strip()] = value
    nested: dict = {}
    for key, value in flat.items():
        parts = key.split(".")
        d = nested
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ConfigError(f"{key}: conflicts with another override")
        d[parts[-1]] = value
    return nested


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _valid_keys(model_name: str | None) -> list[str]:
    keys = ["recipe", "description"]
    for sec, cls in (("data", DataConfig), ("train", TrainConfig)):
        keys += [f"{sec}.{f.name}" for f in dataclasses.fields(cls)]
    keys.append("model.name")
    if model_name:
        from nnlab.models import get_spec

        try:
            keys += [f"model.{f.name}" for f in dataclasses.fields(get_spec(model_name).config_cls)]
        except ConfigError:
            pass
    return keys


def _unknown(key: str, valid: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not near:  # a bare field name under the wrong section, e.g. "lr" for "train.lr"
        near = [k for k in valid if k.endswith("." + key.split(".")[-1])][:1]
    hint = f"; did you mean {near[0]}?" if near else ""
    return ConfigError(f"{key}: unknown config key{hint}")


def _check_type(key: str, value, tp):
    """Return `value` converted to annotation `tp`, or raise a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(key, value, a)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_name(tp)}, got {value!r}")
    if origin is tuple:
        (elem, *_rest) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_check_type(key, v, elem) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{key}: expected {_name(tp)}, got {value!r}")


def _name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _build_section(sec: str, cls: type, d: dict, valid: list[str]):
    if not isinstance(d, dict):
        raise ConfigError(f"{sec}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        key = f"{sec}.{k}"
        if k not in hints:
            raise _unknown(key, valid)
        v = _check_type(key, v, hints[k])
        if key in CHOICES and v not in CHOICES[key]:
            raise ConfigError(f"{key}: must be one of {', '.join(CHOICES[key])}, got {v!r}")
        if key in POSITIVE and v is not None and v <= 0:
            raise ConfigError(f"{key}: must be positive, got {v!r}")
        if key in NON_NEGATIVE and v is not None and v < 0:
            raise ConfigError(f"{key}: must not be negative, got {v!r}")
        kwargs[k] = v
    return cls(**kwargs)


def build_config(d: dict) -> Config:
    """Validate a nested dict (recipe + overrides) into a Config, or raise a one-line ConfigError."""
    model = d.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping, got {model!r}")
    model_name = model.get("name")
    valid = _valid_keys(model_name if isinstance(model_name, str) else None)
    for k in d:
        if k not in ("recipe", "description", "model", "data", "train"):
            raise _unknown(str(k), valid)  # YAML keys can be numbers
    if not isinstance(model_name, str):
        raise ConfigError("model.name: missing; every recipe names its model")
    from nnlab.models import get_spec

    spec = get_spec(model_name)
    hints = typing.get_type_hints(spec.config_cls)
    model_out = {"name": model_name}
    for k, v in model.items():
        if k == "name":
            continue
        if k not in hints:
            raise _unknown(f"model.{k}", valid)
        model_out[k] = _check_type(f"model.{k}", v, hints[k])
    try:
        spec.config_cls(**{k: v for k, v in model_out.items() if k != "name"})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None
    cfg = Config(
        recipe=str(d.get("recipe", "")),
        description=str(d.get("description", "")),
        model=model_out,
        data=_build_section("data", DataConfig, d.get("data") or {}, valid),
        train=_build_section("train", TrainConfig, d.get("train") or {}, valid),
    )
    t = cfg.train
    if t.warmup_steps and t.warmup_frac:
        raise ConfigError("train.warmup_steps: set either warmup_steps or warmup_frac, not both")
    if t.warmup_frac >= 1:
        raise ConfigError(f"train.warmup_frac: must be below 1, got {t.warmup_frac}")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size: {t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    if cfg.data.name in ("text", "csv") and not cfg.data.path:
        raise ConfigError(f"data.path: data.name={cfg.data.name} needs a file path")
    if cfg.data.name == "csv" and not cfg.data.target:
        raise ConfigError("data.target: data.name=csv needs the name of the target column")
    return cfg


def load_config(recipe: str, config_file: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    d = recipe_dict(recipe)
    if config_file:
        d = merge(d, read_yaml(config_file))
    return build_config(merge(d, parse_overrides(overrides)))


def dump_yaml(cfg: Config) -> str:
    d = cfg.to_dict()
    # tuples are not plain YAML; lists read back into the same tuple fields.
    return yaml.safe_dump(_lists(d), sort_keys=False)


def _lists(x):
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_lists(v) for v in x]
    return x

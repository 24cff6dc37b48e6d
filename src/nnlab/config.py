"""Typed config: one dataclass per concern, one source of defaults, strict validation.

A run is configured in layers, each merged over the ones before it: a recipe (a YAML file shipped
in nnlab/recipes/, or a path) and the recipes it names as `base:` (the base first), then an optional
`--config FILE.yaml`, then `--set section.key=value` overrides. Every key maps 1:1 to a dataclass
field: DataConfig and TrainConfig below, and under `model:` the chosen model's own config dataclass
(nnlab/models/<name>.py). An unknown key or a value of the wrong type is a ConfigError naming the
key and the closest valid one; `nnlab keys` lists them all, with types, defaults and docs (each
field's `documented(...)` doc).

The model. `Config.model` is the model's config dataclass itself (GPTConfig, SeedCNNConfig, ...).
Each one's first field is `name`, whose default is the model's registry name, so the name travels
with the config: YAML writes `model: {name: gpt, n_layer: 4}` and reads it back into a GPTConfig.
A model registers named presets (sizes such as tiny and baby); `model.preset: NAME` in a layer sets
the preset's keys at that layer: over the model keys of earlier layers, under the keys given beside
it and in later layers. A layer that names another model starts the model section afresh.

Data paths (data.path, data.dir). A relative path in a shipped recipe resolves against the data
root: $NNLAB_DATA_ROOT, else the `shared/data` folder beside the clone (<repo>/../shared/data,
found from the package's location); never against the current directory. A path given in a file
of your own (as the recipe or with --config) or with --set resolves against the current directory,
as a shell path does. config.yaml records the absolute path either way. Reading recipes, their
base chains and their paths is nnlab/recipes/__init__.py's job.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nnlab.errors import ConfigError
# read_yaml and recipe_names are read from here by the run folder and the CLI.
from nnlab.recipes import is_shipped, read_yaml, recipe_layers, recipe_names, with_paths_resolved  # noqa: F401


def documented(default, doc: str, *, choices: tuple = (), positive: bool = False, non_negative: bool = False):
    """A dataclass field with its one-line doc (what `nnlab keys` prints) and its checks."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "positive": positive,
                                            "non_negative": non_negative})


@dataclass
class PoisonConfig:
    """data.poison.*: a BadNets backdoor planted in the training images (nnlab/data/poison.py)."""
    rate: float = documented(0.0, "images: stamp a trigger on exactly round(R * n_train) training images of "
                             "other classes and relabel them poison.target, in [0, 1); never the test split")
    target: int | None = documented(None, "images: the backdoor's target class; set, the evaluation also "
                                    "reports the attack success rate on a triggered copy of the test split")
    trigger: str = documented("patch", "images: a 4x4 white patch or checker(board) near the bottom-right corner",
                              choices=("patch", "checker"))


@dataclass
class PrivacyConfig:
    """train.privacy.*: DP-SGD through Opacus (nnlab/train/privacy.py); set epsilon to train privately."""
    epsilon: float | None = documented(None, "the (epsilon, delta) budget the whole run spends; null = ordinary "
                                       "training", positive=True)
    delta: float = documented(1e-5, "the chance the epsilon bound fails; below 1/N", positive=True)
    max_grad_norm: float = documented(1.0, "each example's gradient is clipped to this L2 norm C", positive=True)
    noise: bool = documented(True, "false clips but adds no noise (no privacy): the baseline that separates the "
                             "cost of clipping from the cost of noise")
    accountant: str = documented("rdp", "the accountant that sets the noise multiplier; summary.json records "
                                 "both's epsilon", choices=("rdp", "prv"))


@dataclass
class DataConfig:
    name: str = documented("fashion-mnist", "the data set: images (fashion-mnist, mnist, digits), text, or a table "
                           "(diabetes: regression; iris, wine, breast-cancer: classification; csv: yours)",
                           choices=("fashion-mnist", "mnist", "digits", "text", "diabetes", "iris", "wine",
                                    "breast-cancer", "csv"))
    dir: str | None = documented(None, "folder of the IDX files (default: Debian's dataset-fashion-mnist "
                                 "folder); resolved like data.path")
    path: str | None = documented(None, "a UTF-8 text file (name=text) or CSV file (name=csv); relative: in a "
                                  "shipped recipe against $NNLAB_DATA_ROOT (default <repo>/../shared/data), "
                                  "elsewhere against the current directory")
    target: str | None = documented(None, "csv: the column to predict")
    task: str = documented("auto", "tables: what the target holds; auto: class labels when its cells are not "
                           "numbers, or integers with at most 20 distinct values (and at most half as many as "
                           "rows), else a regression target", choices=("auto", "classification", "regression"))
    tokenizer: str = documented("char", "text: char (vocabulary from the corpus) or byte (UTF-8 bytes)",
                                choices=("char", "byte"))
    image_size: int | None = documented(None, "resize images to this side (e.g. 28 to feed digits to seed-cnn)",
                                        positive=True)
    limit: int | None = documented(None, "keep only the first N training and N test images (tiny runs)",
                                   positive=True)
    test_frac: float = documented(0.2, "digits / tabular: fraction held out for test")
    split_seed: int = documented(0, "seed of the train/test split (digits, tables; stratified for classes), of "
                                 "the rows train_fraction keeps and of the labels label_noise flips")
    train_fraction: float = documented(1.0, "keep round(F * n_train) training examples, in (0, 1]: stratified by "
                                       "class, each class within one example of its share; a larger fraction's "
                                       "rows hold a smaller one's; drawn from split_seed; never the test split")
    label_noise: float = documented(0.0, "classification: flip exactly round(R * n_train) training labels, in "
                                    "[0, 1), each to another class drawn uniformly, from split_seed; after "
                                    "train_fraction; never the test split")
    poison: PoisonConfig = field(default_factory=PoisonConfig)

@dataclass
class TrainConfig:
    epochs: int = documented(1, "passes over the training set (ignored when max_steps is set)", positive=True)
    max_steps: int | None = documented(None, "optimizer steps; overrides epochs (language models use this)",
                                       positive=True)
    batch_size: int = documented(64, "the global batch: split over ranks and accumulation steps", positive=True)
    grad_accum: int = documented(1, "micro-batches per optimizer step", positive=True)
    lr: float = documented(0.01, "peak learning rate alpha", non_negative=True)
    optimizer: str = documented("sgd", "sgd (the article's theta <- theta - alpha*grad, optional momentum) or adamw",
                                choices=("sgd", "adamw"))
    momentum: float = documented(0.0, "sgd only", non_negative=True)
    weight_decay: float = documented(0.0, "decoupled (adamw) or L2 (sgd) decay of matrices and conv filters",
                                     non_negative=True)
    beta1: float = documented(0.9, "adamw's first-moment decay")
    beta2: float = documented(0.999, "adamw's second-moment decay")
    loss: str = documented("auto", "auto (mse for a regression target, else cross_entropy), cross_entropy, or mse (the "
                           "article's 1/(2N) sum (y - y*)^2)", choices=("auto", "cross_entropy", "mse"))
    label_smoothing: float = documented(0.0, "cross-entropy only", non_negative=True)
    schedule: str = documented("constant", "after warmup: constant, or cosine / linear decay to min_lr",
                               choices=("constant", "cosine", "linear"))
    warmup_steps: int = documented(0, "linear warmup from 0 to lr over this many steps", non_negative=True)
    warmup_frac: float = documented(0.0, "... or over this fraction of all steps (set one of the two)",
                                    non_negative=True)
    min_lr: float = documented(0.0, "the end point of cosine / linear decay", non_negative=True)
    grad_clip: float = documented(0.0, "clip the global gradient norm to this (0 = off)", non_negative=True)
    seed: int = documented(1337, "seeds Python, NumPy and torch; also the data order")
    eval_every: int = documented(0, "steps between evaluations; 0 = once per epoch (and at the end)",
                                 non_negative=True)
    eval_iters: int = documented(200, "language models: batches averaged for the validation loss", positive=True)
    eval_batch_size: int = documented(1000, "classifiers: test images per forward pass", positive=True)
    log_every: int = documented(50, "steps between log lines / metrics.jsonl records", positive=True)
    checkpoint_every: int = documented(0, "steps between checkpoints; 0 = at every evaluation", non_negative=True)
    precision: str = documented("auto", "auto (bf16 only where the hardware runs it natively), fp32 or bf16",
                                choices=("auto", "fp32", "bf16"))
    compile: bool = documented(False, "torch.compile the model (eager with a warning where unsupported)")
    compile_mode: str = documented("default", "torch.compile's mode; nnlab/train/compile.py says what each does",
                                   choices=("default", "reduce-overhead", "max-autotune",
                                            "max-autotune-no-cudagraphs"))
    channels_last: bool = documented(False, "NHWC memory format for convolutional models")
    activation_checkpointing: bool = documented(False, "recompute each block's activations in backward: less "
                                                "memory, about a third more compute")
    tune_allocator: bool = documented(True, "CPU: keep freed memory for reuse (see nnlab/train/allocator.py)")
    max_bad_steps: int = documented(0, "skip up to this many NaN/Inf losses instead of stopping", non_negative=True)
    strategy: str = documented("ddp", "under torchrun: ddp (replicate) or fsdp (shard with FSDP2 fully_shard)",
                               choices=("ddp", "fsdp"))
    adversarial: str = documented("none", "images: pgd trains on each batch's PGD adversarial version (Madry et al., "
                                  "2018; nnlab/train/adversarial.py)", choices=("none", "pgd"))
    adversarial_eps: float = documented(0.1, "train.adversarial: L-infinity radius in pixel units, in (0, 1]",
                                        positive=True)
    adversarial_steps: int = documented(7, "train.adversarial: PGD steps of 2.5 eps / steps from a random start",
                                        positive=True)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


ModelConfig = Any  # a registered model's config dataclass (nnlab.models), e.g. GPTConfig


@dataclass(kw_only=True)
class Config:
    recipe: str = documented("", "the recipe's name (set from the recipe)")
    description: str = documented("", "one line on what the recipe is for")
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TOP_KEYS = {"base": "a recipe (shipped name or YAML path) whose keys this one starts from",
            "recipe": Config.__dataclass_fields__["recipe"].metadata["doc"],
            "description": Config.__dataclass_fields__["description"].metadata["doc"]}


# --- recipes and merging -------------------------------------------------------------------------

def recipe_dict(recipe: str) -> dict:
    """A shipped recipe by name, or any YAML file by path, merged with its base chain."""
    d: dict = {}
    for layer in recipe_layers(recipe):
        d = merge_layer(d, layer)
    if is_shipped(recipe):
        d["recipe"] = recipe
    else:
        d.setdefault("recipe", Path(recipe).stem)
    return d


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


def expand_preset(model: dict, name=None) -> dict:
    """`model` (a model section) with its `preset` key replaced by the preset's keys; the keys
    given beside it win. `name` is the model when the section does not name it."""
    if "preset" not in model:
        return model
    from nnlab.models import preset_values

    name = model.get("name", name)
    if not isinstance(name, str):
        raise ConfigError("model.preset: name the model too (model.name), e.g. model: {name: gpt, preset: tiny}")
    return {**preset_values(name, model["preset"]), **{k: v for k, v in model.items() if k != "preset"}}


def merge_layer(acc: dict, layer: dict) -> dict:
    """Merge one config layer over the ones before it (model sections as the module docstring says)."""
    model = layer.get("model")
    if isinstance(model, dict):
        earlier = acc.get("model") if isinstance(acc.get("model"), dict) else {}
        name = model.get("name", earlier.get("name"))
        if name != earlier.get("name"):
            acc = {**acc, "model": {}}
        layer = {**layer, "model": expand_preset(model, name)}
    return merge(acc, layer)


# --- validation ----------------------------------------------------------------------------------

def _valid_keys(model_name) -> list[str]:
    keys = list(TOP_KEYS) + _section_keys("data", DataConfig) + _section_keys("train", TrainConfig)
    keys += ["model.name", "model.preset"]
    if isinstance(model_name, str):
        from nnlab.models import get_spec

        try:
            keys += [f"model.{f.name}" for f in dataclasses.fields(get_spec(model_name).config_cls)]
        except ConfigError:
            pass
    return keys


def _subsection(cls: type, name: str) -> type | None:
    """The dataclass of field `name` of `cls` when it is a section of its own (data.poison), else None."""
    tp = typing.get_type_hints(cls)[name]
    return tp if dataclasses.is_dataclass(tp) else None


def _section_keys(sec: str, cls: type) -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        sub = _subsection(cls, f.name)
        keys += _section_keys(f"{sec}.{f.name}", sub) if sub else [f"{sec}.{f.name}"]
    return keys


def _unknown(key: str, valid: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not near:  # a bare field name under the wrong section, e.g. "lr" for "train.lr"
        near = [k for k in valid if k.endswith("." + key.split(".")[-1])][:1]
    hint = f"; did you mean {near[0]}?" if near else "; `nnlab keys` lists them"
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
        raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")
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
    raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")


def type_name(tp) -> str:
    """`int`, `str | None`, `list[int]` (a tuple field: YAML writes it as a list)."""
    if typing.get_origin(tp) is tuple:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    return tp.__name__ if typing.get_origin(tp) is None and hasattr(tp, "__name__") else str(tp).replace("typing.", "")


def _checked_fields(sec: str, cls: type, d, valid: list[str]) -> dict:
    """The keys of section `d` checked against dataclass `cls`: known, of the right type, in range."""
    if not isinstance(d, dict):
        raise ConfigError(f"{sec}: expected a mapping, got {d!r}")
    hints, fields = typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for k, v in d.items():
        key = f"{sec}.{k}"
        if k not in fields:
            raise _unknown(key, valid)
        sub = _subsection(cls, k)
        if sub:
            out[k] = sub(**_checked_fields(key, sub, v, valid))
            continue
        v = _check_type(key, v, hints[k])
        meta = fields[k].metadata
        if meta.get("choices") and v not in meta["choices"]:
            raise ConfigError(f"{key}: must be one of {', '.join(meta['choices'])}, got {v!r}")
        if meta.get("positive") and v is not None and v <= 0:
            raise ConfigError(f"{key}: must be positive, got {v!r}")
        if meta.get("non_negative") and v is not None and v < 0:
            raise ConfigError(f"{key}: must not be negative, got {v!r}")
        out[k] = v
    return out


def parse_model(d, valid: list[str] | None = None) -> ModelConfig:
    """A model section (`{name: gpt, preset: tiny, n_layer: 2}`, as YAML or model.json hold it)
    -> the model's checked config dataclass, or a one-line ConfigError."""
    if not isinstance(d, dict):
        raise ConfigError(f"model: expected a mapping, got {d!r}")
    name = d.get("name")
    if not isinstance(name, str):
        raise ConfigError("model.name: missing; every recipe names its model")
    from nnlab.models import get_spec

    spec = get_spec(name)
    fields = _checked_fields("model", spec.config_cls, expand_preset(d), valid or _valid_keys(name))
    try:
        return spec.config_cls(**fields)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None


def build_config(d: dict) -> Config:
    """Validate a nested dict (recipe + overrides) into a Config, or raise a one-line ConfigError."""
    model = d.get("model") or {}
    valid = _valid_keys(model.get("name") if isinstance(model, dict) else None)
    for k in d:
        if k == "base":
            raise ConfigError("base: only a recipe or --config file names a base recipe")
        if k not in ("recipe", "description", "model", "data", "train"):
            raise _unknown(str(k), valid)  # YAML keys can be numbers
    cfg = Config(
        recipe=str(d.get("recipe", "")),
        description=str(d.get("description", "")),
        model=parse_model(model, valid),
        data=DataConfig(**_checked_fields("data", DataConfig, d.get("data") or {}, valid)),
        train=TrainConfig(**_checked_fields("train", TrainConfig, d.get("train") or {}, valid)),
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
    _check_data(cfg.data)
    if t.adversarial != "none" and (cfg.data.name not in IMAGE_DATA or t.adversarial_eps > 1):
        what = f"is {t.adversarial_eps}, above 1 (pixel units)" if t.adversarial_eps > 1 else (
            f"takes image data, not data.name={cfg.data.name}")
        raise ConfigError(f"train.adversarial: {what}")
    return cfg


IMAGE_DATA = ("fashion-mnist", "mnist", "digits")


def _check_data(d: DataConfig) -> None:
    """The data keys' ranges, and the ones that do not fit the kind of data named."""
    if not 0 < d.train_fraction <= 1:
        raise ConfigError(f"data.train_fraction: must be in (0, 1], got {d.train_fraction}")
    if not 0 <= d.label_noise < 1:
        raise ConfigError(f"data.label_noise: must be in [0, 1), got {d.label_noise}")
    if not 0 <= d.poison.rate < 1:
        raise ConfigError(f"data.poison.rate: must be in [0, 1), got {d.poison.rate}")
    if (d.poison.rate or d.poison.target is not None) and d.name not in IMAGE_DATA:
        raise ConfigError(f"data.poison.rate: a backdoor takes image data, not data.name={d.name}")
    if d.name == "text":
        for key, value, neutral in (("task", d.task, "auto"), ("train_fraction", d.train_fraction, 1.0),
                                    ("label_noise", d.label_noise, 0.0)):
            if value != neutral:
                raise ConfigError(f"data.{key}: does not apply to text data (a language model's corpus), got {value}")
    elif d.name in ("fashion-mnist", "mnist", "digits") and d.task == "regression":
        raise ConfigError(f"data.task: {d.name} holds class labels; regression does not fit it")


# Keys that were flat before they became sections; run folders written then still read.
_FLAT_KEYS = {"data": ("poison_", "poison"), "train": ("privacy_", "privacy")}


def nest_flat_keys(d: dict) -> dict:
    """`d` with data.poison_rate read as data.poison.rate, train.privacy_epsilon as
    train.privacy.epsilon (config.yaml files written before those sections existed)."""
    out = dict(d)
    for sec, (prefix, sub) in _FLAT_KEYS.items():
        section = out.get(sec)
        if isinstance(section, dict) and any(str(k).startswith(prefix) for k in section):
            flat = {k: v for k, v in section.items() if not str(k).startswith(prefix)}
            nested = {k.removeprefix(prefix): v for k, v in section.items() if str(k).startswith(prefix)}
            out[sec] = {**flat, sub: {**nested, **(flat.get(sub) or {})}}
    return out


def load_config(recipe: str, config_file: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    """The Config of `recipe`, then `config_file` (a YAML file, which may name a base), then the overrides."""
    d = recipe_dict(recipe)
    for layer in recipe_layers(config_file, as_file=True) if config_file else []:
        d = merge_layer(d, layer)
    return build_config(merge_layer(d, with_paths_resolved(parse_overrides(overrides), os.getcwd())))


def dump_yaml(cfg: Config) -> str:
    # tuples are not plain YAML; lists read back into the same tuple fields.
    return yaml.safe_dump(_lists(cfg.to_dict()), sort_keys=False)


def _lists(x):
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_lists(v) for v in x]
    return x


# --- `nnlab keys` --------------------------------------------------------------------------------

def key_groups(model: str | None = None) -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """Every config key as (group title, [(key, type, default as YAML, doc)]), read from the
    dataclasses; the model keys of every registered model, or of `model` only."""
    from nnlab.models import get_spec, names

    def rows(prefix: str, cls: type, skip: tuple = ()) -> list[tuple[str, str, str, str]]:
        hints, out = typing.get_type_hints(cls), []
        for f in dataclasses.fields(cls):
            sub = f.name not in skip and _subsection(cls, f.name)
            if sub:
                out += rows(f"{prefix}{f.name}.", sub)
            elif f.name not in skip:
                out.append((f"{prefix}{f.name}", type_name(hints[f.name]), _yaml_scalar(_default(f)), _doc(f)))
        return out

    top = [("base", "str | None", "null", TOP_KEYS["base"]), *rows("", Config, skip=("model", "data", "train"))]
    groups = [("top level", top),
              ("data", rows("data.", DataConfig)), ("train", rows("train.", TrainConfig))]
    for name in [get_spec(model).name] if model else names():
        spec = get_spec(name)
        presets = "; ".join(f"{p} = {_yaml_scalar(v)}" for p, v in spec.presets.items())
        model_rows = rows("model.", spec.config_cls)
        model_rows.insert(1, ("model.preset", "str | None", "null", f"a named size; model keys given override it: "
                                                                    f"{presets}"))
        groups.append((f"model {name} ({spec.task} data)", model_rows))
    return groups


def _doc(f: dataclasses.Field) -> str:
    doc, choices = f.metadata.get("doc", ""), f.metadata.get("choices", ())
    if choices and not all(c in doc for c in choices):
        doc += f" (one of: {', '.join(choices)})"
    return doc


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _yaml_scalar(value) -> str:
    text = yaml.safe_dump(_lists(value), default_flow_style=True, sort_keys=False, width=10**6)
    return text.removesuffix("\n...\n").strip()

"""Typed config: recipes parse, overrides apply, mistakes are one-line errors naming the key."""

import pytest

from nnlab.config import build_config, load_config, parse_overrides, recipe_dict, recipe_names
from nnlab.errors import ConfigError
from nnlab.models import get_spec


def test_every_shipped_recipe_parses_and_builds_its_model():
    names = recipe_names()
    assert {"seed-cnn", "seed-cnn-fast", "cnn", "vit", "mlp-regression", "gpt-shakespeare"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.recipe == name and recipe_dict(name)["description"]
        spec = get_spec(cfg.model["name"])
        fields = {k: v for k, v in cfg.model.items() if k != "name"}
        assert spec.build(spec.config_cls(**fields)) is not None


def test_article_recipe_is_the_article_setup():
    t = load_config("seed-cnn").train
    assert (t.optimizer, t.lr, t.momentum, t.batch_size, t.epochs, t.precision) == ("sgd", 0.01, 0.0, 64, 10, "fp32")


def test_overrides_apply_with_yaml_types():
    cfg = load_config("seed-cnn", overrides=["train.lr=0.5", "train.max_steps=3", "data.limit=100",
                                             "train.compile=true"])
    assert cfg.train.lr == 0.5 and cfg.train.max_steps == 3 and cfg.data.limit == 100 and cfg.train.compile is True
    assert isinstance(load_config("seed-cnn", overrides=["train.lr=1"]).train.lr, float)  # int accepted as float


def test_config_file_merges_under_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: {lr: 0.2, epochs: 2}\n")
    cfg = load_config("seed-cnn", str(f), ["train.lr=0.3"])
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.3


@pytest.mark.parametrize("override, words", [
    ("train.lrr=0.1", ["train.lrr", "did you mean train.lr?"]),
    ("lr=0.1", ["did you mean train.lr?"]),
    ("train.epochs=abc", ["train.epochs", "expected int"]),
    ("train.epochs=1.5", ["train.epochs", "expected int"]),
    ("train.compile=maybe", ["train.compile", "expected bool"]),
    ("train.optimizer=adam", ["train.optimizer", "sgd, adamw"]),
    ("train.batch_size=0", ["train.batch_size", "positive"]),
    ("train.lr=-1", ["train.lr", "negative"]),
    ("model.n_embd=64", ["model.n_embd"]),
    ("data.nmae=x", ["did you mean data.name?"]),
    ("bogus=1", ["bogus"]),
    ("model.name=resnet", ["model.name", "resnet"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("seed-cnn", overrides=[override])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_model_fields_checked_against_the_models_dataclass():
    cfg = load_config("gpt-shakespeare", overrides=["model.n_layer=2"])
    assert cfg.model["n_layer"] == 2
    with pytest.raises(ConfigError, match="did you mean model.n_head"):
        load_config("gpt-shakespeare", overrides=["model.n_heads=2"])
    with pytest.raises(ConfigError, match="model"):
        load_config("gpt-shakespeare", overrides=["model.n_embd=30", "model.n_head=4"])  # not divisible


def test_unknown_recipe_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean seed-cnn"):
        load_config("seed-cn")


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="grad_accum"):
        load_config("seed-cnn", overrides=["train.batch_size=10", "train.grad_accum=3"])
    with pytest.raises(ConfigError, match="data.path"):
        build_config({"model": {"name": "gpt"}, "data": {"name": "text"}})
    with pytest.raises(ConfigError, match="--set"):
        parse_overrides(["train.lr"])

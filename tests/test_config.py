"""Typed config: recipes parse (with their bases and data root), presets and overrides apply,
mistakes are one-line errors naming the key, and `nnlab keys` lists every key."""

import dataclasses
import os
import re
from pathlib import Path

import pytest
import yaml

from nnlab import cli
from nnlab.config import (DataConfig, PoisonConfig, PrivacyConfig, TrainConfig, build_config, dump_yaml, load_config, parse_overrides, recipe_dict,
                          recipe_names)
from nnlab.errors import ConfigError
from nnlab.models import build_model, get_spec, names
from nnlab.recipes import data_root

SHAKESPEARE = "<data root>/tinyshakespeare.txt"
GPT_SHAKESPEARE = {"model.name": "gpt", "data.name": "text", "data.path": SHAKESPEARE, "train.batch_size": 12,
                   "train.beta2": 0.99, "train.eval_every": 250, "train.grad_clip": 1.0, "train.lr": 0.001,
                   "train.max_steps": 2000, "train.min_lr": 0.0001, "train.optimizer": "adamw",
                   "train.schedule": "cosine", "train.warmup_steps": 100, "train.weight_decay": 0.1}
CNN = {"model.name": "cnn", "train.batch_size": 256, "train.channels_last": True, "train.label_smoothing": 0.1,
       "train.optimizer": "adamw", "train.schedule": "linear", "train.warmup_frac": 0.2, "train.weight_decay": 0.05}
# Every shipped recipe's resolved config, as the keys whose values differ from the dataclasses'
# defaults: the values every recipe resolved to before recipes could name a base.
RESOLVED = {
    "cnn": {**CNN, "train.epochs": 8, "train.lr": 0.004},
    "cnn-robust": {**{k: v for k, v in CNN.items() if k != "train.label_smoothing"}, "model.width": 16,
                   "train.epochs": 2, "train.lr": 0.004, "train.adversarial": "pgd"},
    "dp-cnn": {"model.name": "tanh-cnn", "train.epochs": 40, "train.batch_size": 2048, "train.lr": 4.0,
               "train.momentum": 0.9, "train.log_every": 10, "train.eval_every": 145, "train.precision": "fp32",
               "train.privacy.epsilon": 3.0, "train.privacy.max_grad_norm": 0.1},
    "fmnist-speedrun": {**CNN, "model.dropout": 0.0, "model.width": 16, "train.epochs": 3,
                        "train.eval_every": 1000000, "train.log_every": 100, "train.lr": 0.006},
    "gpt-shakespeare": {**GPT_SHAKESPEARE, "train.precision": "fp32"},
    "gpt-shakespeare-fast": {**GPT_SHAKESPEARE, "train.compile": True},
    "gpt-shakespeare-speedrun": {**GPT_SHAKESPEARE, "train.compile": True, "train.batch_size": 32,
                                 "train.eval_every": 25, "train.eval_iters": 75, "train.lr": 0.005,
                                 "train.max_steps": 650, "train.min_lr": 0.0005, "train.warmup_steps": 30},
    "mlp-regression": {"model.name": "mlp", "model.hidden": (32,), "data.name": "diabetes",
                       "train.batch_size": 354, "train.epochs": 300, "train.eval_every": 50, "train.loss": "mse",
                       "train.lr": 0.05, "train.precision": "fp32"},
    "mlp-tabular": {"model.name": "mlp", "model.hidden": (64,), "data.name": "wine", "train.batch_size": 32,
                    "train.epochs": 60, "train.eval_every": 40, "train.log_every": 20, "train.lr": 0.003,
                    "train.optimizer": "adamw", "train.precision": "fp32", "train.weight_decay": 0.01},
    "seed-cnn": {"model.name": "seed-cnn", "train.epochs": 10, "train.precision": "fp32"},
    "seed-cnn-fast": {"model.name": "seed-cnn", "train.batch_size": 256, "train.channels_last": True,
                      "train.epochs": 4, "train.lr": 0.003, "train.optimizer": "adamw", "train.schedule": "linear",
                      "train.warmup_frac": 0.25, "train.weight_decay": 0.01},
    "vit": {"model.name": "vit", "model.n_layer": 4, "train.batch_size": 256, "train.epochs": 10,
            "train.grad_clip": 1.0, "train.lr": 0.002, "train.optimizer": "adamw", "train.schedule": "cosine",
            "train.warmup_frac": 0.1, "train.weight_decay": 0.05},
}


def non_defaults(cfg) -> dict:
    """The config's keys whose values differ from their dataclass defaults (model.name always)."""
    out = {"model.name": cfg.model.name}
    defaults = {"model": type(cfg.model)(), "data": DataConfig(), "train": TrainConfig()}

    def differing(prefix: str, obj, default) -> None:
        for f in dataclasses.fields(default):
            value, default_value = getattr(obj, f.name), getattr(default, f.name)
            if dataclasses.is_dataclass(default_value):  # a section of its own, e.g. train.privacy
                differing(f"{prefix}{f.name}.", value, default_value)
            elif value != default_value:
                out[f"{prefix}{f.name}"] = value

    for sec, default in defaults.items():
        differing(f"{sec}.", getattr(cfg, sec), default)
    if "data.path" in out:
        out["data.path"] = out["data.path"].replace(str(data_root()), "<data root>")
    return out


def test_every_shipped_recipe_resolves_as_before_and_builds_its_model():
    assert set(recipe_names()) == set(RESOLVED)
    for name in recipe_names():
        cfg = load_config(name)
        assert cfg.recipe == name and recipe_dict(name)["description"]
        assert non_defaults(cfg) == RESOLVED[name], name
        assert build_model(cfg.model) is not None


def test_recipes_inherit_from_their_base():
    for name, base in (("gpt-shakespeare-fast", "gpt-shakespeare"), ("gpt-shakespeare-speedrun", "gpt-shakespeare-fast"),
                       ("seed-cnn-fast", "seed-cnn"), ("fmnist-speedrun", "cnn")):
        text = (Path(__file__).parents[1] / "src/nnlab/recipes" / f"{name}.yaml").read_text()
        assert yaml.safe_load(text)["base"] == base


def test_a_recipe_file_names_a_base_and_a_loop_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("base: gpt-shakespeare\ntrain: {lr: 0.002}\n")
    cfg = load_config("mine.yaml")
    assert cfg.recipe == "mine" and cfg.train.lr == 0.002 and cfg.train.max_steps == 2000
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops") as e:
        load_config(str(tmp_path / "a.yaml"))
    assert "\n" not in str(e.value) and "a.yaml -> " in str(e.value)


def test_shipped_data_paths_resolve_against_the_data_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the current directory plays no part
    monkeypatch.delenv("NNLAB_DATA_ROOT", raising=False)
    default_root = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # <repo>/../shared/data
    assert load_config("gpt-shakespeare").data.path == str(default_root / "tinyshakespeare.txt")
    monkeypatch.setenv("NNLAB_DATA_ROOT", str(tmp_path / "corpora"))
    assert load_config("gpt-shakespeare-speedrun").data.path == str(tmp_path / "corpora" / "tinyshakespeare.txt")


def test_user_data_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("gpt-shakespeare", overrides=["data.path=my.txt"]).data.path == str(tmp_path / "my.txt")
    (tmp_path / "c.yaml").write_text("data: {dir: ../images}\n")
    assert load_config("seed-cnn", "c.yaml").data.dir == str(tmp_path.parent / "images")
    (tmp_path / "r.yaml").write_text("model: {name: mlp}\ndata: {name: csv, path: t.csv, target: y}\n")
    cfg = load_config("r.yaml")
    assert cfg.data.path == str(tmp_path / "t.csv")
    assert f"path: {tmp_path / 't.csv'}" in dump_yaml(cfg)  # config.yaml records the absolute path


def test_presets_set_their_keys_where_they_appear():
    tiny = load_config("gpt-shakespeare", overrides=["model.preset=tiny"]).model  # over the recipe's baby
    assert (tiny.n_layer, tiny.n_head, tiny.n_embd, tiny.block_size) == (1, 2, 16, 16)
    two = load_config("gpt-shakespeare", overrides=["model.preset=tiny", "model.n_layer=2"]).model
    assert (two.n_layer, two.n_embd) == (2, 16)  # keys given beside the preset win
    cfg = build_config({"model": {"name": "vit", "preset": "tiny", "n_embd": 32}})
    assert (cfg.model.n_layer, cfg.model.patch_size, cfg.model.n_embd) == (1, 7, 32)
    with pytest.raises(ConfigError, match="choose one of tiny, baby"):
        load_config("gpt-shakespeare", overrides=["model.preset=huge"])
    # naming another model starts the model section afresh: cnn's width is not carried to vit
    assert load_config("cnn", overrides=["model.name=vit"]).model == get_spec("vit").config_cls()


def test_config_yaml_round_trips_the_typed_model():
    cfg = load_config("mlp-regression", overrides=["model.hidden=[16, 8]"])
    again = build_config(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg and type(again.model).__name__ == "MLPConfig" and again.model.hidden == (16, 8)
    assert yaml.safe_load(dump_yaml(cfg))["model"]["name"] == "mlp"


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
    ("model.preset=big", ["model.preset", "article, tiny"]),
    ("data.nmae=x", ["did you mean data.name?"]),
    ("bogus=1", ["bogus"]),
    ("base=cnn", ["base"]),
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
    assert cfg.model.n_layer == 2
    with pytest.raises(ConfigError, match="did you mean model.n_head"):
        load_config("gpt-shakespeare", overrides=["model.n_heads=2"])
    with pytest.raises(ConfigError, match="model"):
        load_config("gpt-shakespeare", overrides=["model.n_embd=30", "model.n_head=4"])  # not divisible
    with pytest.raises(ConfigError, match="model.activation: must be one of relu"):
        load_config("mlp-regression", overrides=["model.activation=swish"])


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


def keys_table(capsys, *args) -> dict[str, dict[str, tuple[str, str, str]]]:
    """`nnlab keys ARGS` as {group title: {key: (type, default, doc)}}."""
    assert cli.main(["keys", *args]) == 0
    groups: dict = {}
    title = ""
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  "):
            key, tp, default, doc = re.split(r"\s{2,}", line.strip(), maxsplit=3)
            groups[title][key] = (tp, default, doc)
        elif line:
            title = line.split(" (")[0]  # e.g. "train", "model gpt (text data)"
            groups[title] = {}
    return groups


def test_keys_lists_every_field_with_its_type_default_and_doc(capsys):
    groups = keys_table(capsys)
    sections = [("data", "data", DataConfig), ("train", "train", TrainConfig), ("data", "data.poison", PoisonConfig),
                ("train", "train.privacy", PrivacyConfig)]
    sections += [(f"model {n}", "model", get_spec(n).config_cls) for n in names()]
    for title, prefix, cls in sections:
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory):  # a section within: its own keys are listed
                assert not any(k == f"{prefix}.{f.name}" for k in groups[title])
                continue
            tp, default, doc = groups[title][f"{prefix}.{f.name}"]
            expected = list(f.default) if isinstance(f.default, tuple) else f.default
            assert yaml.safe_load(default) == expected, f"{title}: {f.name}"  # printed as a recipe writes it
            assert doc and tp
        assert prefix != "model" or "model.preset" in groups[title]
    assert set(groups["top level"]) == {"base", "recipe", "description"}
    gpt_only = keys_table(capsys, "--model", "gpt")
    assert [t for t in gpt_only if t.startswith("model")] == ["model gpt"]
    assert "tiny = {n_layer: 1" in gpt_only["model gpt"]["model.preset"][2]


def test_an_unknown_key_names_the_closest_one_listed_by_keys(capsys):
    with pytest.raises(ConfigError) as e:
        load_config("gpt-shakespeare", overrides=["train.warmup_step=10"])
    assert str(e.value) == "train.warmup_step: unknown config key; did you mean train.warmup_steps?"
    assert "train.warmup_steps" in keys_table(capsys)["train"]
    assert cli.main(["train", "seed-cnn", "--set", "xyzzy=1"]) == 2
    assert capsys.readouterr().err.strip() == "nnlab: error: xyzzy: unknown config key; `nnlab keys` lists them"


def test_data_root_is_documented_where_users_read_keys(capsys):
    doc = keys_table(capsys)["data"]["data.path"][2]
    assert "NNLAB_DATA_ROOT" in doc and "<repo>/../shared/data" in doc
    assert os.path.isabs(load_config("gpt-shakespeare").data.path)


def test_sections_within_sections_take_nested_and_dotted_keys(tmp_path):
    cfg = load_config("seed-cnn-fast", overrides=["data.poison.rate=0.01", "data.poison.target=3",
                                                  "train.privacy.max_grad_norm=0.5"])
    assert (cfg.data.poison.rate, cfg.data.poison.target, cfg.train.privacy.max_grad_norm) == (0.01, 3, 0.5)
    assert load_config("seed-cnn-fast", overrides={"data": {"poison": {"trigger": "checker"}}}) \
        .data.poison.trigger == "checker"
    with pytest.raises(ConfigError, match=r"data.poison.rat: unknown config key; did you mean data.poison.rate"):
        load_config("seed-cnn-fast", overrides=["data.poison.rat=0.1"])
    with pytest.raises(ConfigError, match=r"train.privacy.noise: expected bool"):
        load_config("seed-cnn-fast", overrides=["train.privacy.noise=maybe"])
    with pytest.raises(ConfigError, match=r"data.poison: expected a mapping"):
        load_config("seed-cnn-fast", overrides=["data.poison=0.1"])


def test_a_run_folder_written_with_flat_keys_still_reads(tmp_path):
    """config.yaml files from before data.poison and train.privacy were sections keep loading."""
    from nnlab import runfolder

    d = yaml.safe_load(dump_yaml(load_config("seed-cnn-fast")))
    d["data"] = {**{k: v for k, v in d["data"].items() if k != "poison"}, "poison_rate": 0.02, "poison_target": 1}
    d["train"] = {**{k: v for k, v in d["train"].items() if k != "privacy"}, "privacy_epsilon": 8.0}
    (tmp_path / runfolder.CONFIG).write_text(yaml.safe_dump(d))
    cfg = runfolder.read_config(tmp_path)
    assert (cfg.data.poison.rate, cfg.data.poison.target, cfg.train.privacy.epsilon) == (0.02, 1, 8.0)

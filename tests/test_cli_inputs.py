"""The CLI on the inputs a user brings: CSV files, YAML configs and recipes, and the options of
`generate`, `eval` and `recipes`. A bad input is exit code 2 and one stderr line naming the file
or key at fault; a good one works end to end.

Two tiny runs (a GPT on 5 KB of text, an MLP on a 200-row CSV) are trained once for the module.
Most calls run `nnlab.cli.main` in this process; a few go through a real `python -m nnlab`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from nnlab import cli
from nnlab.config import recipe_dict
from conftest import cli_cmd, cli_env, ok, one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")

GPT_SETS = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.max_steps=10",
            "train.eval_iters=2", "train.warmup_steps=0", "train.lr=0.01", "train.log_every=5"]


def sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def csv_sets(path: Path, target: str = "y") -> list[str]:
    return sets("data.name=csv", f"data.path={path}", f"data.target={target}")


def main_in_process(*args) -> int:
    """cli.main on one thread (as the subprocesses run), for module-scoped fixtures."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli.main([str(a) for a in args])
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory, text_file, run_cli) -> Path:
    run = tmp_path_factory.mktemp("gpt") / "run"
    ok(run_cli("train", "gpt-shakespeare", "--out", run, *sets(f"data.path={text_file}", *GPT_SETS)))
    return run


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, csv_file) -> Path:
    """A --config file for mlp-regression: the CSV fixture, a few steps, an lr the recipe does not have."""
    p = tmp_path_factory.mktemp("config") / "tiny-csv.yaml"
    p.write_text(yaml.safe_dump({"data": {"name": "csv", "path": str(csv_file), "target": "y"},
                                 "train": {"max_steps": 5, "batch_size": 32, "lr": 0.037, "log_every": 2}}))
    return p


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory, config_file) -> Path:
    run = tmp_path_factory.mktemp("csv") / "run"
    assert main_in_process("train", "mlp-regression", "--config", config_file, "--set", "train.log_every=1",
                           "--out", run) == 0
    return run


# ------------------------------------------------------------------------------------------------
# good input: --config, a YAML file as the recipe, generate --top-k, eval, recipes


def test_train_config_file_lands_in_the_run_config(csv_run, config_file, csv_file):
    cfg = yaml.safe_load((csv_run / "config.yaml").read_text())
    assert cfg["recipe"] == "mlp-regression"
    assert cfg["data"] == {**cfg["data"], "name": "csv", "path": str(csv_file), "target": "y"}
    assert cfg["train"]["lr"] == 0.037 != recipe_dict("mlp-regression")["train"]["lr"]  # the file's value
    assert cfg["model"]["hidden"] == [32]  # the recipe's, which the file does not mention
    assert cfg["train"]["log_every"] == 1  # --set applies after --config
    summary = json.loads((csv_run / "summary.json").read_text())
    assert summary["steps"] == 5


@pytest.mark.parametrize("file_name", ["tiny-regression.yaml", "tiny-regression.yml"])
def test_a_yaml_file_is_a_recipe(file_name, csv_file, tmp_path, cli_main):
    # A bare file name in the working folder: the suffix alone says it is a file, not a shipped recipe.
    recipe = {"description": "a recipe from a file", "model": {"name": "mlp", "hidden": [4]},
              "data": {"name": "csv", "path": str(csv_file), "target": "y"},
              "train": {"max_steps": 3, "batch_size": 32, "log_every": 1}}
    (tmp_path / file_name).write_text(yaml.safe_dump(recipe))
    rc, out, err = cli_main("train", file_name, "--out", tmp_path / "run")
    assert rc == 0, err
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["recipe"] == "tiny-regression" and cfg["description"] == "a recipe from a file"
    assert cfg["model"] == {"name": "mlp", "hidden": [4], **cfg["model"]}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["recipe"] == "tiny-regression" and summary["steps"] == 3


def test_generate_top_k_1_is_greedy(gpt_run, cli_main):
    common = ("generate", gpt_run, "--prompt", "First", "--max-new-tokens", 30)
    rc, greedy, err = cli_main(*common, "--temperature", 0)
    assert rc == 0, err
    assert greedy.startswith("First") and len(greedy) == len("First") + 30 + 1
    for seed in (1, 2):  # top-1 sampling at a high temperature still picks the argmax every time
        assert cli_main(*common, "--temperature", 2, "--top-k", 1, "--seed", seed) == (0, greedy, "")
    # Without --top-k the same sampling wanders off the argmax: it is top-k that makes it greedy.
    rc, sampled, _ = cli_main(*common, "--temperature", 2, "--seed", 1)
    assert rc == 0 and sampled != greedy


@pytest.mark.parametrize("top_k", ["0", "-3"])
def test_generate_rejects_a_top_k_below_1(gpt_run, cli_main, top_k):
    rc, out, err = cli_main("generate", gpt_run, "--prompt", "First", "--top-k", top_k)
    one_line_error(rc, err, "--top-k", f"got {top_k}")
    assert out == ""


def test_generate_context_shift_samples_from_the_cache_and_checks_its_range(gpt_run, cli_main):
    block = json.loads((Path(gpt_run) / "model.json").read_text())["model"]["block_size"]
    common = ("generate", gpt_run, "--prompt", "First", "--max-new-tokens", 3 * block, "--temperature", 0)
    rc, exact, err = cli_main(*common)
    assert rc == 0, err
    rc, shifted, err = cli_main(*common, "--context-shift", block // 2)
    assert rc == 0, err
    assert len(shifted) == len(exact) and shifted[: block] == exact[: block]  # the same until the context fills
    for bad in (block, -1):
        rc, out, err = cli_main(*common, "--context-shift", bad)
        one_line_error(rc, err, "context_shift", f"got {bad}")
        assert out == ""


def test_eval_on_a_text_run_prints_val_loss(gpt_run, cli_main):
    rc, out, err = cli_main("eval", gpt_run)
    assert rc == 0, err
    got = json.loads(out)
    summary = json.loads((gpt_run / "summary.json").read_text())
    assert got.keys() == {"val_loss"}
    assert got["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)


def test_eval_on_a_csv_run_prints_test_mse(csv_run, cli_main):
    rc, out, err = cli_main("eval", csv_run)
    assert rc == 0, err
    got = json.loads(out)
    summary = json.loads((csv_run / "summary.json").read_text())
    assert got.keys() == {"test_mse"}
    assert got["test_mse"] == pytest.approx(summary["test_mse"], rel=1e-6)


def test_recipes_descriptions_start_in_one_column(cli_main):
    rc, out, _ = cli_main("recipes")
    assert rc == 0
    lines = out.splitlines()
    names = [line.split()[0] for line in lines]
    assert max(map(len, names)) > 16  # longer than the column the list used to assume
    columns = set()
    for name, line in zip(names, lines):
        description = recipe_dict(name)["description"]
        assert line.endswith(description), line
        col = len(line) - len(description)
        assert line[:col].rstrip() == name, line
        columns.add(col)
    assert len(columns) == 1 and columns.pop() > max(map(len, names))


# ------------------------------------------------------------------------------------------------
# bad CSV files: one line naming the file (and row, column or value), and no run folder left behind


CSV_CASES = {
    "duplicate_header": ("a,a,y\n1,2,3\n4,5,6\n7,8,9\n", "y", ["column 'a' appears twice"]),
    "blank_header_name": (",a,y\n0,1,2\n1,4,5\n2,7,8\n", "y", ["column 1 has no name"]),
    "only_the_target": ("y\n1\n2\n3\n", "y", ["only the target column 'y'"]),
    "header_only": ("a,b,y\n", "y", ["no data rows"]),
    "no_rows_but_blank_lines": ("a,b,y\n\n\n", "y", ["no data rows"]),
    "ragged_row": ("a,b,y\n1,2,3\n4,5\n7,8,9\n", "y", ["row 3 has 2 fields, the header has 3"]),
    "nan": ("a,b,y\n1,2,3\n4,nan,6\n7,8,9\n", "y", ["row 3, column 'b'", "'nan' is not a finite number"]),
    "inf": ("a,b,y\n1,2,3\n4,5,6\n7,8,-inf\n", "y", ["row 4, column 'y'", "'-inf' is not a finite number"]),
    "overflow_to_inf": ("a,b,y\n1e999,2,3\n4,5,6\n7,8,9\n", "y", ["row 2, column 'a'", "'1e999'"]),
    "no_such_target": ("a,b,y\n1,2,3\n4,5,6\n7,8,9\n", "price", ["no target column 'price'", "columns: a, b, y"]),
}


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_bad_csv_is_one_line_naming_the_file(case, tmp_path, cli_main):
    text, target, needles = CSV_CASES[case]
    p = tmp_path / f"{case}.csv"
    p.write_text(text)
    out = tmp_path / "run"
    rc, _, err = cli_main("train", "mlp-regression", *csv_sets(p, target), "--out", out)
    one_line_error(rc, err, str(p), *needles)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# bad YAML, as --config and as the recipe


YAML_CASES = {
    "unclosed_mapping": ("train: {lr: 0.1\n", ["not valid YAML at line 2", "expected ',' or '}'"]),
    "tab_indent": ("train:\n\tlr: 0.1\n", ["not valid YAML at line 2, column 1", "'\\t'"]),
    "a_list": ("- train\n- model\n", ["expected a mapping of sections, got list"]),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
@pytest.mark.parametrize("given_as", ["config", "recipe"])
def test_malformed_yaml_is_one_line_naming_the_file(case, given_as, tmp_path, cli_main):
    text, needles = YAML_CASES[case]
    p = tmp_path / f"{case}.yaml"
    p.write_text(text)
    where = ["mlp-regression", "--config", p] if given_as == "config" else [p]
    rc, _, err = cli_main("train", *where, "--out", tmp_path / "run")
    one_line_error(rc, err, f"config: {p}: ", *needles)


def test_a_number_as_a_section_name_is_an_unknown_key(tmp_path, cli_main):
    p = tmp_path / "numbers.yaml"
    p.write_text("model: {name: mlp}\n1: 2\n")
    rc, _, err = cli_main("train", p, "--out", tmp_path / "run")
    one_line_error(rc, err, "1: unknown config key")


def test_malformed_config_through_a_real_process(tmp_path, run_cli):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: [0.1\n")
    r = run_cli("train", "mlp-regression", "--config", p, "--out", tmp_path / "run", cwd=tmp_path)
    one_line_error(r.returncode, r.stderr, str(p), "not valid YAML at line 3", "expected ',' or ']'")


def test_a_missing_data_root_names_the_variable(tmp_path):
    """A shipped recipe whose data file is not under the data root: one line that names the file
    and $NNLAB_DATA_ROOT, the way to point nnlab at the data."""
    env = {**cli_env(), "NNLAB_DATA_ROOT": str(tmp_path / "nowhere")}
    r = subprocess.run(cli_cmd("train", "gpt-shakespeare", "--out", tmp_path / "run"), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env=env)
    one_line_error(r.returncode, r.stderr, os.path.join(tmp_path, "nowhere", "tinyshakespeare.txt"),
                   "NNLAB_DATA_ROOT")
    assert not (tmp_path / "run").exists()

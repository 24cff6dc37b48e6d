"""End to end: the `nnlab` command (a real subprocess where the process boundary matters, and
`nnlab.cli.main` in-process where only the code path does), and the Python API behind it.

Every run is tiny (a few hundred 28x28 images, 5 KB of text, tens of steps) so the file runs in
well under a minute on two shared CPU cores.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import nnlab
from conftest import CLI_TIMEOUT, cli_cmd, cli_env, ok, one_line_error, sample_text
from nnlab.data import read_idx, write_idx

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = {"seed-cnn", "seed-cnn-fast", "cnn", "vit", "fmnist-speedrun", "mlp-regression", "mlp-tabular", "gpt-shakespeare",
           "gpt-shakespeare-fast", "gpt-shakespeare-speedrun", "dp-cnn", "cnn-robust"}
SEED_CNN_PARAMS = 421_642
CNN_STEPS = 25  # 320 images / batch 32 = 10 steps per epoch: the run crosses two epoch boundaries


def cnn_sets(data_dir: Path) -> list[str]:
    """The tiny seed-cnn run: SGD with momentum, fp32, a checkpoint every 5 steps."""
    sets = [f"data.dir={data_dir}", f"train.max_steps={CNN_STEPS}", "train.batch_size=32", "train.lr=0.02",
            "train.momentum=0.9", "train.log_every=1", "train.checkpoint_every=5", "train.precision=fp32"]
    return [a for s in sets for a in ("--set", s)]


def gpt_sets(text: Path) -> list[str]:
    sets = [f"data.path={text}", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
            "train.max_steps=60", "train.eval_iters=2", "train.log_every=1", "train.warmup_steps=0",
            "train.lr=0.01"]
    return [a for s in sets for a in ("--set", s)]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records if r["event"] == "train"]


# ------------------------------------------------------------------------------------------------
# runs shared by several tests (one subprocess each)


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory, fmnist_dir, run_cli) -> Path:
    run = tmp_path_factory.mktemp("cnn") / "run"
    ok(run_cli("train", "seed-cnn", "--out", run, *cnn_sets(fmnist_dir)))
    return run


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory, text_file, run_cli) -> Path:
    run = tmp_path_factory.mktemp("gpt") / "run"
    ok(run_cli("train", "gpt-shakespeare", "--out", run, *gpt_sets(text_file)))
    return run


# ------------------------------------------------------------------------------------------------
# recipes


def test_recipes_lists_every_shipped_recipe(run_cli):
    r = ok(run_cli("recipes"))
    names = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    shipped = {p.stem for p in (Path(nnlab.__file__).parent / "recipes").glob("*.yaml")}
    assert names == RECIPES == shipped
    for line in r.stdout.splitlines():  # each with its description
        assert len(line.split(None, 1)) == 2, line


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_torchrun_worker_exits_without_finalization_and_keeps_its_output(tmp_path, world_size):
    """cli.run skips Python's teardown in a torchrun worker (WORLD_SIZE > 1; cli.run says why): an
    atexit hook never runs there, while the piped, block-buffered output still arrives whole."""
    code = ("import atexit, sys; atexit.register(lambda: print('finalized')); "
            "sys.argv = ['nnlab', 'recipes']; from nnlab.cli import run; run()")
    env = {**cli_env(), "WORLD_SIZE": world_size}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=CLI_TIMEOUT, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    assert set(names) - {"finalized"} == RECIPES
    assert ("finalized" in names) == (world_size == "1")


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path):
    """`nnlab recipes | head -1`: the pipe closes before nnlab writes; it exits 1 without a traceback."""
    p = subprocess.Popen(cli_cmd("recipes"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
                         cwd=tmp_path)
    p.stdout.close()  # before the child has imported anything, so its writes meet a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=CLI_TIMEOUT) == 1 and "Traceback" not in err and "BrokenPipe" not in err, err


# ------------------------------------------------------------------------------------------------
# seed-cnn on the image fixture


def test_seed_cnn_run_folder_is_complete(cnn_run, fmnist_dir):
    for f in ("config.yaml", "metrics.jsonl", "model.safetensors", "model.json", "checkpoints/last.safetensors",
              "summary.json"):
        assert (cnn_run / f).is_file() and (cnn_run / f).stat().st_size > 0, f
    events = list((cnn_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)

    summary = json.loads((cnn_run / "summary.json").read_text())
    assert summary["recipe"] == "seed-cnn"
    assert summary["steps"] == CNN_STEPS
    assert summary["params"] == SEED_CNN_PARAMS
    assert summary["train_seconds"] > 0
    # The steady rate leaves out the first step, and the two add up to the training time.
    assert summary["samples_per_s"] > 0 and summary["first_step_seconds"] > 0
    steady = (CNN_STEPS - 1) * 32 / summary["samples_per_s"]
    assert steady + summary["first_step_seconds"] == pytest.approx(summary["train_seconds"], abs=0.011)
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["precision"] == "fp32"

    cfg = yaml.safe_load((cnn_run / "config.yaml").read_text())
    assert cfg["recipe"] == "seed-cnn"
    assert cfg["data"]["dir"] == str(fmnist_dir)  # the overrides are in the saved config
    assert cfg["train"]["max_steps"] == CNN_STEPS and cfg["train"]["momentum"] == 0.9

    info = json.loads((cnn_run / "model.json").read_text())
    assert info["model"]["name"] == "seed-cnn" and info["task"] == "image"
    assert len(info["classes"]) == 10 and info["input_shape"] == [1, 28, 28]

    recs = metrics(cnn_run)
    assert [s for s, _ in train_losses(recs)] == list(range(1, CNN_STEPS + 1))  # log_every=1
    evals = [r for r in recs if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, CNN_STEPS]  # ends of epochs, end of the run
    assert evals[-1]["test_accuracy"] == summary["test_accuracy"]
    # time in training steps at each evaluation (what time-to-target reads): grows, ends at the total
    secs = [r["train_seconds"] for r in evals]
    assert 0 < secs[0] < secs[1] < secs[2] == pytest.approx(summary["train_seconds"], abs=0.01)


def test_seed_cnn_loss_falls(cnn_run):
    losses = [loss for _, loss in train_losses(metrics(cnn_run))]
    assert losses[0] > 1.5  # ~ln 10 at the start: the model really was untrained
    assert losses[-1] < 0.5 * losses[0]


def test_eval_prints_the_summary_metrics(cnn_run, run_cli):
    summary = json.loads((cnn_run / "summary.json").read_text())
    got = json.loads(ok(run_cli("eval", cnn_run)).stdout)
    assert got["test_accuracy"] == summary["test_accuracy"]
    assert got["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-5, abs=1e-7)


def test_load_gives_an_eval_mode_model_with_that_accuracy(cnn_run, fmnist_dir):
    summary = json.loads((cnn_run / "summary.json").read_text())
    model, info = nnlab.load(cnn_run)
    assert not model.training and not any(m.training for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == SEED_CNN_PARAMS
    x = torch.from_numpy(read_idx(fmnist_dir / "t10k-images-idx3-ubyte.gz")).unsqueeze(1)
    y = torch.from_numpy(read_idx(fmnist_dir / "t10k-labels-idx1-ubyte.gz")).long()
    norm = info["normalize"]
    x = (x.float() / 255.0 - norm["mean"]) / norm["std"]
    with torch.no_grad():
        logits = model(x)
    acc = (logits.argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(summary["test_accuracy"], abs=1e-9)
    assert F.cross_entropy(logits, y).item() == pytest.approx(summary["test_loss"], rel=1e-4, abs=1e-6)
    assert nnlab.evaluate(cnn_run)["test_accuracy"] == summary["test_accuracy"]


# ------------------------------------------------------------------------------------------------
# GPT on a few KB of text


def test_logged_rate_counts_training_time_only(text_file, tmp_path):
    """With an evaluation between every two log lines, the logged tokens/s is still the window's
    tokens over its training seconds: evaluations neither dilute nor (by a clock reset) inflate it."""
    import nnlab

    over = {"data.path": str(text_file), "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32,
            "model.block_size": 32, "train.batch_size": 4, "train.max_steps": 12, "train.log_every": 4,
            "train.eval_every": 2, "train.eval_iters": 20}
    run = nnlab.train("gpt-shakespeare", over, out=str(tmp_path / "run"))
    recs = metrics(run)
    train = [r for r in recs if r["event"] == "train"]
    assert [r["step"] for r in train] == [4, 8, 12]
    assert len([r for r in recs if r["event"] == "eval"]) == 6
    prev = 0.0
    for r in train:
        window_tokens = 4 * 4 * 32  # log_every steps x batch x block
        assert r["tokens_per_s"] == pytest.approx(window_tokens / (r["train_seconds"] - prev), rel=1e-3)
        prev = r["train_seconds"]


def test_gpt_loss_falls(gpt_run):
    losses = [loss for _, loss in train_losses(metrics(gpt_run))]
    assert len(losses) == 60
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    summary = json.loads((gpt_run / "summary.json").read_text())
    assert summary["steps"] == 60 and np.isfinite(summary["val_loss"])
    # the validation loss beats a uniform guess over the vocabulary
    vocab = json.loads((gpt_run / "model.json").read_text())["model"]["vocab_size"]
    assert vocab == len(set(sample_text())) and summary["val_loss"] < np.log(vocab)


def test_generate_greedy_prints_prompt_plus_n_chars_deterministically(gpt_run, run_cli):
    prompt = "First Citizen"
    outs = [ok(run_cli("generate", gpt_run, "--prompt", prompt, "--max-new-tokens", 20, "--temperature", 0)).stdout
            for _ in range(2)]
    assert outs[0] == outs[1]
    text = outs[0]
    assert text.endswith("\n")
    text = text[:-1]
    assert text.startswith(prompt) and len(text) == len(prompt) + 20
    assert set(text) <= set(sample_text())


def test_generate_sampling_is_reproducible_by_seed(gpt_run, run_cli, cli_main):
    args = ("generate", gpt_run, "--prompt", "First", "--max-new-tokens", 20, "--temperature", 1)
    sub = ok(run_cli(*args, "--seed", 7)).stdout  # another process, same seed
    rc1, a, _ = cli_main(*args, "--seed", 7)
    rc2, b, _ = cli_main(*args, "--seed", 7)
    rc3, c, _ = cli_main(*args, "--seed", 8)
    assert rc1 == rc2 == rc3 == 0
    assert a == b == sub
    assert len(a) == len("First") + 20 + 1
    assert c != a  # the seed is really used (20 sampled characters colliding is vanishingly unlikely)


# ------------------------------------------------------------------------------------------------
# regression, vit and cnn through the Python API (no process start-up)


def test_mlp_regression_on_diabetes(tmp_path):
    from nnlab.data import load_tabular

    run = nnlab.train("mlp-regression", ["train.epochs=30", "train.log_every=10"], out=str(tmp_path / "mlp"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["recipe"] == "mlp-regression"
    y_test = load_tabular("diabetes", seed=0).y_test
    # better than always predicting the mean (the test variance, ~5,000-6,000)
    assert 0 < summary["test_mse"] < 0.9 * float(((y_test - y_test.mean()) ** 2).mean())
    assert nnlab.evaluate(run)["test_mse"] == pytest.approx(summary["test_mse"], rel=1e-5)


def test_mlp_regression_on_a_csv_file(tmp_path, csv_file):
    run = nnlab.train("mlp-regression", [f"data.path={csv_file}", "data.name=csv", "data.target=y",
                                         "train.epochs=40", "train.batch_size=32", "train.lr=0.05"],
                      out=str(tmp_path / "csv"))
    summary = json.loads((run / "summary.json").read_text())
    info = json.loads((run / "model.json").read_text())
    assert info["features"] == ["a", "b"] and info["target"] == "y"
    assert info["model"]["in_features"] == 2
    # y = 3a - 2b + noise has variance ~13; a fitted model gets far below it
    assert summary["test_mse"] < 1.0
    model, _ = nnlab.load(run)
    x = torch.tensor([[1.0, -1.0]])
    with torch.no_grad():
        pred = model((x - torch.tensor(info["x_mean"])) / torch.tensor(info["x_std"])).item()
    assert pred * info["y_std"] + info["y_mean"] == pytest.approx(5.0, abs=1.0)


@pytest.mark.parametrize("recipe, sets", [
    ("vit", ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.patch_size=7"]),
    ("cnn", ["model.width=4"]),
])
def test_vit_and_cnn_tiny_runs(tmp_path, fmnist_dir, recipe, sets):
    run = nnlab.train(recipe, [f"data.dir={fmnist_dir}", "train.epochs=1", "train.batch_size=64",
                               "train.log_every=1", *sets], out=str(tmp_path / recipe))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["recipe"] == recipe and summary["steps"] == 320 // 64
    assert (run / "checkpoints" / "last.safetensors").is_file()
    model, info = nnlab.load(run)
    assert info["model"]["name"] == recipe and not model.training
    # the saved weights (and, for cnn, BatchNorm running statistics) reproduce the final evaluation
    again = nnlab.evaluate(run)
    assert again["test_accuracy"] == summary["test_accuracy"]
    assert again["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-5)


# ------------------------------------------------------------------------------------------------
# bad input: exit code 2 and one line naming the key or file


def _damage(folder: Path, name: str, data: bytes) -> Path:
    p = folder / name
    p.write_bytes(data)
    return p


def case_unknown_key(tmp_path, fmnist_copy, csv_file):
    return ["train", "seed-cnn", "--set", "train.lrr=0.1"], ["train.lrr", "did you mean train.lr"]


def case_wrong_type(tmp_path, fmnist_copy, csv_file):
    return ["train", "seed-cnn", "--set", "train.epochs=abc"], ["train.epochs", "abc"]


def case_unknown_recipe(tmp_path, fmnist_copy, csv_file):
    return ["train", "no-such-recipe"], ["no-such-recipe"]


def case_missing_data_dir(tmp_path, fmnist_copy, csv_file):
    d = tmp_path / "nowhere"
    return ["train", "seed-cnn", "--set", f"data.dir={d}"], [str(d)]


def case_wrong_magic(tmp_path, fmnist_copy, csv_file):
    # a labels file where the images belong: magic 0x00000801, not 0x00000803
    p = fmnist_copy / "train-images-idx3-ubyte.gz"
    write_idx(p, np.zeros(320, np.uint8), gzip=True)
    return ["train", "seed-cnn", "--set", f"data.dir={fmnist_copy}"], [str(p), "magic"]


def case_truncated_idx(tmp_path, fmnist_copy, csv_file):
    p = fmnist_copy / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[: len(raw) - 1000]))
    return ["train", "seed-cnn", "--set", f"data.dir={fmnist_copy}"], [str(p), "truncated"]


def case_count_mismatch(tmp_path, fmnist_copy, csv_file):
    p = fmnist_copy / "train-labels-idx1-ubyte.gz"
    write_idx(p, np.zeros(319, np.uint8), gzip=True)
    return ["train", "seed-cnn", "--set", f"data.dir={fmnist_copy}"], [str(p), "320", "319"]


def case_empty_text(tmp_path, fmnist_copy, csv_file):
    p = tmp_path / "empty.txt"
    p.write_text("")
    return ["train", "gpt-shakespeare", "--set", f"data.path={p}"], [str(p), "empty"]


def case_non_numeric_csv(tmp_path, fmnist_copy, csv_file):
    p = tmp_path / "bad.csv"
    p.write_text("a,b,y\n1,2,3\n4,five,6\n7,8,9\n")
    return (["train", "mlp-regression", "--set", "data.name=csv", "--set", f"data.path={p}", "--set", "data.target=y"],
            [str(p), "row 3", "'b'", "five"])


def case_missing_csv_target(tmp_path, fmnist_copy, csv_file):
    return (["train", "mlp-regression", "--set", "data.name=csv", "--set", f"data.path={csv_file}",
             "--set", "data.target=price"], [str(csv_file), "price"])


def case_eval_not_a_run(tmp_path, fmnist_copy, csv_file):
    d = tmp_path / "not-a-run"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    return ["eval", d], [str(d), "not a run folder"]


def case_resume_without_checkpoint(tmp_path, fmnist_copy, csv_file):
    d = tmp_path / "half-run"
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump({"recipe": "seed-cnn", "model": {"name": "seed-cnn"},
                                                   "data": {"dir": str(fmnist_copy)}}))
    return ["train", "--resume", d], [str(d), "checkpoint"]


def case_out_under_a_file(tmp_path, fmnist_copy, csv_file):
    f = tmp_path / "notes.txt"
    f.write_text("not a folder")
    return ["train", "mlp-regression", "--out", f / "run"], [str(f / "run"), str(f), "not a folder"]


BAD = {f.__name__[5:]: f for f in (case_unknown_key, case_wrong_type, case_unknown_recipe, case_missing_data_dir,
                                    case_wrong_magic, case_truncated_idx, case_count_mismatch, case_empty_text,
                                    case_non_numeric_csv, case_missing_csv_target, case_eval_not_a_run,
                                    case_resume_without_checkpoint, case_out_under_a_file)}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, fmnist_copy, csv_file, cli_main):
    args, needles = BAD[case](tmp_path, fmnist_copy, csv_file)
    if args[0] == "train" and "--resume" not in args and "--out" not in args:
        args = [*args, "--out", tmp_path / "out"]
    rc, _, err = cli_main(*args)
    one_line_error(rc, err, *needles)


@pytest.mark.parametrize("case", ["unknown_key", "wrong_magic"])
def test_bad_input_through_a_real_process(case, tmp_path, fmnist_copy, csv_file, run_cli):
    args, needles = BAD[case](tmp_path, fmnist_copy, csv_file)
    r = run_cli(*args, "--out", tmp_path / "out", cwd=tmp_path)
    one_line_error(r.returncode, r.stderr, *needles)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_into_an_existing_run_is_refused_and_leaves_it_untouched(cnn_run, fmnist_dir, tmp_path, cli_main):
    run = tmp_path / "existing"
    shutil.copytree(cnn_run, run)
    before = snapshot(run)
    rc, _, err = cli_main("train", "seed-cnn", "--out", run, *cnn_sets(fmnist_dir))
    one_line_error(rc, err, str(run), "--resume")
    assert snapshot(run) == before


def test_generate_on_an_image_model_is_refused(cnn_run, cli_main):
    rc, out, err = cli_main("generate", cnn_run, "--prompt", "hello")
    one_line_error(rc, err, str(cnn_run), "language model")
    assert out == ""

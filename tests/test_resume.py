"""Exact resume: a run killed with SIGKILL and resumed with --resume logs the same loss at every step,
and ends with the same weights and test figures, as the same run left alone. For every shipped
recipe, and for what else a resume must carry: AdamW with a cosine schedule (vit, the GPTs), the
text task, gradient accumulation with dropout, bf16 where it is native.

The runs are tiny (a few steps of small models on the conftest data), fp32 on one thread, so equal
means bit for bit. A run is stopped from torch's global optimizer-step hook right after a fixed
step, so the stop lands mid-run, between two checkpoints, whatever the machine's load: for seed-cnn
(with and without momentum) and seed-cnn-fast by SIGKILL of a real process, for the rest by an
exception in this process (the same run folder left behind, without a torch import per case).
One test kills a process from outside, at whatever moment its first checkpoint appears, as a user
would.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import nnlab
from conftest import CLI_TIMEOUT, cli_cmd, cli_env
from nnlab import cli
from nnlab.config import recipe_names
from nnlab.runfolder import CHECKPOINT, METRICS, MODEL, SUMMARY, load_tensors
from nnlab.train.precision import native_bf16

pytestmark = pytest.mark.usefixtures("one_thread")

CKPT_EVERY, KILL_AT, STEPS = 3, 5, 8  # checkpoints at 3 and 6; stopped after step 5, resumed at 3

# Kills its own process right after optimizer step argv[1], then runs `nnlab argv[2:]`.
KILLER = """
import os, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
from nnlab import cli
steps = 0
def kill_after_step(optimizer, args, kwargs):
    global steps
    steps += 1
    if steps == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
register_optimizer_step_post_hook(kill_after_step)
sys.exit(cli.main(sys.argv[2:]))
"""

IMAGES = {"train.batch_size": 32}
TINY_GPT = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 16,
            "train.batch_size": 8, "train.eval_iters": 2, "train.warmup_steps": 2}
# The compile recipes run eager: compiling even a tiny GPT takes tens of seconds on 2 cores, three
# times per test; tests/test_scaling.py holds compiled and eager training equal.
EAGER = {"train.compile": False}

# name -> (recipe, data, overrides); each recipe keeps its optimizer, schedule and memory format.
CASES = {
    "seed-cnn": ("seed-cnn", "images", IMAGES),  # SGD without momentum: no optimizer state at all
    "sgd-momentum": ("seed-cnn", "images", {**IMAGES, "train.momentum": 0.9, "train.weight_decay": 0.01}),
    "seed-cnn-fast": ("seed-cnn-fast", "images", IMAGES),  # AdamW, one-cycle, channels_last
    "cnn": ("cnn", "images", {**IMAGES, "model.width": 4}),  # BatchNorm, dropout, channels_last
    # PGD's random starts are drawn from (seed, step, row): the resumed run draws the same
    "cnn-robust": ("cnn-robust", "images", {**IMAGES, "model.width": 4, "train.adversarial_steps": 2}),
    "vit": ("vit", "images", {**IMAGES, "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16}),  # cosine
    "fmnist-speedrun": ("fmnist-speedrun", "images", {**IMAGES, "model.width": 4}),
    "mlp-regression": ("mlp-regression", "csv", {"train.batch_size": 32}),
    # a training subset with flipped labels: both must come back the same in the resumed process
    "mlp-tabular": ("mlp-tabular", "wine", {"train.batch_size": 32, "data.train_fraction": 0.5,
                                            "data.label_noise": 0.2}),
    "gpt-shakespeare": ("gpt-shakespeare", "text", TINY_GPT),  # the text task, AdamW, cosine, clipping
    "gpt-shakespeare-fast": ("gpt-shakespeare-fast", "text", {**TINY_GPT, **EAGER}),
    "gpt-shakespeare-speedrun": ("gpt-shakespeare-speedrun", "text", {**TINY_GPT, **EAGER}),
    "grad-accum-dropout": ("gpt-shakespeare", "text", {**TINY_GPT, "train.grad_accum": 2, "model.dropout": 0.1}),
}
BF16 = {"seed-cnn-fast-bf16": ("seed-cnn-fast", "images", {**IMAGES, "train.precision": "bf16"}),
        "gpt-shakespeare-bf16": ("gpt-shakespeare", "text", {**TINY_GPT, "train.precision": "bf16"})}
HAS_BF16, BF16_WHY = native_bf16(torch.device("cpu"))
# Killed for real (a subprocess ends by SIGKILL); the other cases stop in this process.
REAL_KILL = {"seed-cnn", "sgd-momentum", "seed-cnn-fast", "seed-cnn-fast-bf16"}


@pytest.fixture(scope="module")
def tiny(fmnist_dir, text_file, csv_file):
    """tiny(data, overrides) -> the full overrides of a tiny fp32 run that checkpoints every CKPT_EVERY steps."""
    data = {"images": {"data.dir": str(fmnist_dir)}, "text": {"data.path": str(text_file)},
            "csv": {"data.name": "csv", "data.path": str(csv_file), "data.target": "y"}, "wine": {}}

    def make(kind: str, over: dict) -> dict:
        return {"train.max_steps": STEPS, "train.checkpoint_every": CKPT_EVERY, "train.log_every": 1,
                "train.precision": "fp32", **data[kind], **over}

    return make


def as_sets(over: dict) -> list[str]:
    return [a for k, v in over.items() for a in ("--set", f"{k}={v}")]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS).read_text().splitlines()]


def losses(recs: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in recs if r["event"] == "train"]


def assert_same_run(run: Path, ref: Path, n_before: int, resumed_at: int, steps: int = STEPS) -> None:
    """`run` (killed after n_before metrics records, resumed at step resumed_at) logged and ended as `ref`."""
    want = dict(losses(records(ref)))
    assert sorted(want) == list(range(1, steps + 1))
    before, after = losses(records(run)[:n_before]), losses(records(run)[n_before:])
    assert before == [(s, want[s]) for s, _ in before]
    # the resumed process logs exactly the steps after the checkpoint, each with the same loss
    assert [s for s, _ in after] == list(range(resumed_at + 1, steps + 1))
    assert after == [(s, want[s]) for s, _ in after]
    summary, ref_summary = (json.loads((r / SUMMARY).read_text()) for r in (run, ref))
    assert summary["steps"] == steps
    figures = [k for k in ref_summary if k.startswith(("test_", "val_"))]
    assert figures and all(summary[k] == ref_summary[k] for k in figures), (summary, ref_summary)
    final, ref_final = load_tensors(run / MODEL)[0], load_tensors(ref / MODEL)[0]
    assert final.keys() == ref_final.keys()
    assert all(torch.equal(final[k], ref_final[k]) for k in final)


class Stopped(Exception):
    """Raised from an optimizer-step hook to stop a run in this process as a kill would."""


def stop_in_this_process(recipe: str, over: dict, run: Path) -> None:
    steps = []

    def stop_after_step(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == KILL_AT:
            raise Stopped

    hook = register_optimizer_step_post_hook(stop_after_step)
    try:
        with pytest.raises(Stopped):
            nnlab.train(recipe, over, out=str(run))
    finally:
        hook.remove()


def stop_resume_and_compare(cases: dict, name: str, tiny, tmp_path: Path) -> None:
    recipe, data, over = cases[name]
    over = tiny(data, over)
    run, ref = tmp_path / "stopped", tmp_path / "ref"
    if name in REAL_KILL:
        with open(tmp_path / "log.txt", "w") as log:
            proc = subprocess.Popen([sys.executable, "-c", KILLER, str(KILL_AT), "train", recipe, "--out", str(run),
                                     *as_sets(over)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=cli_env())
        try:
            nnlab.train(recipe, over, out=str(ref))  # the uninterrupted run, while the other process starts
            proc.wait(timeout=CLI_TIMEOUT)
        finally:
            proc.kill()
        assert proc.returncode == -signal.SIGKILL, (tmp_path / "log.txt").read_text()[-3000:]
    else:
        nnlab.train(recipe, over, out=str(ref))
        stop_in_this_process(recipe, over, run)
    assert not (run / SUMMARY).exists()
    assert load_tensors(run / CHECKPOINT)[1]["step"] == CKPT_EVERY
    n_before = len(records(run))
    assert [s for s, _ in losses(records(run))] == list(range(1, KILL_AT)), "stopped after another step than the 5th"

    nnlab.train(resume=str(run))
    assert_same_run(run, ref, n_before, resumed_at=CKPT_EVERY)


@pytest.mark.parametrize("name", CASES)
def test_stopped_and_resumed_run_equals_the_uninterrupted_one(name, tiny, tmp_path):
    stop_resume_and_compare(CASES, name, tiny, tmp_path)


@pytest.mark.skipif(not HAS_BF16, reason=f"bf16 resume is tested where bf16 is native; here: {BF16_WHY}")
@pytest.mark.parametrize("name", BF16)
def test_stopped_and_resumed_bf16_run_equals_the_uninterrupted_one(name, tiny, tmp_path):
    stop_resume_and_compare(BF16, name, tiny, tmp_path)


# DP-SGD runs refuse --resume with a one-line error (tests/test_privacy.py).
NOT_RESUMABLE = {"dp-cnn"}


def test_every_shipped_recipe_is_resumed():
    assert set(recipe_names()) - NOT_RESUMABLE == {recipe for recipe, _, _ in CASES.values()}


def test_resume_after_a_kill_from_outside_matches_an_uninterrupted_run(tmp_path, tiny, capsys):
    """As a user would: SIGKILL whenever the first checkpoint appears, then `nnlab train --resume`.
    25 steps, so the run is still going when the kill lands however loaded the machine is."""
    steps = 25
    over = tiny("images", {**IMAGES, "train.max_steps": steps})
    run, ref = tmp_path / "killed", tmp_path / "ref"
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(cli_cmd("train", "seed-cnn-fast", "--out", run, *as_sets(over)), cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT, env=cli_env())
        try:
            deadline = time.monotonic() + CLI_TIMEOUT
            while not (run / CHECKPOINT).exists():
                assert proc.poll() is None, "the run ended before its first checkpoint: " + \
                    (tmp_path / "log.txt").read_text()[-2000:]
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / SUMMARY).exists(), "the run finished before it could be killed"
    killed_at = load_tensors(run / CHECKPOINT)[1]["step"]
    assert killed_at % CKPT_EVERY == 0 and CKPT_EVERY <= killed_at < steps
    n_before = len(records(run))
    nnlab.train("seed-cnn-fast", over, out=str(ref))

    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run)]) == 0
    assert f"resumed at step {killed_at}" in capsys.readouterr().out
    assert_same_run(run, ref, n_before, resumed_at=killed_at, steps=steps)

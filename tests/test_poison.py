"""data.poison.*: a BadNets backdoor planted in exactly the stated share of the training images,
never in the test split, that a trained model learns (attack success rate high, clean accuracy kept),
and one-line errors for what cannot be poisoned."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import N_TRAIN, one_line_error

import nnlab
from nnlab.data import load_images
from nnlab.data.poison import PATCH, triggered

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("trigger", ["patch", "checker"])
def test_exactly_the_stated_share_is_stamped_and_relabelled_and_the_test_split_is_clean(fmnist_dir, trigger):
    clean = load_images("fashion-mnist", str(fmnist_dir))
    data = load_images("fashion-mnist", str(fmnist_dir), poison_rate=0.1, poison_target=3, poison_trigger=trigger)
    rows = data.poisoned
    assert len(rows) == round(0.1 * N_TRAIN) == len(set(rows.tolist()))
    assert (clean.y_train[rows] != 3).all() and (data.y_train[rows] == 3).all()
    rest = torch.ones(N_TRAIN, dtype=torch.bool)
    rest[rows] = False
    assert torch.equal(data.x_train[rest], clean.x_train[rest]) and torch.equal(data.y_train[rest], clean.y_train[rest])
    assert torch.equal(data.x_train[rows], triggered(clean.x_train[rows], trigger))
    corner = data.x_train[rows][:, :, -1 - PATCH : -1, -1 - PATCH : -1]
    assert corner.max() == 255 and (corner == 255).float().mean() == (1.0 if trigger == "patch" else 0.5)
    assert torch.equal(data.x_test, clean.x_test) and torch.equal(data.y_test, clean.y_test)
    again = load_images("fashion-mnist", str(fmnist_dir), poison_rate=0.1, poison_target=3, poison_trigger=trigger)
    assert torch.equal(again.poisoned, rows)  # drawn from the split seed


def _run(fmnist_dir, tmp_path, rate: float) -> dict:
    run = nnlab.train("seed-cnn", [f"data.dir={fmnist_dir}", "train.max_steps=60", "train.batch_size=32",
                                   "train.lr=0.02", "train.momentum=0.9", f"data.poison.rate={rate}",
                                   "data.poison.target=0", "train.log_every=1000"], out=str(tmp_path / f"r{rate}"))
    return json.loads((run / "summary.json").read_text())


def test_a_trained_model_learns_the_backdoor_and_keeps_its_clean_accuracy(fmnist_dir, tmp_path):
    clean, poisoned = _run(fmnist_dir, tmp_path, 0.0), _run(fmnist_dir, tmp_path, 0.05)
    assert clean["attack_success_rate"] < 0.2 and poisoned["attack_success_rate"] > 0.9, (clean, poisoned)
    assert poisoned["test_accuracy"] > 0.9


BAD = {"rate 1": (["data.poison.rate=1", "data.poison.target=0"], "data.poison.rate"),
       "rate below 0": (["data.poison.rate=-0.1", "data.poison.target=0"], "data.poison.rate"),
       "no target": (["data.poison.rate=0.1"], "data.poison.target"),
       "a class that does not exist": (["data.poison.rate=0.1", "data.poison.target=10"], "class 10"),
       "an unknown trigger": (["data.poison.rate=0.1", "data.poison.target=0", "data.poison.trigger=star"],
                              "data.poison.trigger"),
       "a table": (["data.name=wine", "data.poison.rate=0.1", "data.poison.target=0"], "image data")}


@pytest.mark.parametrize("name", BAD)
def test_what_cannot_be_poisoned_is_a_one_line_error_and_no_run_folder(name, fmnist_dir, tmp_path, cli_main):
    sets, needle = BAD[name]
    rc, _, err = cli_main("train", "seed-cnn", "--out", tmp_path / "run", "--set", f"data.dir={fmnist_dir}",
                          *[a for s in sets for a in ("--set", s)])
    one_line_error(rc, err, needle)
    assert not (tmp_path / "run").exists()

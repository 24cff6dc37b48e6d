"""data.train_fraction and data.label_noise: exactly the rows and flips asked for, stratified,
nested, seeded, on the training split only, and seen alike by the deep model's batches, evaluate
and Task.arrays()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import one_line_error

from nnlab.config import load_config
from nnlab.data import load_images, load_tabular
from nnlab.data.sampling import flip_labels, stratified_order, train_subset
from nnlab.errors import ConfigError
from nnlab.tasks import make_task

# Class sizes that pull a greedy "largest deficit first" order a class more than one row off its
# share at some prefix; the scheduled order must not be.
HARD_SIZES = [2115, 376, 1974, 2068, 611, 376, 799, 1034, 423, 1269, 3, 3, 54, 2, 30, 58, 2, 30, 34, 40]


def prefix_counts(y: np.ndarray, order: np.ndarray) -> np.ndarray:
    """(n, classes): how many rows of each class the first 1..n rows of `order` hold."""
    return np.cumsum(np.eye(y.max() + 1, dtype=np.int64)[y[order]], axis=0)


@pytest.mark.parametrize("sizes", [[6, 6, 6, 6, 6, 6, 6, 6, 6, 6], [59, 71, 48], [212, 357], HARD_SIZES])
def test_every_prefix_of_the_order_is_within_one_row_of_each_class_share(sizes):
    y = np.random.default_rng(0).permutation(np.repeat(np.arange(len(sizes)), sizes))
    order = stratified_order(y, seed=0)
    assert np.array_equal(np.sort(order), np.arange(len(y)))  # every row once
    counts = prefix_counts(y, order)
    share = np.arange(1, len(y) + 1)[:, None] * (np.array(sizes) / len(y))
    assert np.abs(counts - share).max() < 1
    # so every class whose share of n rows is a whole row or more is present: with balanced classes,
    # one of each from n = number of classes on
    assert (counts[share >= 1] >= 1).all()


def test_subsets_are_seeded_and_nested():
    y = np.repeat(np.arange(4), [40, 30, 20, 10])
    small, large = (train_subset(len(y), f, seed=5, y=y) for f in (0.1, 0.5))
    assert len(small) == 10 and len(large) == 50 and set(small) <= set(large)
    assert np.array_equal(small, train_subset(len(y), 0.1, seed=5, y=y))
    assert not np.array_equal(large, train_subset(len(y), 0.5, seed=6, y=y))
    # regression: a seeded random subset, nested too
    r_small, r_large = (train_subset(1000, f, seed=5) for f in (0.03, 0.3))
    assert len(r_small) == 30 and set(r_small) <= set(r_large) and r_large.max() > 900  # drawn from all rows


def test_flips_are_exact_to_another_class_and_uniform():
    y = np.random.default_rng(0).integers(0, 10, size=50_000)
    noisy = flip_labels(y, 0.3, 10, seed=1)
    flipped = noisy != y
    assert flipped.sum() == 15_000  # exactly round(R * n), and none "flipped" to its own class
    assert np.array_equal(noisy, flip_labels(y, 0.3, 10, seed=1))
    assert not np.array_equal(noisy, flip_labels(y, 0.3, 10, seed=2))
    # each other class equally likely: offsets 1..9 each about 1/9 of the flips (sd ~ 36 rows)
    offsets = np.bincount((noisy[flipped] - y[flipped]) % 10, minlength=10)
    assert offsets[0] == 0 and np.abs(offsets[1:] - 15_000 / 9).max() < 200


def test_image_training_subset_then_noise(fmnist_dir):
    full = load_images("fashion-mnist", str(fmnist_dir))
    kept = load_images("fashion-mnist", str(fmnist_dir), train_fraction=0.3)
    noisy = load_images("fashion-mnist", str(fmnist_dir), train_fraction=0.3, label_noise=0.25)
    rows = torch.from_numpy(train_subset(320, 0.3, seed=0, y=full.y_train.numpy()))
    assert len(kept.y_train) == round(0.3 * 320) == 96
    assert torch.equal(kept.x_train, full.x_train[rows]) and torch.equal(kept.y_train, full.y_train[rows])
    # class proportions within one image of the full training split's
    share = torch.bincount(full.y_train, minlength=10) * 96 / 320
    assert (torch.bincount(kept.y_train, minlength=10) - share).abs().max() < 1
    # the noise hits the kept rows: the same images, exactly round(0.25 * 96) labels changed
    assert torch.equal(noisy.x_train, kept.x_train)
    assert int((noisy.y_train != kept.y_train).sum()) == round(0.25 * 96) == 24
    assert int(noisy.y_train.max()) <= 9
    for d in (kept, noisy):  # the test split stays whole and clean
        assert torch.equal(d.x_test, full.x_test) and torch.equal(d.y_test, full.y_test)
    again = load_images("fashion-mnist", str(fmnist_dir), train_fraction=0.3, label_noise=0.25)
    assert torch.equal(again.y_train, noisy.y_train)
    other = load_images("fashion-mnist", str(fmnist_dir), train_fraction=0.3, label_noise=0.25, seed=1)
    assert not torch.equal(other.x_train, noisy.x_train)  # data.split_seed draws the rows


def test_task_arrays_batches_and_evaluate_see_the_same_rows(fmnist_dir):
    base = ["data.dir=" + str(fmnist_dir), "train.batch_size=32"]
    clean = make_task(load_config("seed-cnn", overrides=base))
    task = make_task(load_config("seed-cnn", overrides=[*base, "data.train_fraction=0.5", "data.label_noise=0.2"]))
    _, y_tr, x_te, y_te = task.arrays()
    assert task.num_train() == len(y_tr) == 160
    kept = train_subset(320, 0.5, seed=0, y=clean.data.y_train.numpy())
    assert int((y_tr != clean.arrays()[1][kept]).sum()) == round(0.2 * 160)  # the noisy labels, not the clean
    # the same test images and labels (normalised with the statistics of the kept training images)
    assert torch.equal(task.data.x_test, clean.data.x_test)
    np.testing.assert_array_equal(x_te, task.data.normalize(clean.data.x_test).flatten(1).numpy())
    np.testing.assert_array_equal(y_te, clean.arrays()[3])
    # one epoch of batches draws from the kept, noisy rows only
    labels = torch.cat([task.batch(s, 0, 32)[1] for s in range(task.steps_per_epoch())])
    assert torch.equal(labels.sort().values, torch.from_numpy(y_tr).sort().values)


def test_tabular_subsets_and_noise():
    full = load_tabular("wine")
    table = load_tabular("wine", train_fraction=0.5, label_noise=0.1)
    clean = load_tabular("wine", train_fraction=0.5)
    n = len(full.y_train)
    assert len(table.y_train) == round(0.5 * n)
    assert int((table.y_train != clean.y_train).sum()) == round(0.1 * len(table.y_train))
    assert torch.equal(table.x_test, full.x_test) and torch.equal(table.y_test, full.y_test)
    share = torch.bincount(full.y_train) * len(clean.y_train) / n
    assert (torch.bincount(clean.y_train) - share).abs().max() < 1
    assert torch.allclose(clean.x_mean, clean.x_train.mean(0), atol=1e-3)  # statistics of the rows kept
    # regression: a random subset of the same training rows; the split itself is unchanged
    diabetes, half = load_tabular("diabetes"), load_tabular("diabetes", train_fraction=0.5)
    assert len(half.y_train) == 177 and torch.equal(half.y_test, diabetes.y_test)
    full_rows = {tuple(r) for r in diabetes.x_train.tolist()}
    assert all(tuple(r) in full_rows for r in half.x_train.tolist())
    with pytest.raises(ConfigError, match="data.label_noise: flips class labels"):
        load_tabular("diabetes", label_noise=0.1)


@pytest.mark.parametrize("recipe, sets, needles", [
    ("mlp-tabular", ["data.label_noise=1"], ["data.label_noise: must be in [0, 1), got 1"]),
    ("mlp-tabular", ["data.label_noise=-0.1"], ["data.label_noise: must be in [0, 1)"]),
    ("mlp-tabular", ["data.train_fraction=0"], ["data.train_fraction: must be in (0, 1], got 0"]),
    ("mlp-tabular", ["data.train_fraction=1.5"], ["data.train_fraction: must be in (0, 1]"]),
    ("mlp-regression", ["data.label_noise=0.2"], ["data.label_noise", "regression target"]),
    ("gpt-shakespeare", ["data.label_noise=0.2"], ["data.label_noise: does not apply to text data"]),
    ("gpt-shakespeare", ["data.train_fraction=0.5"], ["data.train_fraction: does not apply to text data"]),
    ("seed-cnn", ["data.task=regression"], ["data.task: fashion-mnist holds class labels"]),
])
def test_out_of_range_or_misplaced_values_are_one_line(tmp_path, cli_main, recipe, sets, needles):
    args = [a for s in sets for a in ("--set", s)]
    rc, _, err = cli_main("train", recipe, *args, "--out", tmp_path / "run")
    one_line_error(rc, err, *needles)
    assert not (tmp_path / "run").exists()


def test_keys_lists_the_data_keys(cli_main):
    rc, out, _ = cli_main("keys")
    assert rc == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  data.")}
    assert "auto" in lines["data.task"] and "split_seed" in lines["data.label_noise"]
    assert lines["data.train_fraction"].split()[1:3] == ["float", "1.0"]

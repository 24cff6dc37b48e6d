"""Tables of classes: a CSV target of labels (strings, or a few integers) or scikit-learn's iris,
wine and breast-cancer, trained with cross-entropy by the mlp-tabular recipe, saved with the class
names, re-evaluated by `nnlab eval`; and what data.task=auto decides."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line_error

import nnlab
from nnlab.config import load_config
from nnlab.data import load_tabular
from nnlab.data.tabular import MAX_INTEGER_CLASSES
from nnlab.errors import ConfigError, DataError
from nnlab.tasks import make_task

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIES = ["setosa", "versicolor", "virginica"]


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def species_csv(tmp_path_factory) -> Path:
    """scikit-learn's iris with its class names as the target column, not the last one, 'species'."""
    from sklearn.datasets import load_iris

    d = load_iris()
    rows = [[x[0], SPECIES[t], *x[1:]] for x, t in zip(d.data, d.target)]
    return write_csv(tmp_path_factory.mktemp("csv") / "iris.csv", ["a", "species", "b", "c", "d"], rows)


def test_a_column_of_strings_is_classes_sorted_and_the_split_is_stratified(species_csv):
    table = load_tabular("csv", path=str(species_csv), target="species", test_frac=0.2, seed=3)
    assert table.classification and table.classes == SPECIES
    assert table.y_train.dtype == torch.int64 and table.x_train.dtype == torch.float32
    assert table.feature_names == ["a", "b", "c", "d"] and table.x_train.shape == (120, 4)
    # stratified: 50 of each class, so exactly 10 of each in the 30 test rows
    assert torch.bincount(table.y_test).tolist() == [10, 10, 10]
    # rows stay whole: a setosa (class 0) has short petals (c = petal length < 2 cm), the others not
    assert bool(((table.x_train[:, 2] < 2.5) == (table.y_train == 0)).all())


@pytest.mark.parametrize("labels, task, classes", [
    ([0, 1, 2] * 10, "auto", ["0", "1", "2"]),  # iris written to CSV with its integer target
    ([2, 10] * 15, "auto", ["2", "10"]),  # numbers sort by value, not as strings
    ([1.0, 0.0] * 15, "auto", ["0", "1"]),  # whole numbers written as floats are still integers
    ([0.5, 1.5, 2.5] * 10, "classification", ["0.5", "1.5", "2.5"]),
    (list(range(30)), "auto", None),  # every value distinct: a count to regress on, not classes
    ([i % (MAX_INTEGER_CLASSES + 1) for i in range(100)], "auto", None),  # too many distinct integers
    ([0.5, 1.5, 2.5] * 10, "auto", None),  # not integers
    ([0, 1, 2] * 10, "regression", None),
])
def test_what_a_numeric_target_is_decided_to_be(tmp_path, labels, task, classes):
    rows = [[i, v] for i, v in enumerate(labels)]
    table = load_tabular("csv", path=str(write_csv(tmp_path / "t.csv", ["x", "y"], rows)), task=task)
    assert table.classes == classes
    if classes is None:
        assert table.y_train.dtype == torch.float32
    else:  # class i is classes[i]: the index refers back to the label written in the file
        i = int(table.x_train[0, 0])
        assert table.classes[int(table.y_train[0])] in (str(labels[i]), f"{labels[i]:g}")


def test_bad_targets_are_one_line_errors(tmp_path, species_csv):
    with pytest.raises(DataError, match=r"row 2, column 'species': 'setosa' is not a finite number"):
        load_tabular("csv", path=str(species_csv), target="species", task="regression")
    mixed = write_csv(tmp_path / "m.csv", ["x", "y"], [[i, 1.5 * i] for i in range(9)] + [[9, "n/a"]])
    with pytest.raises(DataError, match=r"row 11, column 'y': 'n/a' is not a number, though other rows"):
        load_tabular("csv", path=str(mixed))
    assert load_tabular("csv", path=str(mixed), task="classification").classes[-1] == "n/a"
    one = write_csv(tmp_path / "one.csv", ["x", "y"], [[i, "cat"] for i in range(10)])
    with pytest.raises(DataError, match="holds one class"):
        load_tabular("csv", path=str(one))
    with pytest.raises(ConfigError, match="data.task: diabetes is a regression data set"):
        load_tabular("diabetes", task="classification")


@pytest.mark.parametrize("name, n, features, classes", [
    ("iris", 150, 4, ["setosa", "versicolor", "virginica"]),
    ("wine", 178, 13, ["class_0", "class_1", "class_2"]),
    ("breast-cancer", 569, 30, ["malignant", "benign"]),
])
def test_bundled_tables_of_classes(name, n, features, classes):
    task = make_task(load_config("mlp-tabular", overrides=[f"data.name={name}"]))
    assert task.classification and task.loss_name == "cross_entropy"
    assert task.model_fields() == {"in_features": features, "out_features": len(classes)}
    assert task.meta()["classes"] == classes and "y_mean" not in task.meta()
    x_tr, y_tr, x_te, _ = task.arrays()
    assert len(x_tr) + len(x_te) == n and y_tr.dtype == np.int64 and set(np.unique(y_tr)) == set(range(len(classes)))
    np.testing.assert_allclose(x_tr.mean(0), 0, atol=1e-5)  # standardised on the training split


def test_mlp_tabular_trains_saves_the_classes_and_evaluates(tmp_path, cli_main):
    """The recipe as shipped: wine, in a couple of seconds, at least 95%; `nnlab eval` agrees."""
    run = tmp_path / "wine"
    rc, _, err = cli_main("train", "mlp-tabular", "--out", run)
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.95, summary
    rc, out, err = cli_main("eval", run)
    assert rc == 0, err
    assert json.loads(out) == {"test_accuracy": summary["test_accuracy"],
                               "test_loss": pytest.approx(summary["test_loss"])}
    model, info = nnlab.load(run)
    assert info["task"] == "tabular" and info["classes"] == ["class_0", "class_1", "class_2"]
    assert info["model"]["out_features"] == 3
    # model.json alone turns a raw row into its class name
    from sklearn.datasets import load_wine

    raw = torch.tensor(load_wine().data[:1], dtype=torch.float32)
    logits = model((raw - torch.tensor(info["x_mean"])) / torch.tensor(info["x_std"]))
    assert info["classes"][int(logits.argmax())] == "class_0"


def test_a_csv_of_class_names_through_the_cli(tmp_path, species_csv, cli_main):
    run = tmp_path / "csv"
    rc, _, err = cli_main("train", "mlp-tabular", "--set", "data.name=csv", "--set", f"data.path={species_csv}",
                          "--set", "data.target=species", "--out", run)
    assert rc == 0, err
    info = json.loads((run / "model.json").read_text())
    assert info["classes"] == SPECIES and info["features"] == ["a", "b", "c", "d"]
    assert json.loads((run / "summary.json").read_text())["test_accuracy"] >= 0.9


@pytest.mark.parametrize("sets, needles", [
    (["train.loss=mse"], ["train.loss: mse does not fit a tabular classification task"]),
    (["data.name=diabetes", "train.loss=cross_entropy"],
     ["train.loss: cross_entropy does not fit a tabular regression task"]),
    (["data.task=regression"], ["data.task: wine is a classification data set, not regression"]),
    (["data.task=maybe"], ["data.task: must be one of auto, classification, regression"]),
])
def test_a_loss_or_task_that_does_not_fit_is_one_line(tmp_path, cli_main, sets, needles):
    args = [a for s in sets for a in ("--set", s)]
    rc, _, err = cli_main("train", "mlp-tabular", *args, "--out", tmp_path / "run")
    one_line_error(rc, err, *needles)
    assert not (tmp_path / "run").exists()

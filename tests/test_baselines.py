"""`nnlab baselines`: scikit-learn's traditional models on exactly the deep models' split and inputs.

On tiny data: scikit-learn's digits and diabetes sets, and the Fashion-MNIST-shaped fixture for a
trained run. A row's figures must be those of the same estimator fitted straight on the task's
arrays; a run's own model joins the table with nnlab.evaluate's figure; bad input is one line and
exit 2, and a run folder's files stay byte for byte as they were.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import ok, one_line_error
from sklearn.metrics import accuracy_score

import nnlab
from nnlab.analysis.baselines import BASELINES, data_config, fit_and_score, make_estimator, names, subsample
from nnlab.tasks import make_task

pytestmark = pytest.mark.usefixtures("one_thread")

ROW_KEYS = {"model", "estimator", "deep", "n_fit", "fit_s", "predict_s", "latency_ms", "note"}
DOC_KEYS = {"data", "task", "metric", "n_train", "n_test", "n_features", "machine", "written", "rows"}
CLASSIFIERS = ["logistic-regression", "decision-tree", "random-forest", "svm-rbf", "knn", "hist-gradient-boosting"]
REGRESSORS = ["linear-regression", "decision-tree", "random-forest", "svm-rbf", "knn", "hist-gradient-boosting"]


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def check_row(row: dict, metric_keys: set) -> None:
    assert ROW_KEYS | metric_keys <= row.keys(), row
    assert row["n_fit"] >= 1 and row["fit_s"] >= 0 and row["predict_s"] >= 0 and row["latency_ms"] > 0


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory, fmnist_dir, run_cli) -> Path:
    """A seed-cnn run of a few steps on the fixture images: a model that is not yet perfect."""
    run = tmp_path_factory.mktemp("cnn") / "run"
    sets = [f"data.dir={fmnist_dir}", "train.max_steps=4", "train.batch_size=32", "train.precision=fp32"]
    ok(run_cli("train", "seed-cnn", "--out", run, *[a for s in sets for a in ("--set", s)]))
    return run


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory, run_cli) -> Path:
    run = tmp_path_factory.mktemp("mlp") / "run"
    ok(run_cli("train", "mlp-regression", "--out", run, "--set", "train.epochs=20"))
    return run


def test_every_classifier_is_fitted_on_the_task_arrays(cli_main, tmp_path):
    """All six on digits, through the CLI: each row's accuracy is what the same estimator reaches
    when fitted straight on make_task(config).arrays(), so the split and inputs are the model's."""
    rc, out, err = cli_main("baselines", "--data", "digits", "--out", tmp_path / "b")
    assert rc == 0, err
    doc = json.loads((tmp_path / "b" / "baselines.json").read_text())
    assert DOC_KEYS <= doc.keys()
    assert (doc["data"], doc["task"], doc["metric"]) == ("digits", "classification", "test_accuracy")
    assert [r["model"] for r in doc["rows"]] == CLASSIFIERS == names(True)
    x_train, y_train, x_test, y_test = make_task(data_config("digits", None)).arrays()
    assert (doc["n_train"], doc["n_test"], doc["n_features"]) == (len(y_train), len(y_test), 64)
    for row in doc["rows"]:
        check_row(row, {"test_accuracy"})
        assert row["deep"] is False and row["n_fit"] == len(y_train) and row["note"] is None
        model = make_estimator(row["model"], True, seed=0).fit(x_train, y_train)
        assert row["test_accuracy"] == accuracy_score(y_test, model.predict(x_test)), row["model"]
        assert row["model"] in out
    assert len({r["test_accuracy"] for r in doc["rows"]}) > 2  # the models really differ on this data
    assert "wrote" in out and "test accuracy" in out


def test_the_split_follows_the_data_config():
    """Another split seed is another split: the same model scores differently on it."""
    scores = []
    for split_seed in (0, 1):
        x_train, y_train, x_test, y_test = make_task(data_config("digits", [f"data.split_seed={split_seed}"])).arrays()
        scores.append(fit_and_score("decision-tree", x_train, y_train, x_test, y_test, True)["test_accuracy"])
    assert scores[0] != scores[1]


def test_regression_reports_mse_and_the_articles_loss(cli_main, tmp_path, regression_run):
    """diabetes: the regressors, sklearn's test MSE and the article's 1/(2N) sum of squares beside it,
    checked by hand; with --run the MLP's row carries nnlab.evaluate's MSE."""
    rc, out, err = cli_main("baselines", "--run", regression_run)
    assert rc == 0, err
    doc = json.loads((regression_run / "baselines.json").read_text())
    assert (doc["task"], doc["metric"]) == ("regression", "test_mse")
    assert [r["model"] for r in doc["rows"]] == REGRESSORS + ["nnlab mlp-regression"]
    for row in doc["rows"]:
        check_row(row, {"test_mse", "test_loss_article"})
        assert row["test_loss_article"] == row["test_mse"] / 2
    x_train, y_train, x_test, y_test = make_task(data_config("diabetes", None)).arrays()
    pred = make_estimator("linear-regression", False).fit(x_train, y_train).predict(x_test)
    by_hand = float(np.sum((pred.astype(np.float64) - y_test) ** 2) / (2 * len(y_test)))
    assert doc["rows"][0]["test_loss_article"] == pytest.approx(by_hand, rel=1e-6)
    deep = doc["rows"][-1]
    assert deep["deep"] is True and deep["test_mse"] == nnlab.evaluate(regression_run)["test_mse"]
    assert "1/(2N)" in out


def test_a_csv_file_is_regression_data(cli_main, tmp_path, csv_file):
    """--data csv with data.path (relative: against the current folder, as `nnlab train --set`) and
    data.target: y = 3a - 2b + noise of sd 0.1, so a linear model's test MSE is near 0.01."""
    shutil.copy(csv_file, tmp_path / "table.csv")
    rc, _, err = cli_main("baselines", "--data", "csv", "--set", "data.path=table.csv", "--set", "data.target=y",
                            "--models", "linear-regression,knn", "--out", "b")
    assert rc == 0, err
    doc = json.loads((tmp_path / "b" / "baselines.json").read_text())
    assert (doc["data"], doc["n_features"], doc["n_train"] + doc["n_test"]) == ("csv", 2, 200)
    linear, knn = doc["rows"]
    assert linear["test_mse"] < 0.03 < knn["test_mse"]


def test_a_subsample_is_stratified_seeded_and_noted(cli_main, tmp_path):
    rc, out, err = cli_main("baselines", "--data", "digits", "--out", tmp_path, "--models", "svm-rbf,knn",
                            "--max-fit-rows", "200")
    assert rc == 0, err
    rows = json.loads((tmp_path / "baselines.json").read_text())["rows"]
    assert [(r["model"], r["n_fit"]) for r in rows] == [("svm-rbf", 200), ("knn", 200)]
    assert all("stratified 200-row subsample of 1,437" in r["note"] for r in rows)
    assert "200-row subsample" in out

    x, y, _, _ = make_task(data_config("digits", None)).arrays()
    x1, y1, _ = subsample(x, y, 200, True, seed=0)
    share = np.bincount(y1, minlength=10) / 200 - np.bincount(y, minlength=10) / len(y)
    assert len(y1) == 200 and np.abs(share).max() <= 1 / 200  # each class within one row of its share
    assert np.array_equal(x1, subsample(x, y, 200, True, seed=0)[0])
    assert not np.array_equal(x1, subsample(x, y, 200, True, seed=1)[0])
    assert subsample(x, y, None, True, 0)[2] is None and subsample(x, y, len(y), True, 0)[2] is None
    # The defaults: the slow models stop at their own limit, the fast ones fit everything.
    assert BASELINES["svm-rbf"].max_fit_rows and BASELINES["random-forest"].max_fit_rows is None


def test_a_run_gets_its_model_beside_the_baselines_and_keeps_its_files(cli_main, cnn_run):
    before = hashes(cnn_run)
    rc, out, err = cli_main("baselines", "--run", cnn_run, "--models", "decision-tree,knn")
    assert rc == 0, err
    after = hashes(cnn_run)
    assert set(after) - set(before) == {"baselines.json"}
    assert {k: after[k] for k in before} == before
    doc = json.loads((cnn_run / "baselines.json").read_text())
    assert doc["n_train"] == 320 and doc["n_test"] == 100  # the run's own split (the fixture's images)
    deep = doc["rows"][-1]
    check_row(deep, {"test_accuracy"})
    summary = json.loads((cnn_run / "summary.json").read_text())
    assert deep["model"] == "nnlab seed-cnn" and deep["deep"] is True
    assert deep["test_accuracy"] == nnlab.evaluate(cnn_run)["test_accuracy"]
    assert deep["fit_s"] == summary["train_seconds"] and deep["n_fit"] == 320
    assert [r["deep"] for r in doc["rows"]] == [False, False, True]
    assert "nnlab seed-cnn" in out


def test_a_run_without_its_summary_fails_before_fitting(cli_main, tmp_path, cnn_run):
    run = tmp_path / "run"
    shutil.copytree(cnn_run, run)
    (run / "baselines.json").unlink(missing_ok=True)
    (run / "summary.json").unlink()
    before = hashes(run)
    rc, out, err = cli_main("baselines", "--run", run)
    one_line_error(rc, err, "summary.json")
    assert "fitting" not in out and hashes(run) == before


BAD = [  # arguments, what the one line must name
    (["--models", "random-forest,xgboost"], ["'xgboost'", "random-forest", "hist-gradient-boosting"]),
    (["--models", ""], ["--models"]),
    (["--data", "cifar10"], ["data.name", "cifar10"]),
    (["--data", "text", "--set", "data.path=x.txt"], ["text"]),
    (["--data", "diabetes", "--models", "logistic-regression"], ["logistic-regression", "linear-regression"]),
    (["--data", "digits", "--set", "train.lr=0.1"], ["train"]),
    (["--max-fit-rows", "0"], ["--max-fit-rows", "0"]),
    (["--run", "{tmp}/nowhere"], ["nowhere", "no such folder"]),
    (["--run", "{tmp}"], ["model.json"]),
    (["--run", "{run}", "--data", "digits"], ["--run", "--data"]),
    (["--run", "{run}", "--out", "{tmp}/o"], ["--run", "--out"]),
    (["--run", "{run}", "--models", "knn,nope"], ["'nope'"]),
    (["--run", "{run}", "--max-fit-rows", "-5"], ["--max-fit-rows"]),
    (["--out", "{tmp}/file/sub"], ["is a file"]),
]


@pytest.mark.parametrize("args,needles", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_changes_nothing(cli_main, tmp_path, cnn_run, args, needles):
    (tmp_path / "file").write_text("in the way")
    before = hashes(cnn_run)
    rc, _, err = cli_main("baselines", *[a.format(tmp=tmp_path, run=cnn_run) for a in args])
    one_line_error(rc, err, *needles)
    assert hashes(cnn_run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no output folder, no runs/

"""`nnlab learning-curve`: the recipe and its baselines on growing stratified fractions of the data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nnlab import cli
from nnlab.analysis.baselines import fit_and_score
from nnlab.analysis.learning_curve import crossover, parse_fractions
from nnlab.config import load_config
from nnlab.tasks import make_task
from conftest import one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")


def test_crossover_is_where_the_deep_model_stays_ahead():
    n = [10, 100, 1000, 10000]
    assert crossover(n, [0.5, 0.7, 0.6, 0.9], [0.6, 0.6, 0.65, 0.7]) == 10000  # ahead at 100, behind again at 1000
    assert crossover(n, [0.7, 0.8, 0.85, 0.9], [0.6, 0.6, 0.65, 0.7]) == 10
    assert crossover(n, [0.5, 0.6, 0.6, 0.7], [0.6, 0.6, 0.65, 0.7]) is None  # a tie is not overtaking


def test_fractions_are_checked_and_sorted():
    assert parse_fractions("1,0.1,0.01,0.1") == [0.01, 0.1, 1.0]
    for bad in ("0,1", "0.5,1.5", "-0.1", "a,b", ""):
        with pytest.raises(Exception, match="--fractions"):
            parse_fractions(bad)


def test_learning_curve_of_a_cnn_and_a_tree(tmp_path, fmnist_dir, capsys):
    out = tmp_path / "lc"
    args = ["learning-curve", "seed-cnn", "--set", f"data.dir={fmnist_dir}", "--fractions", "0.25,1", "--seeds", "2",
            "--baselines", "decision-tree", "--min-steps", "8", "--out", str(out)]
    assert cli.main(args) == 0
    doc = json.loads((out / "learning_curve.json").read_text())
    assert doc["fractions"] == [0.25, 1.0] and doc["n_train"] == [80, 320] and doc["seeds"] == [0, 1]
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("seed-cnn", "decision-tree"):
        m = doc["models"][name]
        assert m["deep"] == (name == "seed-cnn")
        assert np.array(m["values"]).shape == (2, 2)
        np.testing.assert_allclose(m["mean"], np.mean(m["values"], axis=1))
        np.testing.assert_allclose(m["std"], np.std(m["values"], axis=1))
    # Every deep point is the test accuracy of a real run folder, trained for at least --min-steps.
    for i, f in enumerate(doc["fractions"]):
        for seed in doc["seeds"]:
            summary = json.loads((out / "learning-curve" / f"f{f:g}-s{seed}" / "summary.json").read_text())
            assert summary["test_accuracy"] == doc["models"]["seed-cnn"]["values"][i][seed]
            assert summary["steps"] >= 8
    # The tree's points are scikit-learn's, fitted on exactly the rows the deep model trained on.
    task = make_task(load_config("seed-cnn", overrides=[f"data.dir={fmnist_dir}", "data.train_fraction=0.25",
                                                         "data.split_seed=1", "train.seed=1"]))
    direct = fit_and_score("decision-tree", *task.arrays(), classification=True, seed=1)
    assert direct["test_accuracy"] == doc["models"]["decision-tree"]["values"][0][1]
    c = doc["crossover"]["decision-tree"]
    expected = crossover(doc["n_train"], doc["models"]["seed-cnn"]["mean"], doc["models"]["decision-tree"]["mean"])
    assert c["n_train"] == expected and "decision-tree" in c["text"] and c["text"] in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--fractions", "0,0.5"], "--fractions"),
    (["--baselines", "random-forest,boosted-unicorn"], "boosted-unicorn"),
    (["--seeds", "0"], "--seeds"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, fmnist_dir, capsys, extra, message):
    code = cli.main(["learning-curve", "seed-cnn", "--set", f"data.dir={fmnist_dir}", "--out", str(tmp_path / "lc"),
                     *extra])
    one_line_error(code, capsys.readouterr().err, message)
    assert not (tmp_path / "lc").exists()


def test_a_regression_recipe_and_an_existing_curve_are_refused(tmp_path, fmnist_dir, capsys):
    one_line_error(cli.main(["learning-curve", "mlp-regression"]), capsys.readouterr().err, "not a classification")
    out = tmp_path / "lc"
    out.mkdir()
    (out / "learning_curve.json").write_text("{}")
    code = cli.main(["learning-curve", "seed-cnn", "--set", f"data.dir={fmnist_dir}", "--out", str(out)])
    one_line_error(code, capsys.readouterr().err, "already holds a learning curve")
    assert (out / "learning_curve.json").read_text() == "{}"

"""nnlab detect-poison: spectral signatures and activation clustering find a backdoored run's
poisoned training images, agree with IBM's Adversarial Robustness Toolbox on the same penultimate
features, handle a clean run, and refuse bad input with one line and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_env, one_line_error, train_quietly
from torch import nn

from nnlab import runfolder
from nnlab.analysis.detect_poison import detect, detect_poison, penultimate_features
from nnlab.data import load_images
from nnlab.tasks import make_task

TARGET = 0
TINY = ["train.max_steps=60", "train.batch_size=32", "train.lr=0.02", "train.momentum=0.9",
        f"data.poison.target={TARGET}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist_dir, module_one_thread):
    """A tiny seed-cnn with a backdoor in 5% of its 320 training images (16 rows, a third of the
    target class; the model learns it: attack success 1.0), and the same run without poison."""
    base = tmp_path_factory.mktemp("detect-poison")
    return {rate: train_quietly("seed-cnn", [f"data.dir={fmnist_dir}", f"data.poison.rate={rate}", *TINY],
                                base / f"r{rate}") for rate in (0.05, 0.0)}


def _features(run):
    model, _ = runfolder.load(run)
    task = make_task(runfolder.read_config(run))
    poisoned = np.zeros(len(task.data.y_train), dtype=bool)
    poisoned[task.data.poisoned.numpy()] = True
    return model, task, penultimate_features(model, task.x_train), task.data.y_train.numpy(), poisoned


class HeadOverFeatures(nn.Module):
    """The model's final linear layer over its penultimate features, for ART. ART reads the output
    of the last registered child as the "last hidden layer", so `features` (an identity over the
    input) is registered after `head`: ART's activations are then exactly the features it is given."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head
        self.features = nn.Identity()

    def forward(self, h):
        return self.head(self.features(h))


def _art_classifier(model, dim: int):
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(HeadOverFeatures(model.fc2), loss=nn.CrossEntropyLoss(), input_shape=(dim,),
                             nb_classes=10)


def test_the_features_are_the_input_of_the_final_linear_layer(runs):
    model, task, features, _, _ = _features(runs[0.05])
    seen = []
    hook = model.fc2.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    with torch.no_grad():
        logits = model(task.x_train)
    hook.remove()
    torch.testing.assert_close(torch.from_numpy(features), seen[0])
    torch.testing.assert_close(_art_classifier(model, features.shape[1]).predict(features), logits.numpy(),
                               atol=1e-4, rtol=1e-4)  # ART's wrapped model is this model's head


@pytest.mark.parametrize("expected", [0.2, 1 / 3])
def test_spectral_flags_are_arts_flags(runs, expected):
    """Identical flags. ART projects the uncentred features on the top singular vector (the authors'
    released code); the paper and nnlab project centred ones, so ART is given each class's features
    minus that class's mean, which changes nothing else in its computation."""
    from art.defences.detector.poison import SpectralSignatureDefense

    model, _, features, labels, _ = _features(runs[0.05])
    centred = features.copy()
    for c in range(10):
        centred[labels == c] -= features[labels == c].mean(axis=0)
    art = SpectralSignatureDefense(_art_classifier(model, features.shape[1]), centred, labels,
                                   expected_pp_poison=expected, eps_multiplier=1.5)
    art_flags = np.asarray(art.detect_poison()[1]) == 0
    ours = detect(features, labels, 10, "spectral", expected)
    assert ours.sum() > 0 and np.array_equal(ours, art_flags)
    raw = SpectralSignatureDefense(_art_classifier(model, features.shape[1]), features, labels,
                                   expected_pp_poison=expected, eps_multiplier=1.5)
    raw_flags = np.asarray(raw.detect_poison()[1]) == 0
    for c in range(10):  # the same rule decides how many: the counts match class by class
        assert raw_flags[labels == c].sum() == ours[labels == c].sum()


def test_activation_clustering_agrees_with_art_on_the_target_class(runs):
    """The poisoned class splits into its two populations, found by both (Jaccard >= 0.9). In a
    clean class, two k-means clusters of one population are an arbitrary cut, and ART seeds its
    k-means randomly, so those classes are not compared."""
    from art.defences.detector.poison import ActivationDefence

    model, _, features, labels, poisoned = _features(runs[0.05])
    art = ActivationDefence(_art_classifier(model, features.shape[1]), features, labels)
    art_flags = np.asarray(art.detect_poison(nb_clusters=2, nb_dims=10, reduce="PCA",
                                             cluster_analysis="smaller")[1]) == 0
    ours = detect(features, labels, 10, "activation-clustering")
    target = labels == TARGET
    a, b = ours[target], art_flags[target]
    assert (a & b).sum() / (a | b).sum() >= 0.9
    assert (ours & poisoned).sum() >= 0.9 * poisoned.sum()


def test_the_cli_finds_the_backdoor_far_above_the_flag_rate(runs, cli_main):
    run = runs[0.05]
    rc, out, err = cli_main("detect-poison", run, "--expected", "0.2")
    assert rc == 0, err
    saved = json.loads((run / runfolder.DETECT_POISON).read_text())
    cfg = runfolder.read_config(run)
    data = load_images("fashion-mnist", cfg.data.dir, poison_rate=0.05, poison_target=TARGET)
    truth = set(data.poisoned.tolist())
    flagged = set(saved["flagged_rows"])
    target = saved["per_class"][TARGET]
    assert saved["poison"]["rows"] == target["poisoned"] == len(truth) == 16
    assert target["true_positives"] == len(flagged & truth)
    # Each class flags 1.5 x 0.2 = 30% of its rows; a detector flagging at random would recall ~30%.
    assert 0.25 < target["flagged"] / target["rows"] < 0.35
    assert target["recall"] >= 0.8 and target["precision"] >= 0.8, target
    assert saved["overall"]["recall"] == target["recall"] and saved["attack_success_rate"] > 0.9
    for row in saved["per_class"]:
        if row["class"] != TARGET:
            assert row["poisoned"] == 0 and row["recall"] is None and row["precision"] == 0.0
    assert "precision" in out and "T-shirt/top" in out and "detect_poison.json" in out

    default = detect_poison(run, method="spectral", out=run / "other.json")  # E defaults to the target's share
    assert default["expected"] == pytest.approx(16 / 48) and default["overall"]["recall"] >= 0.8


def test_a_clean_run_reports_its_flags_with_undefined_precision_and_recall(runs, cli_main):
    run = runs[0.0]
    rc, out, err = cli_main("detect-poison", run, "--method", "activation-clustering")
    assert rc == 0, err
    saved = json.loads((run / runfolder.DETECT_POISON).read_text())
    assert saved["poison"]["rows"] == 0 and saved["overall"]["flagged"] > 0
    assert saved["overall"]["precision"] is None and saved["overall"]["recall"] is None
    assert "not poisoned" in saved["note"] and "not poisoned" in out


def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, text_file, cli_main):
    run = runs[0.05]
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    for args, needle in [((tmp_path / "nope",), "no such run folder"),
                         ((run, "--method", "magic"), "unknown method"),
                         ((run, "--expected", "1.5"), "--expected"),
                         ((run, "--out", tmp_path), "is a folder"),
                         ((run, "--out", tmp_path / "no" / "such.json"), "no folder")]:
        one_line_error(*cli_main("detect-poison", *args)[::2], needle)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    text_run = tmp_path / "text"
    rc, _, _ = cli_main("train", "gpt-shakespeare", "--out", text_run, "--set", f"data.path={text_file}",
                        "--set", "model.preset=tiny", "--set", "model.block_size=16", "--set", "train.max_steps=2",
                        "--set", "train.eval_iters=1", "--set", "train.batch_size=4")
    assert rc == 0
    one_line_error(*cli_main("detect-poison", text_run)[::2], "image classifiers")
    assert not (text_run / runfolder.DETECT_POISON).exists()


def test_the_report_shows_the_backdoor_and_what_detection_found(runs):
    from nnlab.report import build_report

    run = runs[0.05]
    saved = detect_poison(run, expected=0.2)
    html = build_report(run).read_text()
    assert "Tampered training data: backdoor and its detection" in html and "attack success rate 100.0%" in html
    target = saved["per_class"][TARGET]
    assert f"{100 * target['recall']:.1f}%" in html and f"{100 * target['precision']:.1f}%" in html
    assert "16 training images were poisoned" in html


def test_the_backdoor_benchmark_writes_its_table(fmnist_dir, tmp_path):
    """benchmarks/backdoor.py end to end at tiny scale: every rate's row, both methods, the wall time."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "backdoor.json"
    cmd = [sys.executable, str(root / "benchmarks" / "backdoor.py"), "--rates", "0,0.05", "--out", str(tmp_path / "runs"),
           "--json", str(out), *[a for s in [f"data.dir={fmnist_dir}", *TINY[:4], "train.log_every=1000"]
                                 for a in ("--set", s)]]
    r = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(out.read_text())
    clean, poisoned = doc["rows"]
    assert (clean["rate"], clean["poisoned_rows"], poisoned["rate"], poisoned["poisoned_rows"]) == (0, 0, 0.05, 16)
    assert clean["attack_success_rate"] < 0.2 and poisoned["attack_success_rate"] > 0.9
    for method in ("spectral", "activation-clustering"):
        assert clean["detection"][method]["target_class"]["recall"] is None
        target = poisoned["detection"][method]["target_class"]
        assert target["recall"] > target["flagged"] / target["rows"] + 0.2, (method, target)
    assert doc["total_wall_s"] > 0 and "# total wall time" in r.stdout

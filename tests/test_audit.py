"""nnlab audit: the loss-threshold and LiRA membership-inference attacks, on a model that memorised
its training rows and on one that never saw them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line_error
from sklearn.datasets import make_classification

from nnlab import cli, runfolder
from nnlab.analysis.audit import lira_attack, loss_attack
from nnlab.analysis.lira import in_masks, logit_confidence
from nnlab.config import load_config
from nnlab.errors import ConfigError
from nnlab.tasks import make_task

# A dense net wide enough to memorise 500 rows whose labels are 20% noise: a gap between its
# training and test losses that the attack must see.
OVERFIT = ["data.name=csv", "data.target=label", "data.test_frac=0.5", "model.hidden=[256,256]",
           "train.epochs=80", "train.batch_size=50", "train.weight_decay=0", "train.log_every=100000", "train.eval_every=100000"]


def write_csv(path, seed: int):
    x, y = make_classification(n_samples=1000, n_features=20, n_informative=6, flip_y=0.2, random_state=seed)
    rows = [",".join([*(f"{v:.5f}" for v in r), str(c)]) for r, c in zip(x, y)]
    path.write_text(",".join([*(f"f{i}" for i in range(20)), "label"]) + "\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def overfit_runs(tmp_path_factory, module_one_thread):
    """Two runs of the same recipe on two independent draws of the same distribution."""
    base = tmp_path_factory.mktemp("audit")
    runs = []
    for seed in (0, 1):
        csv = write_csv(base / f"table{seed}.csv", seed)
        out = base / f"run{seed}"
        assert cli.main(["train", "mlp-tabular", "--out", str(out), "--set", f"data.path={csv}",
                         *[a for kv in OVERFIT for a in ("--set", kv)]]) == 0
        runs.append(out)
    return runs


def test_the_loss_attack_finds_a_memorised_training_set_and_writes_its_roc(overfit_runs, capsys):
    run = overfit_runs[0]
    capsys.readouterr()
    assert cli.main(["audit", str(run), "--shadows", "4"]) == 0
    out = capsys.readouterr().out
    saved = json.loads((run / runfolder.AUDIT).read_text())
    loss, lira, offline = (saved["attacks"][k] for k in ("loss", "lira", "lira_offline"))
    assert saved["members"] == saved["non_members"] == 500
    assert loss["member_mean_loss"] < 0.05 and loss["non_member_mean_loss"] > 1.0
    assert loss["auc"] > 0.65, loss["auc"]  # memorised: members' losses sit below most non-members'
    assert 0 <= loss["tpr_at_0.1%_fpr"] <= 1 and loss["fpr_resolution"] == 1 / 500
    assert loss["roc"]["fpr"][0] == 0 and loss["roc"]["tpr"][-1] == 1
    assert f"AUC {loss['auc']:.4f}" in out and f"AUC {lira['auc']:.4f}" in out
    # LiRA: each shadow trained on about half of the 1000-example pool, and it sees the memorised set too.
    assert lira["shadows"] == 4 and lira["pool"] == 1000 and 400 < lira["shadow_train_rows_mean"] < 600
    assert lira["auc"] > 0.65 and offline["auc"] > 0.6, (lira["auc"], offline["auc"])
    assert sum(line.startswith("shadow ") for line in out.splitlines()) == 4
    assert (run / runfolder.AUDIT_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from nnlab.report import build_report

    html = build_report(run).read_text()  # the report's privacy section shows the audit
    assert "Privacy: DP-SGD budget and membership inference" in html and f"{loss['auc']:.4g}" in html
    assert f"{lira['auc']:.4g}" in html and "LiRA: 4 shadow models of mlp-tabular" in html


def test_the_loss_attack_is_at_chance_on_examples_the_model_never_saw(overfit_runs):
    """Run 1's model against run 0's members: it saw none of them, so they look like test rows."""
    task = make_task(load_config("mlp-tabular", overrides=[f"data.path={overfit_runs[0].parent / 'table0.csv'}",
                                                           *OVERFIT]))
    stranger, _ = runfolder.load(overfit_runs[1])
    n = min(len(task.x_train), len(task.x_test))
    result = loss_attack(stranger, (task.x_train[:n], task.y_train[:n]), (task.x_test[:n], task.data.y_test[:n]))
    assert abs(result["auc"] - 0.5) < 0.07, result["auc"]
    own, _ = runfolder.load(overfit_runs[0])
    seen = loss_attack(own, (task.x_train[:n], task.y_train[:n]), (task.x_test[:n], task.data.y_test[:n]))
    assert seen["auc"] > result["auc"] + 0.1


def test_lira_is_at_chance_on_examples_the_target_never_saw(overfit_runs, module_one_thread):
    """Shadows from run 0's recipe and pool, but run 1's model as the target: nothing to find."""
    cfg = runfolder.read_config(overfit_runs[0])
    task = make_task(cfg)
    stranger, _ = runfolder.load(overfit_runs[1])
    n = min(len(task.x_train), len(task.x_test))
    result = lira_attack(overfit_runs[0], cfg, stranger, (task.x_train[:n], task.y_train[:n]),
                         (task.x_test[:n], task.data.y_test[:n]), len(task.x_train), 4, seed=0, say=lambda line: None)
    for attack in result.values():
        assert abs(attack["auc"] - 0.5) < 0.07, attack["auc"]


def test_logit_confidence_is_finite_where_the_naive_formula_overflows():
    model = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[40.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
    x, y = torch.tensor([[1.0, 0.0], [0.0, 0.5]]), torch.tensor([0, 1])
    phi = logit_confidence(model, x, y)
    p = torch.softmax(model(x).double(), 1)[1, 1].item()
    assert phi[0] == pytest.approx(40 - np.log(2))  # p_y rounds to 1 here: log(p / (1 - p)) would be inf
    assert phi[1] == pytest.approx(np.log(p / (1 - p)))


def test_every_example_is_in_half_of_the_shadows():
    masks = in_masks(pool=1000, shadows=6, seed=3)
    assert (masks.sum(0) == 3).all() and (abs(masks.sum(1) - 500) < 60).all()
    assert not (masks == in_masks(pool=1000, shadows=6, seed=4)).all()


def test_training_on_chosen_examples_trains_on_those_only(tmp_path, text_file, module_one_thread):
    from nnlab.train.loop import train

    csv = write_csv(tmp_path / "table.csv", 0)
    cfg = load_config("mlp-tabular", overrides=[f"data.path={csv}", *OVERFIT])
    task = make_task(cfg)
    x, y = task.x_train[:60], task.y_train[:60]
    run = train("mlp-tabular", [f"data.path={csv}", *OVERFIT, "train.epochs=2", "train.batch_size=20"],
                out=str(tmp_path / "run"), _examples=(x, y))
    assert runfolder.read_json(run / runfolder.SUMMARY)["steps"] == 6  # 2 epochs of 60 rows, not of 500
    text = make_task(load_config("gpt-shakespeare", overrides=[f"data.path={text_file}", "model.preset=tiny",
                                                               "model.block_size=16"]))
    with pytest.raises(ConfigError, match="text task cannot train on chosen examples"):
        text.train_on(x, y)


def test_audit_refuses_bad_input_with_one_line_and_writes_nothing(tmp_path, text_file, capsys, overfit_runs):
    assert cli.main(["audit", str(tmp_path / "nope")]) == 2
    one_line_error(2, capsys.readouterr().err, "no such run folder")
    half = tmp_path / "half"  # a run folder whose training never finished: config, no model
    half.mkdir()
    (half / runfolder.CONFIG).write_text((overfit_runs[0] / runfolder.CONFIG).read_text())
    assert cli.main(["audit", str(half)]) == 2
    one_line_error(2, capsys.readouterr().err, runfolder.MODEL_INFO)
    assert cli.main(["audit", str(overfit_runs[0]), "--samples", "0"]) == 2
    one_line_error(2, capsys.readouterr().err, "--samples")
    before = {f.name: f.read_bytes() for f in overfit_runs[0].iterdir() if f.is_file()}
    assert cli.main(["audit", str(overfit_runs[0]), "--attack", "shadow"]) == 2
    one_line_error(2, capsys.readouterr().err, "--attack", "shadow")
    assert cli.main(["audit", str(overfit_runs[0]), "--shadows", "1"]) == 2
    one_line_error(2, capsys.readouterr().err, "--shadows")
    assert {f.name: f.read_bytes() for f in overfit_runs[0].iterdir() if f.is_file()} == before
    text_run = tmp_path / "text"
    assert cli.main(["train", "gpt-shakespeare", "--out", str(text_run), "--set", f"data.path={text_file}",
                     "--set", "model.preset=tiny", "--set", "model.block_size=16", "--set", "train.max_steps=2",
                     "--set", "train.eval_iters=1", "--set", "train.batch_size=4"]) == 0
    capsys.readouterr()
    for attack in ("loss", "lira"):
        assert cli.main(["audit", str(text_run), "--attack", attack]) == 2
        one_line_error(2, capsys.readouterr().err, "classifiers")
    assert not (text_run / runfolder.AUDIT).exists() and not (half / runfolder.AUDIT).exists()


def test_the_privacy_benchmark_audits_a_normal_and_a_dp_model(tmp_path, fmnist_dir):
    """benchmarks/privacy_audit.py --quick on the tiny images: both models, both attacks, one JSON."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "privacy.json"
    cmd = [sys.executable, str(root / "benchmarks" / "privacy_audit.py"), "--quick", "--set", f"data.dir={fmnist_dir}",
           "--out", str(tmp_path / "runs"), "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    models = json.loads(out.read_text())["models"]
    assert list(models) == ["normal", "dp"]
    assert models["normal"]["epsilon_rdp"] is None and 2.5 < models["dp"]["epsilon_rdp"] <= 3.01
    for row in models.values():
        assert 0 <= row["test_accuracy"] <= 1 and row["members"] == 100
        assert set(row["attacks"]) == {"loss", "lira", "lira_offline"}
        assert all(0 <= a["auc"] <= 1 and 0 <= a["tpr_at_0.1%_fpr"] <= 1 for a in row["attacks"].values())
        assert row["attacks"]["lira"]["shadows"] == 2 and row["attacks"]["lira"]["pool"] == 200
    assert "dp " in r.stdout and "lira AUC" in r.stdout
    # The shadows of the DP model ran its private mechanism: the same epsilon as the target.
    audit_dp = json.loads((tmp_path / "runs" / "dp" / runfolder.AUDIT).read_text())
    assert audit_dp["attacks"]["lira"]["shadow_epsilon_rdp_mean"] == pytest.approx(models["dp"]["epsilon_rdp"], rel=0.05)

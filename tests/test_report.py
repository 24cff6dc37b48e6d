"""`nnlab report RUN_DIR`: the page for a classifier, a language model and a regression run, with and
without the files the analysis verbs write (contract-shaped files written here by hand: fixtures of
the file format), bad input, the calibration error against a hand computation, and the page in a
real headless Chromium with the network blocked.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import nnlab
from conftest import CLI_TIMEOUT, cli_env, one_line_error
from nnlab.report.evaluation import confident_mistakes, expected_calibration_error
from nnlab.runfolder import read_config
from nnlab.tasks import make_task

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT_SCRIPT = ROOT / "scripts" / "report_screenshot.py"
IMG = re.compile(r'<img src="([^"]*)"')
# seed-cnn's FLOPs for one 28x28 image, 2 per multiply-add: conv1 28*28*32*(1*9), conv2 14*14*64*(32*9),
# fc1 3136*128, fc2 128*10.
SEED_CNN_FLOPS = 2 * (28 * 28 * 32 * 9 + 14 * 14 * 64 * 32 * 9 + 3136 * 128 + 128 * 10)


def train(recipe: str, out: Path, sets: list[str]) -> Path:
    return nnlab.train(recipe, sets, out=str(out))


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory, fmnist_dir, module_one_thread) -> Path:
    """Three steps: the fixture's images are easy, and a longer run makes no mistake to show."""
    return train("seed-cnn", tmp_path_factory.mktemp("cnn") / "run",
                 [f"data.dir={fmnist_dir}", "train.max_steps=3", "train.batch_size=32", "train.lr=0.02",
                  "train.momentum=0.9", "train.log_every=1", "train.eval_every=1", "train.precision=fp32"])


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def report(cli_main, run: Path) -> tuple[str, str]:
    """Run `nnlab report RUN`; (the page, stderr). It prints the page's path and nothing else."""
    rc, out, err = cli_main("report", run)
    assert rc == 0, err
    assert out.strip() == str(run / "report.html")
    return (run / "report.html").read_text(encoding="utf-8"), err


def snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}


def assert_self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    for uri in IMG.findall(page):
        assert uri.startswith("data:image/png;base64,"), uri[:60]
        assert base64.b64decode(uri.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    assert "<script" not in page and "<link rel=\"stylesheet\"" not in page


def made(page: str) -> set[str]:
    """Ids of the sections the page has data for (the table of contents marks the others)."""
    return set(re.findall(r'<li><a href="#([\w-]+)">', page))


def not_made(page: str) -> set[str]:
    return set(re.findall(r'<li class=missing><a href="#([\w-]+)">', page))


def png(path: Path, color: str) -> bytes:
    fig = Figure(figsize=(2, 1), dpi=40)
    fig.subplots().bar([0, 1], [1, 2], color=color)
    fig.savefig(path)
    return path.read_bytes()


# ---- contract-shaped files of the other verbs (contracts21.md) ------------------------------------

def write_baselines(run: Path) -> None:
    row = lambda model, acc, deep=False: {"model": model, "estimator": f"{model}()", "deep": deep, "n_fit": 320,
                                          "test_accuracy": acc, "fit_s": 0.5, "predict_s": 0.01, "latency_ms": 0.2,
                                          "note": None}
    doc = {"data": "fashion-mnist", "task": "classification", "metric": "test_accuracy", "n_train": 320,
           "n_test": 100, "n_features": 784, "machine": {"processor": "Test CPU", "threads": 1},
           "written": "2026-12-02T20:00:00+0000",
           "rows": [row("logistic-regression", 0.61), row("nnlab seed-cnn", 0.97, deep=True),
                    row("random-forest", 0.83)]}
    (run / "baselines.json").write_text(json.dumps(doc))


def write_learning_curve(run: Path) -> bytes:
    doc = {"recipe": "seed-cnn", "data": "fashion-mnist", "metric": "test_accuracy", "fractions": [0.1, 0.3, 1.0],
           "n_train": [32, 96, 320], "seeds": [0, 1], "deep": "seed-cnn",
           "models": {"seed-cnn": {"deep": True, "mean": [0.2, 0.6, 0.95], "std": [0.05, 0.04, 0.01],
                                   "values": [[0.15, 0.25], [0.56, 0.64], [0.94, 0.96]]},
                      "random-forest": {"deep": False, "mean": [0.4, 0.55, 0.8], "std": [0.03, 0.02, 0.01],
                                        "values": [[0.37, 0.43], [0.53, 0.57], [0.79, 0.81]]}},
           "crossover": {"random-forest": {"n_train": 96,
                                           "text": "seed-cnn overtakes random-forest from 96 training examples"}},
           "machine": {}, "written": "2026-12-02T20:00:00+0000"}
    (run / "learning_curve.json").write_text(json.dumps(doc))
    return png(run / "learning_curve.png", "green")


def write_explanation(run: Path, method: str, passed: bool, ext: str = ".png", **extra) -> bytes:
    (run / "explain").mkdir(exist_ok=True)
    doc = {"method": method, "model": "seed-cnn", "samples": 2, "indices": [4, 7], "predicted": ["Coat", "Bag"],
           "true": ["Coat", "Shirt"], "files": [f"explain/{method}{ext}"], "written": "2026-12-02T20:00:00+0000",
           **extra}
    if passed is not None:
        doc["sanity"] = {"test": "model randomization", "score": 0.12 if passed else 0.91, "threshold": 0.5,
                         "passed": passed}
    (run / "explain" / f"{method}.json").write_text(json.dumps(doc))
    if ext == ".png":
        return png(run / "explain" / f"{method}.png", "red")
    return b""


# ---- a classifier --------------------------------------------------------------------------------

def test_report_of_a_classifier_says_which_command_makes_each_missing_part(cnn_run, cli_main, tmp_path):
    run = copy_run(cnn_run, tmp_path / "run")
    before = snapshot(run)
    page, err = report(cli_main, run)
    assert_self_contained(page)
    assert snapshot(run) == {**before, "report.html": snapshot(run)["report.html"]}  # nothing else touched
    assert made(page) == {"config", "curves", "evaluation", "mistakes", "calibration", "efficiency"}
    assert not_made(page) == {"baselines", "learning-curve", "explanations"}
    assert f"produced by <code>nnlab baselines --run {run}</code>" in page
    assert f"produced by <code>nnlab learning-curve seed-cnn --out {run}</code>" in page
    assert f"produced by <code>nnlab explain {run}</code>" in page
    assert "nnlab: warning" not in err

    summary = json.loads((run / "summary.json").read_text())
    assert f"Accuracy on the 100 test examples: {summary['test_accuracy']:.4f}" in page  # the model really re-evaluated
    assert f"{SEED_CNN_FLOPS:,} per sample" in page  # the explicit count: the kernels' convolutions are in it
    assert "Reference: recipe <code>seed-cnn</code>" in page and "<td>train.max_steps</td><td>3</td>" in page
    assert len(IMG.findall(page)) == 4  # curves, confusion matrix, mistakes, reliability diagram
    # The calibration error of the model's own test predictions.
    model, _ = nnlab.load(run)
    task = make_task(read_config(run))
    with torch.no_grad():
        probs = torch.softmax(model(task.x_test), 1)
    conf, pred = probs.max(1)
    ece = expected_calibration_error(conf.numpy(), (pred == task.data.y_test).numpy())
    assert f"Expected calibration error (ECE, 15 equal-width confidence bins): {ece:.4f}." in page
    counts = [int(c.replace(",", "")) for c in re.findall(r'<tr><td>\([\d.]+, [\d.]+\]</td><td class="num">([\d,]+)', page)]
    assert sum(counts) == 100  # every test prediction falls in one calibration bin


@pytest.fixture(scope="module")
def full_run(cnn_run, tmp_path_factory) -> tuple[Path, dict]:
    """The tiny classifier run plus every analysis file, as the other verbs write them."""
    run = copy_run(cnn_run, tmp_path_factory.mktemp("full") / "run")
    write_baselines(run)
    pngs = {"learning_curve": write_learning_curve(run),
            "ig": write_explanation(run, "integrated-gradients", True, convergence_delta=[0.002, -0.031]),
            "saliency": write_explanation(run, "saliency", False)}
    return run, pngs


def test_report_shows_the_analysis_files_with_their_figures(full_run, cli_main):
    run, pngs = full_run
    page, err = report(cli_main, run)
    assert_self_contained(page)
    assert not_made(page) == set() and {"baselines", "learning-curve", "explanations"} <= made(page)
    assert "produced by" not in page
    for name, data in pngs.items():  # each file's PNG is in the page, byte for byte
        assert base64.b64encode(data).decode() in page, name

    baselines = page[page.index('id="baselines"'):page.index('id="learning-curve"')]
    order = [m for m in re.findall(r"<tr[^>]*><td>([\w -]+)</td>", baselines)]
    assert order == ["nnlab seed-cnn", "random-forest", "logistic-regression"]  # best first
    assert '<tr class="deep"><td>nnlab seed-cnn</td>' in baselines

    assert "seed-cnn overtakes random-forest from 96 training examples" in page
    assert "0.9500 ± 0.0100" in page  # the deep model's mean and std at n=320

    assert re.search(r'class="fail">FAILED sanity check \(model randomization\): score 0\.91', page)
    assert "saliency: failed its sanity check" in err  # also printed
    assert re.search(r'class="ok">Passed sanity check \(model randomization\): score 0\.12', page)
    assert "max |delta| 0.031, mean |delta| 0.0165 over 2 samples" in page


def test_corrupt_analysis_files_are_warnings_and_the_rest_is_written(cnn_run, cli_main, tmp_path):
    """A corrupt baselines.json and a malformed explanation: a warning in their section and on stderr
    naming the file, exit 0, the page written from the rest, and the bad files left as they were."""
    run = copy_run(cnn_run, tmp_path / "run")
    (run / "baselines.json").write_text('{"metric": "test_accuracy", "rows": [')
    write_explanation(run, "integrated-gradients", True, convergence_delta=[0.01])
    (run / "explain" / "grad-cam.json").write_text('["not", "an", "object"]')
    (run / "learning_curve.json").write_text('{"n_train": [1, 2], "models": {}}')  # valid, but its png is missing
    before = snapshot(run)
    page, err = report(cli_main, run)
    assert snapshot(run) == {**before, "report.html": snapshot(run)["report.html"]}
    warnings = [line for line in err.splitlines() if line.startswith("nnlab: warning: ")]
    assert len(warnings) == 3, err
    assert any(f"{run / 'baselines.json'}: not valid JSON" in w for w in warnings)
    assert any(f"{run / 'explain' / 'grad-cam.json'}: not in its format" in w for w in warnings)
    assert any("learning_curve.png: missing" in w for w in warnings)
    baselines = page[page.index('id="baselines"'):page.index('id="learning-curve"')]
    assert 'class="warning">Warning: ' in baselines and "baselines.json: not valid JSON" in baselines
    assert "integrated-gradients" in page and "max |delta| 0.01" in page  # the good explanation is shown
    assert {"evaluation", "calibration", "explanations"} <= made(page)


def test_a_refused_model_file_and_a_torn_metrics_line_leave_the_rest_of_the_page(cnn_run, cli_main, tmp_path):
    """A pickle offered as the weights is never loaded: the evaluation says why; a half-written last
    line of metrics.jsonl is skipped with a warning and the curves come from the whole lines."""
    run = copy_run(cnn_run, tmp_path / "run")
    (run / "model.safetensors").write_bytes(b"\x80\x04\x95pickled")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "st')
    before = snapshot(run)
    page, err = report(cli_main, run)
    assert snapshot(run) == {**before, "report.html": snapshot(run)["report.html"]}
    assert "evaluation" in not_made(page) and "curves" in made(page)
    assert "model.safetensors: refused: a pickle" in err and "metrics.jsonl: 1 unreadable line(s) skipped" in err
    assert "FLOPs per forward pass" not in page and "training throughput" in page


# ---- bad input -----------------------------------------------------------------------------------

def test_a_folder_that_is_not_a_finished_run_is_refused(cnn_run, cli_main, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(cnn_run / "config.yaml", unfinished / "config.yaml")  # training started, never finished
    for folder, needle in [(tmp_path / "missing", "no such folder"), (tmp_path / "a-file", "not a folder"),
                           (tmp_path / "empty", "no config.yaml"), (unfinished, "no model.json")]:
        rc, out, err = cli_main("report", folder)
        one_line_error(rc, err, str(folder), needle)
        assert out == ""
    assert not (tmp_path / "empty" / "report.html").exists() and not (unfinished / "report.html").exists()
    assert sorted(p.name for p in unfinished.iterdir()) == ["config.yaml"]


# ---- a language model and a regression -----------------------------------------------------------

def test_report_of_a_language_model(tmp_path, text_file, cli_main, module_one_thread):
    run = train("gpt-shakespeare", tmp_path / "gpt",
                [f"data.path={text_file}", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
                 "model.block_size=32", "train.max_steps=20", "train.eval_iters=2", "train.log_every=5",
                 "train.eval_every=10", "train.warmup_steps=0", "train.lr=0.01"])
    write_explanation(run, "attention", None, ext=".html")
    (run / "explain" / "attention.html").write_text("<html><body><table><tr><td>First</td></tr></table></body></html>")
    write_explanation(run, "rollout", None, ext=".html")
    (run / "explain" / "rollout.html").write_text('<img src="https://example.org/x.png">')
    page, err = report(cli_main, run)
    assert made(page) == {"config", "curves", "sample", "explanations", "efficiency"}  # no baselines for text
    assert "val_loss" in page
    sample = re.search(r"<pre><strong>([^<]+)</strong>([^<]*)</pre>", page)
    lines = text_file.read_text(encoding="utf-8").splitlines()
    assert sample and any(line.startswith(sample[1]) for line in lines) and len(sample[2]) > 100  # a whole line
    assert 'sandbox title="attention: explain/attention.html" srcdoc="&lt;html&gt;&lt;body&gt;&lt;table&gt;' in page
    assert "rollout.html: loads from the network; not embedded" in err and "example.org" not in page
    t = 32
    assert re.search(rf"FLOPs per forward pass</td><td>[\d,]+ per block of {t} tokens", page)
    assert_self_contained(page)


def test_report_of_a_regression(tmp_path, cli_main, module_one_thread):
    run = train("mlp-regression", tmp_path / "mlp", ["train.max_steps=20", "train.log_every=5", "train.eval_every=10"])
    page, _ = report(cli_main, run)
    assert made(page) == {"config", "curves", "regression", "efficiency"}
    assert not_made(page) == {"baselines", "learning-curve", "explanations"}
    logged = json.loads((run / "summary.json").read_text())["test_mse"]
    text = html.unescape(page)
    assert re.search(rf"Test MSE on the \d+ test rows: {logged:,.4g} in the target's units", text)
    assert f"the run's final evaluation logged {logged:,.4g}." in text
    # 10 features -> 32 hidden -> 1 output: 2 * (10 * 32 + 32 * 1) FLOPs.
    assert f"{2 * (10 * 32 + 32):,} per sample" in page
    assert len(IMG.findall(page)) == 2  # curves, predicted against true
    assert_self_contained(page)


# ---- calibration -------------------------------------------------------------------------------

def test_expected_calibration_error_against_a_hand_computation():
    """15 bins (k/15, (k+1)/15]. 0.95 and 0.97 fall in bin 14 (0.933, 1]: accuracy 1/2, mean confidence
    0.96; 0.55 and 0.58 in bin 8 (0.533, 0.6]: accuracy 1, confidence 0.565; 0.3 in bin 4 (0.267, 0.333]:
    accuracy 0, confidence 0.3. ECE = 2/5 |0.5 - 0.96| + 2/5 |1 - 0.565| + 1/5 |0 - 0.3| = 0.418."""
    conf = np.array([0.95, 0.97, 0.55, 0.58, 0.3])
    correct = np.array([1, 0, 1, 1, 0])
    assert expected_calibration_error(conf, correct) == pytest.approx(0.4 * 0.46 + 0.4 * 0.435 + 0.2 * 0.3)
    # Binning matters: with one bin the errors cancel, |3/5 - 0.67| = 0.07.
    assert expected_calibration_error(conf, correct, n_bins=1) == pytest.approx(0.07)
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([1, 1])) == 0.0
    assert expected_calibration_error(np.full(10, 0.7), np.arange(10) < 7) == pytest.approx(0.0)


def test_confident_mistakes_are_the_wrong_predictions_most_confident_first():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.05, 0.95], [0.3, 0.7]])
    y = np.array([1, 1, 1, 0, 0])
    assert confident_mistakes(probs, y, 10).tolist() == [3, 0, 4, 2]
    assert confident_mistakes(probs, y, 2).tolist() == [3, 0]


# ---- the page in a browser ---------------------------------------------------------------------

def browser_or_skip() -> None:
    """Debian's chromium and Playwright's Python package, or a skip; under CI=true, a failure."""
    missing = None
    if shutil.which("chromium") is None:
        missing = "no `chromium` on PATH (Debian: apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "Playwright's Python package is not installed (pip install '.[test]')"
    if missing and os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the browser test: {missing}")
    if missing:
        pytest.skip(missing)


def screenshot(html: Path, out: Path) -> tuple[int, dict]:
    r = subprocess.run([sys.executable, str(SCREENSHOT_SCRIPT), str(html), "--out", str(out)], capture_output=True,
                       text=True, timeout=CLI_TIMEOUT, env=cli_env())
    assert r.returncode in (0, 1), r.stderr[-3000:]
    return r.returncode, json.loads(r.stdout)


def test_the_report_in_headless_chromium(full_run, cli_main, tmp_path):
    """Every image loads, the console stays clean and no request leaves the page; the screenshot is
    kept beside the report (and copied to $NNLAB_REPORT_SCREENSHOT when set)."""
    browser_or_skip()
    run, _ = full_run
    if not (run / "report.html").exists():
        report(cli_main, run)
    shot = run / "report.png"
    rc, found = screenshot(run / "report.html", shot)
    print(f"report screenshot: {shot}")
    if os.environ.get("NNLAB_REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["NNLAB_REPORT_SCREENSHOT"])
    assert rc == 0, found
    assert found["network_requests"] == [] and found["console_errors"] == [] and found["page_errors"] == []
    assert found["images"] == 7 and found["broken_images"] == []
    assert found["sections"] == ["config", "curves", "evaluation", "mistakes", "calibration", "baselines",
                                 "learning-curve", "explanations", "efficiency"]
    assert shot.read_bytes().startswith(b"\x89PNG") and found["height"] > 3000

    # The checks can fail: a page that loads from the network and has a broken image is caught.
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="https://example.org/a.png"><img src="data:image/png;base64,AAAA">'
                   "</body></html>")
    rc, found = screenshot(bad, tmp_path / "bad.png")
    assert rc == 1 and found["network_requests"] == ["https://example.org/a.png"]
    assert len(found["broken_images"]) == 2 and found["console_errors"]


def test_without_chromium_the_browser_test_skips_except_under_ci(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the browser test: no `chromium`"):
        browser_or_skip()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="no `chromium` on PATH"):
        browser_or_skip()

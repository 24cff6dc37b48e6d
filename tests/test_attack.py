"""`nnlab attack`: the attacks' defining properties (the eps ball, eps 0, PGD no weaker than FGSM),
agreement with IBM's Adversarial Robustness Toolbox, the kernels changing no result, a guard that
fails on a model with masked gradients, the files written and the one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import nnlab
from nnlab.analysis import attack as at
from nnlab.kernels import build
from conftest import train_quietly

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def seed_run(tmp_path_factory, fmnist_dir) -> Path:
    sets = [f"data.dir={fmnist_dir}", "train.max_steps=60", "train.batch_size=32", "train.lr=0.02",
            "train.momentum=0.9", "train.precision=fp32"]
    return train_quietly("seed-cnn", sets, tmp_path_factory.mktemp("attack") / "seed")


@pytest.fixture(scope="module")
def case(seed_run):
    """(pixel model, model, test pixels, labels) of the trained fixture run: 100 test images."""
    model, info = nnlab.runfolder.load(seed_run)
    x, y, _, _ = at.test_pixels(seed_run, 100)
    return at.pixel_model(model, info), model, x, y, info


EPS = (0.1, 0.2, 0.3)  # the fixture's classes are bright blocks: small eps leave it at 100%


@pytest.mark.parametrize("method", at.METHODS)
def test_perturbation_stays_in_the_ball_and_in_pixels(case, method):
    fn, _, x, y, _ = case
    for eps in EPS[::2]:
        x_adv = at.perturb(fn, x, y, method, eps, steps=5, restarts=2)
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (x_adv != x).any()  # it did move


def test_pgd_is_at_least_as_strong_as_fgsm_and_eps_0_changes_nothing(case):
    fn, _, x, y, _ = case
    for method in at.METHODS:
        assert torch.equal(at.perturb(fn, x, y, method, 0.0, steps=5, restarts=2), x)
    fgsm = [at.accuracy(fn, at.perturb(fn, x, y, "fgsm", e, 1, 1), y) for e in EPS]
    pgd = [at.accuracy(fn, at.perturb(fn, x, y, "pgd", e, 10, 1), y) for e in EPS]
    assert all(p <= f for p, f in zip(pgd, fgsm)), (pgd, fgsm)
    assert pgd[-1] < at.accuracy(fn, x, y)  # the attack does something at all


def test_the_model_is_in_eval_mode_during_the_attack_and_its_mode_restored(case):
    fn, model, x, y, _ = case
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    model.train()
    try:
        with at.evaluating(model):
            at.perturb(fn, x[:4], y[:4], "pgd", 0.1, 2, 1)
        assert model.training and all(m.training for m in model.modules())
    finally:
        hook.remove()
        model.eval()
    assert seen and not any(seen)


# Tolerance. A step is sign(dL/dx): where a saturated softmax leaves the gradient at float32's
# underflow (|dL/dx| ~ 1e-38), float rounding in two implementations decides the sign, so those
# images are left out of the pixel comparison; on every other image 99.9% of the pixels agree to
# 1e-5. Accuracies agree within 2 images in 100.
ART_PIXELS, ART_ACCURACY, UNDERFLOW = 0.999, 0.02, 1e-30


def test_fgsm_and_pgd_agree_with_the_adversarial_robustness_toolbox(case):
    pytest.importorskip("art")
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    fn, model, x, y, info = case
    norm = info["normalize"]
    clf = PyTorchClassifier(model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=10,
                            clip_values=(0.0, 1.0), preprocessing=(norm["mean"], norm["std"]), device_type="cpu")
    eps, steps = 0.2, 10
    step_size = at.STEP_FACTOR * eps / steps
    ours = {"fgsm": at.fgsm(fn, x, y, eps),
            "pgd": at.pgd(fn, x, y, eps, steps, step_size=step_size, random_init=False)}
    art = {"fgsm": FastGradientMethod(clf, norm=np.inf, eps=eps, num_random_init=0, minimal=False, batch_size=100),
           "pgd": ProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=step_size, max_iter=steps,
                                           num_random_init=0, targeted=False, batch_size=100, verbose=False)}
    live = at.loss_gradient(fn, x, y).flatten(1).abs().amax(1) > UNDERFLOW
    assert live.sum() >= 50
    for method, attack in art.items():
        theirs = torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))
        same = float(((ours[method] - theirs)[live].abs() < 1e-5).float().mean())
        assert same >= ART_PIXELS, (method, same)
        acc_ours, acc_theirs = at.accuracy(fn, ours[method], y), at.accuracy(fn, theirs, y)
        assert abs(acc_ours - acc_theirs) <= ART_ACCURACY, (method, acc_ours, acc_theirs)
        assert acc_ours < 1.0  # a nontrivial comparison


def test_the_kernels_change_no_attack_result(case, no_kernels):
    """The gradient passes decline conv1_pool2x2, the prediction passes take it: the accuracies under
    attack are the same as on torch's functional path alone."""
    if not build.status()["ops"]["conv1_pool2x2"]:
        pytest.skip("the conv kernels do not run on this CPU")
    fn, _, x, y, _ = case

    def run():
        return [at.accuracy(fn, at.perturb(fn, x, y, m, e, 5, 1), y) for m in at.METHODS for e in EPS[1:]]

    build._used.discard("conv1_pool2x2")  # ran in training; it must run again here
    with_kernels = run()
    assert "conv1_pool2x2" in build.used(), "the kernel never ran: the comparison would be vacuous"
    no_kernels()
    assert run() == with_kernels


def test_the_guard_flags_masked_gradients(case, seed_run):
    """A model behind a rounding of its input (zero gradient almost everywhere) looks robust to
    white-box PGD; the guard must say so."""
    fn, _, x, y, info = case
    masked = torch.nn.Sequential(at.PixelModel(torch.nn.Identity(), 0.0, 1.0))
    masked.forward = lambda v: fn(torch.round(v * 4) / 4)
    _, _, x_train, y_train = at.test_pixels(seed_run, 1)
    norm = info["normalize"]
    surrogate = at.train_surrogate(x_train, y_train, 10, norm["mean"], norm["std"])
    g = at.guard(masked, x[:50], y[:50], 0.3, 5, 1, 10, surrogate)
    failed = {c["check"] for c in g["checks"] if not c["passed"]}
    assert not g["passed"] and "eps 0.5" in failed, g
    honest = at.guard(fn, x[:50], y[:50], 0.3, 5, 1, 10, surrogate)
    assert honest["passed"], honest


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_attack_writes_its_files_and_nothing_else(seed_run, tmp_path, cli_main):
    run = tmp_path / "run"
    shutil.copytree(seed_run, run)
    before = _snapshot(run)
    rc, out, err = cli_main("attack", run, "--method", "pgd", "--eps", "0,1/10,0.3", "--steps", "5", "--samples", "40")
    assert rc == 0, err
    after = _snapshot(run)
    assert {k: v for k, v in after.items() if not k.startswith("attack/")} == before
    result = json.loads((run / "attack" / "pgd.json").read_text())
    assert result["files"] == ["attack/pgd-examples.png", "attack/pgd.png"]
    assert all(after[f].startswith(b"\x89PNG") for f in result["files"])
    assert result["eps"] == [0.0, 0.1, 0.3] and result["samples"] == 40 and result["steps"] == 5
    assert result["accuracy"][0] == result["clean_accuracy"]  # eps 0 changes nothing
    assert result["accuracy"][2] <= result["accuracy"][1] <= result["accuracy"][0]
    assert {c["check"] for c in result["guard"]["checks"]} == {"steps", "restarts", "eps 0.5", "transfer"}
    assert "gradient-masking guard" in out and "PGD-5" in out
    rc, _, err = cli_main("report", run)  # the report shows the result, figures embedded
    page = (run / "report.html").read_text()
    assert rc == 0 and 'id="attack"' in page and "Gradient-masking guard" in page and "attack/pgd.png" in page, err


@pytest.fixture(scope="module")
def table_run(tmp_path_factory) -> Path:
    return train_quietly("mlp-tabular", ["train.epochs=2"], tmp_path_factory.mktemp("attack") / "table")


BAD = {
    "no model": ([], "no model.json"),
    "a table model": ([], "takes image classifiers"),
    "eps below 0": (["--eps=-1/255"], "--eps"),
    "eps not a number": (["--eps", "8/x"], "--eps"),
    "unknown method": (["--method", "cw"], "unknown method"),
    "no samples": (["--samples", "0"], "--samples"),
    "more samples than the test split": (["--samples", "101"], "--samples"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_a_one_line_error_and_loses_nothing(name, seed_run, table_run, tmp_path, cli_main):
    from conftest import one_line_error

    args, needle = BAD[name]
    run = tmp_path / "run"
    shutil.copytree(table_run if name == "a table model" else seed_run, run, ignore=shutil.ignore_patterns("attack"))
    if name == "no model":
        (run / "model.json").unlink()
    (run / "attack").mkdir()
    (run / "attack" / "pgd.json").write_text("{}")  # an earlier result to keep
    before = _snapshot(run)
    rc, _, err = cli_main("attack", run, *args)
    one_line_error(rc, err, needle)
    assert _snapshot(run) == before


# ---- adversarial training (train.adversarial=pgd) ---------------------------------------------------

def test_training_batches_are_adversarial(seed_run, fmnist_dir):
    """adversarial_batch moves each image at most eps in pixels, stays in [0, 1], raises the loss,
    and leaves the model in training mode."""
    from nnlab.config import load_config
    from nnlab.tasks import make_task
    from nnlab.train.adversarial import adversarial_batch

    model, _ = nnlab.runfolder.load(seed_run)
    cfg = load_config("seed-cnn", None, [f"data.dir={fmnist_dir}", "train.adversarial=pgd",
                                         "train.adversarial_eps=0.2", "train.adversarial_steps=5"])
    task = make_task(cfg)
    x, y = task.batch(0, 0, 64)
    model.train()
    x_adv = adversarial_batch(model, x, y, task, 0, 0)
    assert model.training
    mean, std = task.data.mean, task.data.std
    pixels, adv_pixels = x * std + mean, x_adv * std + mean
    assert (adv_pixels - pixels).abs().max() <= 0.2 + 1e-5
    assert adv_pixels.min() >= -1e-6 and adv_pixels.max() <= 1 + 1e-6
    model.eval()
    with torch.no_grad():
        assert task.loss(model(x_adv), y) > task.loss(model(x), y) + 0.1
    assert torch.equal(adversarial_batch(model, x, y, task, 0, 0), x_adv)  # a pure function of (seed, step, row)


def test_adversarial_training_gives_a_more_robust_model(fmnist_dir, tmp_path):
    """The same tiny run with and without train.adversarial=pgd: the loop trains on the adversarial
    batch (its logged loss is higher) and the result resists PGD at the training eps better."""
    sets = [f"data.dir={fmnist_dir}", "train.max_steps=40", "train.batch_size=32", "train.lr=0.02",
            "train.momentum=0.9", "train.precision=fp32", "train.log_every=1", "train.eval_every=1000"]
    plain = nnlab.train("seed-cnn", sets, out=str(tmp_path / "plain"))
    robust = nnlab.train("seed-cnn", [*sets, "train.adversarial=pgd", "train.adversarial_eps=0.2",
                                      "train.adversarial_steps=2"], out=str(tmp_path / "robust"))
    first = [json.loads((r / "metrics.jsonl").read_text().splitlines()[0]) for r in (plain, robust)]
    assert first[0]["step"] == first[1]["step"] == 1 and first[1]["loss"] > first[0]["loss"], first
    acc = {}
    for name, run in (("plain", plain), ("robust", robust)):
        model, info = nnlab.runfolder.load(run)
        x, y, _, _ = at.test_pixels(run, 100)
        fn = at.pixel_model(model, info)
        acc[name] = at.accuracy(fn, at.perturb(fn, x, y, "pgd", 0.2, 5, 1), y)
    assert acc["robust"] > acc["plain"] + 0.1, acc


@pytest.mark.parametrize("sets, needle", [(["data.name=wine"], "takes image data"),
                                          (["train.adversarial_eps=2"], "above 1")])
def test_adversarial_training_refuses_what_it_cannot_do(sets, needle, cli_main):
    from conftest import one_line_error

    rc, _, err = cli_main("train", "mlp-tabular" if "wine" in sets[0] else "cnn", "--set", "train.adversarial=pgd",
                          *[a for s in sets for a in ("--set", s)])
    one_line_error(rc, err, "train.adversarial", needle)

"""DP-SGD (train.privacy.*): per-example gradients, clipping, noise, Poisson batches, the
accountants, and the settings it refuses."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import one_line_error

from nnlab import cli, runfolder
from nnlab.config import load_config
from nnlab.models import build_model
from nnlab.tasks import make_task
from nnlab.train import privacy
from nnlab.train.optim import make_optimizer

pytest.importorskip("opacus")


@pytest.mark.parametrize("name,fields", [("seed-cnn", {}), ("cnn", {"norm": "group", "width": 8, "dropout": 0.0}),
                                         ("mlp", {"in_features": 784, "out_features": 10, "hidden": (32,)})])
def test_per_example_gradients_are_each_examples_own_gradient(name, fields, one_thread):
    """Opacus's hooks with nnlab's samplers (ConvPoolReLU, Conv2d, Dense) against one backward per
    example: the kernels may run the forward, the samplers must still be exact."""
    from opacus.grad_sample import GradSampleHooks

    torch.manual_seed(0)
    model, reference = build_model(name, **fields), build_model(name, **fields)
    reference.load_state_dict(model.state_dict())
    privacy.check_model(model)
    GradSampleHooks(model, batch_first=True, loss_reduction="mean")
    x, y = torch.randn(5, 1, 28, 28), torch.randint(0, 10, (5,))
    F.cross_entropy(model(x), y).backward()
    for i in range(5):
        reference.zero_grad()
        F.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]).backward()
        for (n, p), r in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad_sample[i], r.grad, rtol=1e-4, atol=1e-6, msg=n)


def private_run(fmnist_dir, *overrides, steps=10):
    cfg = load_config("seed-cnn", overrides=[f"data.dir={fmnist_dir}", "train.batch_size=32", "train.lr=1.0",
                                             "train.privacy.epsilon=2", *overrides])
    task = make_task(cfg)
    cfg.model = dataclasses.replace(cfg.model, **task.model_fields())
    torch.manual_seed(0)
    model = build_model(cfg.model)
    return model, privacy.PrivateTraining(model, make_optimizer(model, cfg.train), task, cfg.train, steps)


def one_step(model, private, step=0) -> tuple[float, int]:
    """(norm of the parameters' change, batch size) for DP-SGD step `step`."""
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    x, y = private.task.batch(step)
    loss = private.task.loss(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    private.optimizer.step()
    private.optimizer.zero_grad(set_to_none=True)
    return float((torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm()), len(y)


def test_clipping_bounds_each_examples_share_and_noise_has_the_stated_scale(fmnist_dir, one_thread):
    """lr 1, no noise: the update is the mean of clipped gradients, at most C * n / B in norm. With
    noise it is dominated by N(0, sigma^2 C^2 I) / B over d parameters: norm ~ sigma C sqrt(d) / B."""
    C, B = 1e-3, 32
    model, private = private_run(fmnist_dir, f"train.privacy.max_grad_norm={C}", "train.privacy.noise=false")
    clipped, n = one_step(model, private)
    assert private.noise_multiplier == 0 and n > 0
    # Each clipped gradient has norm C exactly (all are far longer); they point apart, so the mean is shorter.
    assert 0.1 * C * n / B < clipped <= C * n / B * (1 + 1e-4)

    plain = build_model(model.cfg)
    x, y = private.task.batch(0)
    F.cross_entropy(plain(x), y).backward()
    assert torch.cat([p.grad.flatten() for p in plain.parameters()]).norm() > 100 * C  # so clipping did act

    model, private = private_run(fmnist_dir, f"train.privacy.max_grad_norm={C}")
    noised, _ = one_step(model, private)
    d = sum(p.numel() for p in model.parameters())
    expected = private.noise_multiplier * C * d**0.5 / B
    assert private.noise_multiplier > 0.3 and abs(noised - expected) < 0.05 * expected


def test_poisson_batches_vary_are_a_function_of_the_step_and_may_be_empty(fmnist_dir, one_thread):
    model, private = private_run(fmnist_dir, "train.batch_size=1")  # q = 1/320: about e^-1 of batches are empty
    sizes = [len(private.task.batch(s)[1]) for s in range(300)]
    assert 0 in sizes and max(sizes) >= 2 and 0.7 < sum(sizes) / 300 < 1.3
    assert torch.equal(private.task.batch(7)[0], private.task.batch(7)[0])
    empty = sizes.index(0)
    change, n = one_step(model, private, empty)  # no examples: the step adds noise alone
    assert n == 0 and change > 0


def test_a_dp_run_records_both_accountants_and_loads_as_a_plain_model(fmnist_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "dp"
    assert cli.main(["train", "seed-cnn", "--out", str(out), "--set", f"data.dir={fmnist_dir}",
                     "--set", "train.batch_size=32", "--set", "train.epochs=1", "--set", "train.lr=0.5",
                     "--set", "train.privacy.epsilon=2", "--set", "train.eval_every=1000"]) == 0
    summary = json.loads((out / runfolder.SUMMARY).read_text())
    p = summary["privacy"]
    assert p["sample_rate"] == 32 / 320 and p["steps"] == 10 and p["delta"] == 1e-5 and p["noise"]
    assert 1.95 < p["epsilon_rdp"] <= 2.0  # the noise multiplier is the smallest that keeps within epsilon 2
    assert 0 < p["epsilon_prv"] < p["epsilon_rdp"]  # PRV's bound is the tighter one
    assert "DP-SGD to epsilon 2.0" in capsys.readouterr().out
    tensors, _ = runfolder.load_tensors(out / runfolder.MODEL)
    assert not any("_module" in k for k in tensors)
    from nnlab import evaluate

    runfolder.load(out)  # rebuilds and loads: the keys fit the plain model
    assert evaluate(out)["test_accuracy"] == summary["test_accuracy"]


def test_prv_failure_falls_back_to_rdp_and_says_so(monkeypatch):
    big = privacy.spent_epsilon(0.5, 0.5, 100, 1e-5)  # epsilon ~150: PRV is not run
    assert big["epsilon_rdp"] > privacy.PRV_MAX_EPSILON and big["epsilon_prv"] is None
    assert "RDP figure stands" in big["epsilon_prv_failed"]
    from opacus.accountants import PRVAccountant

    def fail(self, delta, **kw):  # the error PRV raises at large epsilon or many steps
        raise RuntimeError("Discrete mean differs significantly from continuous mean.")

    monkeypatch.setattr(PRVAccountant, "get_epsilon", fail)
    out = privacy.spent_epsilon(1.0, 0.01, 100, 1e-5)
    assert out["epsilon_prv"] is None and 0 < out["epsilon_rdp"] < 2
    assert "Discrete mean differs" in out["epsilon_prv_failed"]


@pytest.mark.parametrize("args,needles", [
    (["cnn", "--set", "train.privacy.epsilon=3"], ["BatchNorm", "model.norm=group"]),
    (["seed-cnn", "--set", "train.privacy.epsilon=0"], ["train.privacy.epsilon", "positive"]),
    (["seed-cnn", "--set", "train.privacy.epsilon=3", "--set", "train.grad_accum=2",
      "--set", "train.batch_size=64"], ["train.grad_accum"]),
    (["seed-cnn", "--set", "train.privacy.epsilon=3", "--set", "train.privacy.delta=1"], ["train.privacy.delta"]),
    (["seed-cnn", "--set", "train.privacy.epsilon=3", "--set", "train.compile=true"], ["train.compile"]),
])
def test_settings_dp_sgd_cannot_honour_are_one_line_errors_and_leave_no_run(args, needles, fmnist_dir, tmp_path,
                                                                           capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *args, "--out", str(out), "--set", f"data.dir={fmnist_dir}"]) == 2
    one_line_error(2, capsys.readouterr().err, *needles)
    assert not out.exists()


def test_a_text_run_and_a_resumed_dp_run_are_refused(text_file, fmnist_dir, tmp_path, capsys, one_thread):
    assert cli.main(["train", "gpt-shakespeare", "--set", f"data.path={text_file}", "--set", "model.preset=tiny",
                     "--set", "train.privacy.epsilon=3", "--out", str(tmp_path / "t")]) == 2
    one_line_error(2, capsys.readouterr().err, "language models")
    run = tmp_path / "dp"
    assert cli.main(["train", "seed-cnn", "--out", str(run), "--set", f"data.dir={fmnist_dir}", "--set",
                     "train.max_steps=2", "--set", "train.privacy.epsilon=3", "--set", "train.batch_size=32"]) == 0
    before = (run / runfolder.CHECKPOINT).read_bytes()
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run)]) == 2
    one_line_error(2, capsys.readouterr().err, "--resume")
    assert (run / runfolder.CHECKPOINT).read_bytes() == before


def test_keys_lists_the_privacy_keys(capsys):
    assert cli.main(["keys"]) == 0
    out = capsys.readouterr().out
    for key in ("train.privacy.epsilon", "train.privacy.delta", "train.privacy.max_grad_norm", "train.privacy.noise",
                "train.privacy.accountant", "model.norm"):
        assert key in out

"""`nnlab explain`: the properties each method must have (IG's completeness, attention rows that are
distributions, a causal GPT, rollout's formula, Grad-CAM's), the model-randomization check, the
same attributions with and without nnlab's kernels, the files of the contract, and bad input.

The runs are tiny and trained here: seed-cnn on scikit-learn's digits (real handwriting, where
the class is in the strokes' shape rather than in where the image is bright, so the randomization
check can tell a trained model's attributions from the image's), one-layer ViT, GPT and cnn runs on
the conftest fixtures, and the mlp on diabetes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import nnlab
from conftest import one_line_error, train_quietly
from nnlab import kernels
from nnlab.analysis import explain as ex
from nnlab.analysis.explain_figures import text_heatmap
from nnlab.kernels import build

pytestmark = pytest.mark.usefixtures("one_thread")

CONTRACT_KEYS = {"method", "model", "samples", "indices", "predicted", "true", "files", "written"}



@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    return train_quietly("seed-cnn", ["data.name=digits", "data.image_size=28", "train.max_steps=60", "train.batch_size=32",
                               "train.lr=0.02", "train.momentum=0.9", "train.precision=fp32"],
                  tmp_path_factory.mktemp("explain") / "digits")


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory, fmnist_dir) -> Path:
    return train_quietly("cnn", [f"data.dir={fmnist_dir}", "model.preset=tiny", "train.max_steps=5", "train.batch_size=32"],
                  tmp_path_factory.mktemp("explain") / "cnn")


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, fmnist_dir) -> Path:
    return train_quietly("vit", [f"data.dir={fmnist_dir}", "model.preset=tiny", "train.max_steps=10", "train.batch_size=32"],
                  tmp_path_factory.mktemp("explain") / "vit")


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory, text_file) -> Path:
    return train_quietly("gpt-shakespeare", [f"data.path={text_file}", "model.preset=tiny", "train.max_steps=30",
                                      "train.eval_iters=2", "train.warmup_steps=0", "train.lr=0.01"],
                  tmp_path_factory.mktemp("explain") / "gpt")


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory) -> Path:
    return train_quietly("mlp-regression", ["train.epochs=30"], tmp_path_factory.mktemp("explain") / "mlp")


def setup(run: Path, n: int = 4):
    """(model, info, samples, target) as explain() prepares them."""
    model, info = nnlab.load(run)
    data = ex.first_samples(run, n, info)
    target, _, _ = ex.predict(model, data, info)
    return model, info, data, target


# ---- what each method must satisfy ------------------------------------------------------------------

@pytest.mark.parametrize("run_name", ["digits_run", "mlp_run"])
def test_integrated_gradients_sum_to_the_change_of_the_target_score(run_name, request):
    """Completeness: sum_i IG_i(x) = F_c(x) - F_c(x'), x' = 0, within the integral's error; Captum's
    convergence delta is exactly that error."""
    model, _, data, target = setup(request.getfixturevalue(run_name))
    maps, deltas = ex.attribute(model, data.x, "integrated-gradients", target, data.kind)
    with torch.no_grad():
        change = (model(data.x) - model(torch.zeros_like(data.x))).gather(1, target[:, None])[:, 0]
    total = maps.flatten(1).sum(1)
    assert change.abs().min() > 0.1  # a real change to account for
    torch.testing.assert_close(total, change, rtol=0.01, atol=1e-3)
    torch.testing.assert_close(deltas, total - change, rtol=0, atol=1e-4)


def test_attention_rows_are_distributions_and_the_gpt_is_causal(vit_run, gpt_run):
    for run, causal in ((vit_run, False), (gpt_run, True)):
        model, _, data, _ = setup(run, 3)
        maps = ex.attention_maps(model, data.x)
        T = data.x.shape[1] if causal else model.cfg.num_patches + 1
        assert [A.shape for A in maps] == [(3, 2, T, T)]  # tiny presets: one layer of two heads
        for M in (*maps, ex.rollout(maps)):
            torch.testing.assert_close(M.sum(-1), torch.ones(M.shape[:-1]), rtol=0, atol=1e-5)
            assert (M >= 0).all()
            # the GPT sees no later token; the ViT's patches see each other both ways
            assert bool((M.triu(1) == 0).all()) == causal


def test_rollout_adds_the_residual_and_multiplies_through_the_layers():
    g = torch.Generator().manual_seed(0)
    layers = [torch.softmax(torch.randn(2, 3, 5, 5, generator=g), -1) for _ in range(3)]
    step = [(A.mean(1) + torch.eye(5)) / 2 for A in layers]  # rows of mean(A) + I sum to 2
    torch.testing.assert_close(ex.rollout(layers[:1]), step[0])
    torch.testing.assert_close(ex.rollout(layers), step[2] @ step[1] @ step[0])


def test_grad_cam_weights_the_last_blocks_maps_by_their_mean_gradient(digits_run):
    """ReLU(sum_k mean_ij(dF_c/dA^k) A^k) at conv2 (seed-cnn's last block), upsampled bilinearly."""
    model, _, data, target = setup(digits_run)
    assert ex.gradcam_layer(model) is model.conv2
    A = model.conv2(model.conv1(data.x))  # (B, 64, 7, 7)
    scores = model.forward_head(torch.relu(model.fc1(A.flatten(1))))
    (dA,) = torch.autograd.grad(scores.gather(1, target[:, None]).sum(), A)
    cam = torch.relu((dA.mean((2, 3), keepdim=True) * A).sum(1, keepdim=True))
    expected = torch.nn.functional.interpolate(cam, size=(28, 28), mode="bilinear")[:, 0].detach()
    maps, deltas = ex.attribute(model, data.x, "grad-cam", target, "image")
    assert deltas is None and maps.shape == (4, 28, 28) and (maps >= 0).all() and maps.amax() > 0
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-6)


def test_grad_cam_of_a_cnn_hooks_its_last_conv_block_with_its_in_place_relu(cnn_run):
    model, _, data, target = setup(cnn_run)
    block = ex.gradcam_layer(model)
    assert block is model.stages[-1][1]  # conv, BatchNorm, ReLU(inplace=True): the activated maps
    maps, _ = ex.attribute(model, data.x, "grad-cam", target, "image")
    assert maps.shape == (4, 28, 28) and torch.isfinite(maps).all() and (maps >= 0).all()


# ---- model randomization ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["saliency", "integrated-gradients"])
def test_a_trained_models_attributions_pass_the_randomization_check(digits_run, method):
    """Trained vs re-initialised weights: little rank correlation, well below the threshold, while a
    model compared with itself correlates fully and fails, so the check can fail."""
    result = ex.explain(digits_run, method, samples=4)
    sanity = result["sanity"]
    assert sanity["passed"] and sanity["score"] < ex.SANITY_THRESHOLD - 0.15, sanity
    model, info, data, target = setup(digits_run)
    maps, _ = ex.attribute(model, data.x, method, target, "image")
    assert np.mean(ex.rank_correlation(maps, maps)) == pytest.approx(1.0)
    fresh = ex.reinitialised(info)
    same = ex.sanity_check(*(ex.attribute(fresh, data.x, method, target, "image")[0] for _ in range(2)))
    assert same["score"] == pytest.approx(1.0) and not same["passed"]
    # re-initialisation is seeded: the check gives the same score every time
    assert ex.explain(digits_run, method, samples=4)["sanity"]["score"] == sanity["score"]


# ---- kernels -----------------------------------------------------------------------------------------

@pytest.mark.skipif(build.why_not_tried() is not None or not kernels.status()["ops"]["conv1_pool2x2"],
                    reason="nnlab's conv kernels do not run here")
def test_cnn_attributions_are_identical_with_and_without_kernels(digits_run, no_kernels, monkeypatch):
    """The model's inference runs nnlab's conv kernels; they decline inputs that need a gradient, so
    every attribution is torch's functional path: equal bit for bit once the kernels are off."""
    model, _, data, target = setup(digits_run)
    monkeypatch.setattr(build, "_used", set())
    with torch.no_grad():
        model(data.x)
    assert "conv1_pool2x2" in kernels.used()
    monkeypatch.setattr(build, "_used", set())
    methods = ("saliency", "integrated-gradients", "grad-cam")
    with_kernels = {m: ex.attribute(model, data.x, m, target, "image") for m in methods}
    assert kernels.used() == []  # no kernel ran while attributing
    no_kernels()
    for m in methods:
        maps, deltas = ex.attribute(model, data.x, m, target, "image")
        assert torch.equal(maps, with_kernels[m][0]), m
        assert (deltas is None and with_kernels[m][1] is None) or torch.equal(deltas, with_kernels[m][1])


@pytest.mark.skipif(build.why_not_tried() is not None, reason="nnlab's kernels are off here")
def test_vit_saliency_through_the_attention_kernel_matches_the_reference(vit_run, no_kernels, monkeypatch):
    """The attention kernel has its own backward and takes part: equal up to float rounding."""
    model, _, data, target = setup(vit_run)
    monkeypatch.setattr(build, "_used", set())
    fast, _ = ex.attribute(model, data.x, "saliency", target, "image")
    assert "attention" in kernels.used()
    no_kernels()
    reference, _ = ex.attribute(model, data.x, "saliency", target, "image")
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


# ---- the verb and its files --------------------------------------------------------------------------

CASES = {  # run, method or None (the default), the files besides the JSON
    "cnn default": ("digits_run", None, "integrated-gradients", [".png"]),
    "cnn grad-cam": ("cnn_run", "grad-cam", "grad-cam", [".png"]),
    "vit default": ("vit_run", None, "attention", [".png"]),
    "vit rollout": ("vit_run", "rollout", "rollout", [".png"]),
    "gpt default": ("gpt_run", None, "attention", [".html", ".png"]),
    "gpt ig": ("gpt_run", "integrated-gradients", "integrated-gradients", [".html"]),
    "mlp saliency": ("mlp_run", "saliency", "saliency", [".png"]),
}


@pytest.mark.parametrize("case", CASES)
def test_explain_writes_the_contract_files(case, request, cli_main):
    run_name, method, expected, suffixes = CASES[case]
    run = request.getfixturevalue(run_name)
    before = {k: v for k, v in snapshot(run).items() if not k.startswith(f"explain/{expected}.")}
    rc, out, err = cli_main("explain", run, "--samples", 3, *(["--method", method] if method else []))
    assert rc == 0, err
    assert {k: v for k, v in snapshot(run).items() if not k.startswith(f"explain/{expected}.")} == before
    result = json.loads((run / "explain" / f"{expected}.json").read_text())
    assert CONTRACT_KEYS <= set(result) and result["method"] == expected and result["samples"] == 3
    assert len(result["indices"]) == len(result["predicted"]) == len(result["true"]) == 3
    assert result["files"] == [f"explain/{expected}{s}" for s in sorted(suffixes)]
    for name in result["files"]:
        data = (run / name).read_bytes()
        assert data.startswith(b"\x89PNG") if name.endswith(".png") else b"<!DOCTYPE html>" in data
        if name.endswith(".html"):
            assert b"http" not in data.lower() and b"<script" not in data.lower()  # self-contained, no requests
    if expected in ("attention", "rollout"):
        assert "sanity" not in result and result["max_row_sum_error"] < 1e-5
    else:
        assert set(result["sanity"]) >= {"test", "score", "threshold", "passed"}
        assert "sanity (model randomization)" in out
    if expected == "integrated-gradients":
        assert len(result["convergence_delta"]) == 3 and out.count("convergence delta") == 3
    else:
        assert "convergence_delta" not in result


def test_text_heat_map_escapes_the_text():
    page = text_heatmap([["<", "script", ">", "&", "\n"]], np.array([[1.0, -1.0, 0.5, 0.0, 0.2]]), ["<"], [">"],
                        "t <b>", "note")
    assert "<script>" not in page and "&lt;" in page and "&amp;" in page and "t &lt;b&gt;" in page


# ---- bad input ---------------------------------------------------------------------------------------

BAD = {  # run, arguments after the run folder, what the one line names
    "no model.json": ("digits_run", [], "model.json"),
    "grad-cam on vit": ("vit_run", ["--method", "grad-cam"], "grad-cam"),
    "grad-cam on gpt": ("gpt_run", ["--method", "grad-cam"], "grad-cam"),
    "grad-cam on mlp": ("mlp_run", ["--method", "grad-cam"], "grad-cam"),
    "attention on cnn": ("digits_run", ["--method", "attention"], "attention"),
    "rollout on mlp": ("mlp_run", ["--method", "rollout"], "rollout"),
    "unknown method": ("digits_run", ["--method", "lime"], "lime"),
    "no samples": ("digits_run", ["--samples", "0"], "--samples"),
    "too many samples": ("digits_run", ["--samples", "65"], "--samples"),
    "explain is a file": ("digits_run", [], "not a folder"),
}


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_leaves_the_run_folder_alone(case, request, tmp_path, cli_main):
    run_name, args, needle = BAD[case]
    run = tmp_path / "run"
    shutil.copytree(request.getfixturevalue(run_name), run, ignore=shutil.ignore_patterns("explain"))
    if case == "no model.json":
        (run / "model.json").unlink()
    if case == "explain is a file":
        (run / "explain").write_text("not a folder")
    else:
        (run / "explain").mkdir()
        (run / "explain" / "integrated-gradients.json").write_text("{}")  # an earlier result to keep
    before = snapshot(run)
    rc, out, err = cli_main("explain", run, *args)
    one_line_error(rc, err, needle)
    assert out == "" and snapshot(run) == before


def test_a_missing_run_folder_is_one_line(tmp_path, cli_main):
    rc, _, err = cli_main("explain", tmp_path / "nowhere")
    one_line_error(rc, err, "nowhere", "no such run folder")

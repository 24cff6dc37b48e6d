"""`nnlab export --format onnx [--quantize int8]`: onnxruntime runs the file and agrees with PyTorch
(classifiers on the whole test split, a GPT at every sequence length up to block_size, any batch
size); int8 is per-channel QDQ for CNNs; a re-export replaces only the export's own files; bad
input and exporter failures are one-line errors that write nothing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import nnlab
from conftest import one_line_error
from nnlab import kernels
from nnlab.export import export, session
from nnlab.report import read_run
from nnlab.report.analyses import export_section
from nnlab.runfolder import read_config
from nnlab.tasks import make_task

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(recipe: str, sets: list[str], out: Path) -> Path:
    torch.set_num_threads(1)
    return nnlab.train(recipe, [*sets, "train.log_every=1000", "train.eval_every=1000"], out=str(out))


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory, fmnist_dir) -> Path:
    return _train("seed-cnn", [f"data.dir={fmnist_dir}", "train.max_steps=20", "train.batch_size=32"],
                  tmp_path_factory.mktemp("export") / "cnn")


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def test_cnn_fp32_and_int8_agree_with_pytorch_on_the_test_split(cnn_run, cli_main):
    before = _digest(cnn_run)
    rc, out, err = cli_main("export", cnn_run, "--format", "onnx", "--quantize", "int8")
    assert rc == 0, err
    record = json.loads(out)
    assert record == json.loads((cnn_run / "export.json").read_text())
    assert record["check"]["data"] == "the test split (100 samples)"
    assert record["check"]["fp32"]["top1_agreement"] >= 0.999
    # Recompute independently: the file on disk, the whole test split, batches of 1, 3 and 100.
    task = make_task(read_config(cnn_run))
    model, _ = nnlab.load(cnn_run)
    with torch.no_grad():
        want = model(task.x_test).numpy()
    sess = session(cnn_run / "model.onnx", threads=1)
    got = np.concatenate([sess.run(None, {"x": task.x_test[i:i + 3].numpy()})[0] for i in range(0, 100, 3)])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(sess.run(None, {"x": task.x_test[:1].numpy()})[0], want[:1], atol=1e-4, rtol=1e-4)
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.999
    # int8: static QDQ with per-channel conv weights, accurate to within a few points here.
    int8 = record["check"]["int8"]
    assert int8["method"].startswith("static QDQ") and int8["calibration_images"] == 320
    assert abs(int8["accuracy"] - int8["accuracy_pytorch"]) <= 0.05
    graph = onnx.load(cnn_run / "model.int8.onnx").graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    conv_w = [n.input[1] for n in graph.node if n.op_type == "Conv"]
    dq = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    assert all(scales[dq[w].input[1]].size == 32 for w in conv_w[:1])  # one scale per output channel
    out8 = session(cnn_run / "model.int8.onnx", threads=1).run(None, {"x": task.x_test.numpy()})[0]
    assert np.mean(out8.argmax(1) == task.data.y_test.numpy()) == pytest.approx(int8["accuracy"])
    # The report's section reads export.json.
    section = "".join(export_section(read_run(cnn_run)).body)
    assert "model.int8.onnx" in section and "the test split (100 samples)" in section and "static QDQ" in section
    # Only the export's own files are new; nothing of the run changed.
    after = _digest(cnn_run)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {"model.onnx", "model.int8.onnx", "export.json"}


def test_reexport_replaces_only_the_export(cnn_run):
    (cnn_run / "model.onnx").write_bytes(b"an earlier export")
    before = _digest(cnn_run)
    record = export(cnn_run)
    assert record["files"] == {"fp32": "model.onnx"}
    assert (cnn_run / "model.onnx").stat().st_size == record["bytes"]["fp32"]
    after = _digest(cnn_run)
    unchanged = {k: v for k, v in before.items() if k not in ("export.json", "model.onnx")}
    assert {k: v for k, v in after.items() if k not in ("export.json", "model.onnx")} == unchanged
    assert not [p for p in cnn_run.iterdir() if ".tmp-" in p.name]  # nothing left beside the files


def test_without_the_runs_data_fp32_is_checked_on_random_inputs(cnn_run, tmp_path, cli_main):
    run = tmp_path / "moved"
    shutil.copytree(cnn_run, run, ignore=shutil.ignore_patterns("*.onnx", "export.json", "checkpoints", "tensorboard"))
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(str(read_config(cnn_run).data.dir), str(tmp_path / "gone")))
    record = export(run)
    assert record["check"]["data"].startswith("random inputs") and record["check"]["fp32"]["top1_agreement"] == 1.0
    rc, out, err = cli_main("export", run, "--quantize", "int8")
    one_line_error(rc, err, "calibration")


def test_gpt_exports_without_kv_cache_for_every_length(tmp_path_factory, text_file):
    run = _train("gpt-shakespeare", [f"data.path={text_file}", "model.preset=tiny", "train.max_steps=5",
                                     "train.eval_iters=1"], tmp_path_factory.mktemp("export") / "gpt")
    record = export(run, quantize="int8")
    assert record["kv_cache"] is False and record["check"]["fp32"]["top1_agreement"] == 1.0
    assert record["check"]["int8"]["method"].startswith("dynamic")
    model, info = nnlab.load(run)
    sess = session(run / "model.onnx", threads=1)
    assert [i.name for i in sess.get_inputs()] == ["idx"]
    g = torch.Generator().manual_seed(1)
    for batch, T in ((1, 1), (3, 7), (2, info["model"]["block_size"])):
        idx = torch.randint(0, info["model"]["vocab_size"], (batch, T), generator=g)
        with torch.no_grad():
            want = model(idx).numpy()
        np.testing.assert_allclose(sess.run(None, {"idx": idx.numpy()})[0], want, atol=1e-4, rtol=1e-4)


def test_bad_input_is_one_line_and_writes_nothing(cnn_run, tmp_path, cli_main):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    before = _digest(cnn_run)
    for args, needle in [((cnn_run, "--format", "tflite"), "unknown format"),
                         ((cnn_run, "--quantize", "int4"), "--quantize"), ((empty,), "model.json"),
                         ((cnn_run, "--out", cnn_run / "model.safetensors"), ".onnx"),
                         ((cnn_run, "--out", tmp_path / "no" / "x.onnx"), "no such folder")]:
        rc, out, err = cli_main("export", *args)
        one_line_error(rc, err, needle)
    assert _digest(cnn_run) == before


def test_an_op_the_exporter_cannot_translate_fails_in_one_line(cnn_run, cli_main, monkeypatch):
    """nnlab's own kernels are torch.library ops with no ONNX translation: left on, the export fails."""
    if not kernels.status()["ops"]["conv1_pool2x2"]:  # the seed-cnn's first block runs it here
        pytest.skip(f"nnlab's kernels do not run here: {kernels.status()['why']}")
    monkeypatch.setattr(kernels, "switched_off", contextlib.nullcontext)
    before = _digest(cnn_run)
    rc, out, err = cli_main("export", cnn_run)
    one_line_error(rc, err, "torch.onnx.export failed")
    assert _digest(cnn_run) == before

"""`nnlab info` (what decides speed on this machine) and the same facts in summary.json, with the
kernels a run used."""

import json

import pytest
import torch

import nnlab
from nnlab import kernels
from nnlab.kernels import build
from nnlab.train.precision import cpu_name, resolve_precision


def test_info_prints_the_cpu_and_the_precision_decision(run_cli):
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert cpu_name() in out
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    precision, why = resolve_precision("auto", device)
    assert f"auto picks {precision} on {device}: {why.removeprefix('auto: ')}" in out
    assert "avx2 " in out and "amx_bf16 " in out and f"torch      {torch.__version__}" in out
    assert ("ops that run here" if kernels.status()["built"] else "not built") in out


@pytest.mark.skipif(build.why_not_tried() is not None, reason=f"no kernel build tried here: {build.why_not_tried()}")
def test_summary_records_the_machine_and_the_kernels_a_run_used(fmnist_dir, tmp_path, one_thread, monkeypatch):
    monkeypatch.setattr(build, "_used", set())  # this run's kernels only
    sets = [f"data.dir={fmnist_dir}", "train.max_steps=2", "train.batch_size=32", "train.precision=fp32",
            "train.channels_last=true", "train.log_every=1"]
    run_dir = nnlab.train("seed-cnn", sets, out=str(tmp_path / "run"))
    summary = json.loads((run_dir / "summary.json").read_text())
    ops = kernels.status()["ops"]
    expected = {"conv1_pool2x2", "conv3x3_pool2x2", "conv3x3_winograd"} if ops["conv1_pool2x2"] else {"pool2x2"}
    assert set(summary["kernels_used"]) == expected
    machine = summary["machine"]
    assert machine["cpu"] == cpu_name() and machine["kernels"]["built"] and machine["torch"] == torch.__version__
    assert machine["precision_auto"]["precision"] in ("bf16", "fp32")

"""Two-process DDP and FSDP2 (gloo, launched by torchrun) reproduce the single-process loss curve of
the same global batch, and the models they save reload into one process with the same outputs."""

import json
import os
import subprocess
import sys

import pytest
import torch

import nnlab

ARGS = ["model.name=gpt", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
        "data.name=text", "train.max_steps=6", "train.batch_size=8", "train.eval_iters=2", "train.log_every=1",
        "train.precision=fp32", "train.optimizer=adamw", "train.lr=0.003", "train.grad_clip=1.0"]


def run(tmp_path, text_file, name, nproc, *extra):
    out = tmp_path / name
    sets = [a for arg in [*ARGS, f"data.path={text_file}", *extra] for a in ("--set", arg)]
    launch = [sys.executable, "-m", "nnlab"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "nnlab"]
    # PYTHONFAULTHANDLER: a rank killed by a signal prints every thread's Python stack, which says
    # where it was when it died.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [*launch, "train", "gpt-shakespeare", *sets, "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert p.returncode == 0, f"stdout:\n{p.stdout[-1500:]}\nstderr:\n{p.stderr[-3000:]}"
    return out, p


def losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "train"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, text_file):
    return run(tmp_path_factory.mktemp("single"), text_file, "single", 1)[0]


@pytest.mark.parametrize("strategy, accum", [("ddp", 1), ("fsdp", 1), ("ddp", 2), ("fsdp", 2)])
def test_two_processes_match_one(tmp_path, text_file, single, strategy, accum):
    # 2 ranks x `accum` micro-batches of the same global batch of 8.
    out, p = run(tmp_path, text_file, strategy, 2, f"train.strategy={strategy}", f"train.grad_accum={accum}")
    # Gradients are averaged over ranks in a different order than one process sums them:
    # equal to float32 rounding, not bit for bit.
    assert losses(out) == pytest.approx(losses(single), rel=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert p.stdout.count("done:") == 1  # only rank 0 prints
    # The blocks return no views (no KV cache in training), so FSDP2 has nothing to warn about.
    assert "returned a view tensor" not in p.stderr
    # The saved model reloads into a single process and answers like the single-process model.
    m2, _ = nnlab.load(out)
    m1, _ = nnlab.load(single)
    idx = torch.randint(0, m1.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m2(idx), m1(idx), atol=1e-4, rtol=1e-4)


def test_global_batch_must_divide_over_ranks(tmp_path, text_file):
    out = tmp_path / "bad"
    sets = [a for arg in [*ARGS, f"data.path={text_file}", "train.batch_size=7"] for a in ("--set", arg)]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "nnlab", "train", "gpt-shakespeare", *sets, "--out", str(out)], capture_output=True, text=True,
                       timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0 and "train.batch_size: 7 is not divisible by world size 2" in p.stderr


def test_fsdp_with_channels_last_conv_weights_is_a_config_error(tmp_path):
    """FSDP2 cannot shard channels-last conv weights: one clear line, not torch's traceback."""
    sets = ["--set", "train.strategy=fsdp", "--set", "data.limit=256", "--set", "train.max_steps=1"]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "nnlab", "train", "seed-cnn-fast", *sets, "--out", str(tmp_path / "run")], capture_output=True,
                       text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0 and "train.channels_last: FSDP2 shards only contiguous parameters" in p.stderr
    assert "NotImplementedError" not in p.stderr


def _resume(run_dir, nproc, tmp_path):
    launch = [sys.executable, "-m", "nnlab"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "nnlab"]
    p = subprocess.run([*launch, "train", "--resume", str(run_dir)], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.parametrize("resume_nproc", [2, 1])
def test_fsdp_checkpoint_resumes_at_any_world_size(tmp_path, text_file, resume_nproc):
    """An FSDP run's checkpoint holds the full state: resumed by 2 ranks or by 1, it continues the
    loss curve of an uninterrupted single-process run."""
    const = ("train.schedule=constant", "train.warmup_steps=0")  # lr independent of max_steps
    full, _ = run(tmp_path, text_file, "full", 1, *const, "train.max_steps=9")
    part, _ = run(tmp_path, text_file, "part", 2, *const, "train.strategy=fsdp", "train.max_steps=6")
    cfg = part / "config.yaml"
    cfg.write_text(cfg.read_text().replace("max_steps: 6", "max_steps: 9"))  # extend the run
    _resume(part, resume_nproc, tmp_path)
    assert losses(part) == pytest.approx(losses(full), rel=1e-4)
    assert json.loads((part / "summary.json").read_text())["steps"] == 9

"""The benchmark suite runs and reports what it promises, checked on its quickest benchmark (B4).

`benchmarks/run.py --quick --only B4` must write a JSON file with the machine (and its processor
kind), torch version, repeats and command line, B4's figures for both of its models as
median/min/max summaries, and a true greedy-identity check: KV-cached sampling gives exactly the
tokens that recomputing the context gives. No speed is asserted: on a shared machine a test can
check that figures exist, not what they are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import sample_text

ROOT = Path(__file__).resolve().parent.parent
HANG_GUARD = 300  # seconds; only stops a hung run, it is not a speed check


def with_text_data_root(tmp_path: Path) -> dict:
    """The environment for a benchmark that trains gpt-shakespeare: a data root holding a small
    tinyshakespeare.txt, so that it runs in a clone without ../shared/data."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "tinyshakespeare.txt").write_text(sample_text(), encoding="utf-8")
    return {**os.environ, "NNLAB_DATA_ROOT": str(root)}


def test_quick_b4_writes_results_and_greedy_tokens_match(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "B4", "--json", str(out)]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD,
                       env=with_text_data_root(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    doc = json.loads(out.read_text())
    assert {"command", "quick", "repeats", "torch", "machine", "benchmarks"} <= doc.keys()
    assert doc["quick"] is True and doc["repeats"] == 1 and "--only B4" in doc["command"]
    m = doc["machine"]
    assert {"kind", "processor", "native_bf16", "cpu_flags", "torch", "threads", "device", "peak_gflops"} <= m.keys()
    peak = m["peak_gflops"]
    assert set(peak) == {"fp32", "bf16"} and peak["fp32"] > 0
    assert (peak["bf16"] > 0) if m["native_bf16"] else peak["bf16"] is None  # emulated bf16 is not timed
    assert list(doc["benchmarks"]) == ["B4"]

    b4 = doc["benchmarks"]["B4"]
    assert b4["greedy_identical"] is True
    new, prompt = b4["config"]["new_tokens"], b4["config"]["prompt_tokens"]
    models = b4["models"]
    assert list(models) == ["random-1024", "gpt-shakespeare"]
    # The random model's cache holds every token; gpt-shakespeare's 64-token context overflows, so
    # its cached path also recomputes the cropped context (the case nanoGPT's sampler is in).
    assert models["random-1024"]["config"]["block_size"] >= prompt + new
    assert models["gpt-shakespeare"]["config"]["block_size"] == 64 < prompt + new
    for m4, ratio, sides in ((models["random-1024"], "ratio_vs_recompute", 2),
                             (models["gpt-shakespeare"], "ratio_vs_sample_py", 4)):
        assert m4["greedy_identical"] is True
        assert len(m4["results"]) == sides  # cached and recomputing; sample.py, exact and two shifts
        for res in m4["results"].values():
            for key in ("tokens_per_s", ratio, "mfu"):
                assert {"median", "min", "max", "n", "values"} <= res[key].keys()
                assert res[key]["median"] > 0
    shakespeare = models["gpt-shakespeare"]
    per_length = shakespeare["loss_by_context"]["per_context_length"]
    assert len(per_length) == 64 and all(v > 0 for v in per_length)
    losses = [res["val_loss_at_its_contexts"] for res in shakespeare["results"].values()
              if "val_loss_at_its_contexts" in res]
    assert len(losses) == 3 and losses[0] == per_length[-1]  # exact: a full context for every token
    assert all(v > 0 for v in shakespeare["breakdown_ms"].values())
    assert "greedy tokens identical where they must be, every model and repeat: True" in r.stdout
    assert m["processor"] in r.stdout and "measured matmul peak" in r.stdout


def test_curves_spread_over_seeds_time_to_target_and_reuse(tmp_path):
    """benchmarks/curves.py over two real seeds of a short run: every eval step carries the spread of
    the metric and of the training seconds; --target names the first evaluation reaching the value
    in each run; --reuse rebuilds the same curves from the finished runs without training again."""
    out, js = tmp_path / "runs", tmp_path / "curve.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "curves.py"), "mlp-regression", "--seeds", "0", "1",
           "--set", "train.epochs=40", "--set", "train.eval_every=10", "--set", "train.log_every=10",
           "--out", str(out), "--json", str(js), "--target", "test_mse=1e9", "--target", "test_mse=1e-9"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(js.read_text())
    evals = doc["eval"]["test_mse"]
    assert [e["step"] for e in evals] == [10, 20, 30, 40]
    for e in evals:
        assert e["test_mse"]["min"] <= e["test_mse"]["mean"] <= e["test_mse"]["max"]
    seconds = [e["train_seconds"]["mean"] for e in evals]
    assert seconds == sorted(seconds) and seconds[0] > 0
    runs = [[json.loads(line) for line in (out / f"mlp-regression-seed{s}" / "metrics.jsonl").read_text().splitlines()]
            for s in (0, 1)]
    at10 = [next(r["test_mse"] for r in rows if r["event"] == "eval" and r["step"] == 10) for rows in runs]
    assert at10[0] != at10[1]  # two seeds really differ, so the spread below is a real one
    assert evals[0]["test_mse"] == {"mean": sum(at10) / 2, "min": min(at10), "max": max(at10)}
    easy, impossible = doc["targets"]
    assert easy["reached"] == "2/2" and [h["step"] for h in easy["runs"]] == [10, 10]  # the first evaluation
    assert impossible["reached"] == "0/2" and impossible["train_seconds"] is None

    stamp = [(out / f"mlp-regression-seed{s}" / "summary.json").stat().st_mtime_ns for s in (0, 1)]
    js.unlink()
    r = subprocess.run(cmd + ["--reuse"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads(js.read_text())["eval"] == doc["eval"]
    assert [(out / f"mlp-regression-seed{s}" / "summary.json").stat().st_mtime_ns for s in (0, 1)] == stamp

    # A misspelt --target metric is refused (not reported as "reached by 0/2"), the curve file is left as it was.
    before = js.read_bytes()
    r = subprocess.run(cmd + ["--reuse", "--target", "test_acc=0.5"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=HANG_GUARD)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'test_acc'" in r.stderr and "test_mse" in r.stderr and "--reuse" in r.stderr
    assert js.read_bytes() == before


BAD_ARGS = [  # script, arguments, what the one-line error must name
    ("run.py", ["--repeats", "0"], "--repeats"),
    ("run.py", ["--threads", "-1"], "--threads"),
    ("run.py", ["--only", "B99"], "B99"),
    ("run.py", ["--json", "{tmp}"], "is a folder"),
    ("run.py", ["--json", "{tmp}/file/out.json"], "is a file, not a folder"),
    ("run.py", ["--save", "--quick"], "--save"),
    ("run.py", ["--save", "--only", "B4"], "--save"),
    ("curves.py", ["no-such-recipe"], "no-such-recipe"),
    ("curves.py", ["mlp-regression", "--set", "train.lr=-1"], "train.lr"),
    ("curves.py", ["mlp-regression", "--seeds", "0", "0"], "--seeds"),
    ("recipes.py", ["fmnist-speedrun"], "fmnist-speedrun"),
    ("plain_cnn.py", ["--epochs", "0"], "--epochs"),
    ("avx2_emulation.py", ["--bench", "B3", "--accuracy-epochs", "2"], "--accuracy-epochs"),
    ("b9_load.py", ["--cnn-run", "{tmp}/file"], "not a finished run folder"),
    ("b9_load.py", ["--requests", "0"], "--requests"),
]


@pytest.mark.parametrize("script,args,names", BAD_ARGS, ids=[f"{s} {' '.join(a)}" for s, a, _ in BAD_ARGS])
def test_bad_arguments_fail_at_once_with_one_line(tmp_path, script, args, names):
    """A bad count, path, recipe or override stops a benchmark script before any work (nothing on
    stdout: no header, no training), with exit code 2 and one line naming the culprit, not a
    traceback after minutes of running."""
    (tmp_path / "file").write_text("a file where a folder is expected")
    args = [a.format(tmp=tmp_path) for a in args]
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=HANG_GUARD)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout == "" and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error:") and names in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no results file, no run folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: gpu.sh would run the whole suite")
def test_gpu_script_without_a_gpu_says_so_and_exits_0(tmp_path):
    """benchmarks/gpu.sh on a machine torch sees no CUDA GPU on: one line that says why, exit 0,
    and no results file (on a GPU it runs the suite; that path needs the hardware)."""
    env = {"PATH": "/usr/bin:/bin", "PY": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--quick"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=HANG_GUARD)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("\n") == 1 and "no CUDA GPU visible to torch" in r.stdout and torch.__version__ in r.stdout
    assert not (ROOT / "benchmarks" / "results-gpu.json").exists()


KINDS = [  # CPU flags -> the processor kind that names benchmarks/results-<kind>.json
    ({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, "xeon-amx"),
    ({"avx2", "avx512f", "avx512_bf16"}, "avx512-bf16"),
    ({"avx2", "avx512f"}, "avx512"),
    ({"avx2", "fma"}, "avx2"),
]


@pytest.mark.parametrize("flags,kind", KINDS, ids=[k for _, k in KINDS])
def test_processor_kind_follows_the_flags_that_pick_the_code_paths(monkeypatch, flags, kind):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from common import processor_kind

    assert processor_kind(flags) == kind
    assert processor_kind(flags, "cuda") == "gpu"
    assert processor_kind(set(), arch="aarch64") == "aarch64"


def test_the_cnn_flop_count_sees_every_layer(monkeypatch):
    """B1 and B5's MFU: the article's CNN does these multiply-adds per image, by hand."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from common import conv_fc_macs
    from plain_cnn import Net

    by_hand = 28 * 28 * 32 * 9 + 14 * 14 * 64 * 32 * 9 + 64 * 7 * 7 * 128 + 128 * 10
    assert conv_fc_macs(Net(), torch.zeros(1, 1, 28, 28)) == by_hand


def test_quick_b9_load_test_stops_by_itself_without_errors(tmp_path):
    """B9 drives real `nnlab serve` processes (seed-cnn classify batched and one at a time, gpt generate)
    with 1 and several clients: every setting answers all its requests with zero errors, reports
    p50 <= p99 and requests/s, states its goals, and the README's table reads the file."""
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "B9", "--json", str(out)]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD,
                       env=with_text_data_root(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    b9 = json.loads(out.read_text())["benchmarks"]["B9"]
    size = b9["config"]
    assert b9["errors"] == 0 and "errors in all: 0" in r.stdout
    assert sorted(b9["results"]) == sorted(
        [f"classify, {m}, {c}" for m in ("batched", "one at a time")
         for c in ("1 client", f"{size['clients']} clients")]
        + ["generate, 1 client", f"generate, {size['clients']} clients"])
    for res in b9["results"].values():
        want = size["generate_requests"] if res["workload"] == "generate" else size["requests"]
        assert [run["requests"] for run in res["runs"]] == [want] and res["errors"] == 0
        assert 0 < res["p50_ms"]["median"] <= res["p99_ms"]["median"] and res["requests_per_s"]["median"] > 0
        assert res["server_cpu_ms_per_request"]["median"] > 0  # the server process did the work
    assert b9["results"][f"generate, {size['clients']} clients"]["tokens_per_s"]["median"] > 0
    assert set(b9["goals"]) == {"classify_p50_ms_1_client", "batching_speedup"} and "goal <= 5 ms" in r.stdout

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from readme_tables import b9 as b9_cell
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert "0 errors" in b9_cell({"benchmarks": {"B9": b9}})

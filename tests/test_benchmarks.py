"""The benchmark suite runs and reports what it promises, checked on its quickest benchmark (B4).

`benchmarks/run.py --quick --only B4` must write a JSON file with the machine, torch version,
repeats and command line, B4's figures as median/min/max summaries, and a true greedy-identity
check: KV-cached sampling gives exactly the tokens that recomputing the context gives. No speed
is asserted: on a shared machine a test can check that figures exist, not what they are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HANG_GUARD = 300  # seconds; only stops a hung run, it is not a speed check (the run takes ~10-20 s)


def test_quick_b4_writes_results_and_greedy_tokens_match(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "B4", "--json", str(out)]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    doc = json.loads(out.read_text())
    assert {"command", "quick", "repeats", "torch", "machine", "benchmarks"} <= doc.keys()
    assert doc["quick"] is True and doc["repeats"] == 1 and "--only B4" in doc["command"]
    m = doc["machine"]
    assert {"processor", "native_bf16", "cpu_flags", "torch", "threads", "device", "peak_gflops"} <= m.keys()
    assert set(m["peak_gflops"]) == {"fp32", "bf16"} and all(v > 0 for v in m["peak_gflops"].values())
    assert list(doc["benchmarks"]) == ["B4"]

    b4 = doc["benchmarks"]["B4"]
    assert b4["greedy_identical"] is True
    assert b4["config"]["new_tokens"] == 500 and b4["config"]["block_size"] >= 500 + b4["config"]["prompt_tokens"]
    assert len(b4["results"]) == 2  # the cached and the recomputing path
    for res in b4["results"].values():
        for key in ("tokens_per_s", "ratio_vs_recompute", "mfu"):
            assert {"median", "min", "max", "n", "values"} <= res[key].keys()
            assert res[key]["median"] > 0
    assert "greedy tokens identical (cache vs recompute), every repeat: True" in r.stdout
    assert m["processor"] in r.stdout and "measured matmul peak" in r.stdout

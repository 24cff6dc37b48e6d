"""The backdoor table: clean accuracy, attack success rate and detection at several poison rates.

    python benchmarks/backdoor.py [--recipe seed-cnn-fast] [--rates 0,0.001,0.01,0.05] [--target 0]
                                  [--set KEY=VALUE ...] [--out runs/backdoor] [--json results.json]

For each rate R the recipe trains on Fashion-MNIST with a BadNets trigger stamped on R of the
training images, relabelled --target (R = 0 trains clean, with the target set so its attack success
rate is measured too: the rate at which an unpoisoned model calls triggered images the target
anyway). Then `nnlab detect-poison` runs both methods on the run: spectral signatures with the
budget E = the run's poisoned share of its target class (1.5 E of every class flagged), and
activation clustering. Each line gives clean test accuracy, attack success rate (triggered test
images of the other classes classified as the target), and each method's precision and recall in
the target class and over all rows. A run folder that already holds a summary is reused.

Cost: four runs of seed-cnn-fast (about 2 minutes each on 2 cores) and two feature passes over the
60,000 training images per run; the total wall time is printed at the end and kept in the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import output_file, trained_or_reused

from nnlab.analysis.detect_poison import METHODS, detect_poison
from nnlab.config import load_config
from nnlab.errors import NnlabError
from nnlab.runfolder import atomic_write_text
from nnlab.train.precision import cpu_name


def poison_sets(rate: float, target: int) -> list[str]:
    """The --set overrides that plant the backdoor: the one place this script names those keys."""
    return [f"data.poison.rate={rate}", f"data.poison.target={target}"]


def rates(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rates: not a list of numbers: {text!r}") from None
    if not values or any(not 0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--rates: each rate must be in [0, 1), got {text!r}")
    return values


def measure(recipe: str, rate: float, target: int, sets: list[str], out: Path) -> dict:
    """Train (or reuse) the run at `rate`, run every detection method on it: one results row."""
    start = time.perf_counter()
    summary = trained_or_reused(recipe, [*sets, *poison_sets(rate, target)], out)
    row = {"rate": rate, "run": str(out), "test_accuracy": summary["test_accuracy"],
           "attack_success_rate": summary.get("attack_success_rate"), "train_seconds": summary["train_seconds"],
           "precision": summary.get("precision"), "detection": {}}
    for method in METHODS:
        result = detect_poison(out, method=method)
        target_row = result["per_class"][target]
        row["poisoned_rows"] = result["poison"]["rows"]
        row["detection"][method] = {
            "expected": result.get("expected"), "flag_rate": result["flag_rate"],
            "target_class": {k: target_row[k] for k in ("rows", "poisoned", "flagged", "precision", "recall")},
            "overall": {k: result["overall"][k] for k in ("flagged", "precision", "recall")},
            "wall_s": result["wall_s"]}
    row["wall_s"] = round(time.perf_counter() - start, 1)
    return row


def line(row: dict) -> str:
    def pct(v):
        return "  n/a " if v is None else f"{100 * v:5.1f}%"

    asr = row["attack_success_rate"]
    parts = [f"R {100 * row['rate']:5.2f}%", f"{row['poisoned_rows']:5d} poisoned", f"clean acc {pct(row['test_accuracy'])}",
             f"ASR {pct(asr)}"]
    for method, d in row["detection"].items():
        t = d["target_class"]
        parts.append(f"{method}: target P {pct(t['precision'])} R {pct(t['recall'])}, "
                     f"all P {pct(d['overall']['precision'])} ({d['overall']['flagged']} flagged)")
    return " | ".join(parts) + f" | {row['wall_s']:.0f} s"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="backdoor.py")
    p.add_argument("--recipe", default="seed-cnn-fast")
    p.add_argument("--rates", type=rates, default=[0.0, 0.001, 0.01, 0.05])
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="override a key of every run (e.g. data.dir=...)")
    p.add_argument("--out", default="runs/backdoor")
    p.add_argument("--json", type=output_file)
    a = p.parse_args(argv)
    try:  # bad overrides fail now, not after the first run's training
        for rate in a.rates:
            load_config(a.recipe, overrides=[*a.set, *poison_sets(rate, a.target)])
    except NnlabError as e:
        p.exit(2, f"backdoor.py: error: {e}\n")
    cpu = cpu_name()
    print(f"# torch {torch.__version__}, {cpu}, threads {torch.get_num_threads()}, recipe {a.recipe}, "
          f"target class {a.target}", flush=True)
    start = time.perf_counter()
    rows = []
    for rate in a.rates:
        rows.append(measure(a.recipe, rate, a.target, a.set, Path(a.out) / f"rate-{rate:g}"))
        print(line(rows[-1]), flush=True)
    total = round(time.perf_counter() - start, 1)
    print(f"# total wall time {total:.0f} s", flush=True)
    if a.json:
        doc = {"recipe": a.recipe, "target": a.target, "overrides": a.set, "cpu": cpu, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "total_wall_s": total, "rows": rows}
        atomic_write_text(a.json, json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reference training curves: loss against step and against seconds, mean and spread over seeds.

    python benchmarks/curves.py RECIPE [--seeds 0 1 2] [--set KEY=VALUE ...] [--out runs/curves]

Trains RECIPE once per seed and writes benchmarks/curves/RECIPE.json: for every logged step the
mean, min and max training loss and elapsed training seconds, and the same for each evaluation
metric. A user can hold a run of theirs against it to tell whether it is on track. The file names
the processor and torch version: seconds from another machine are not comparable.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import nnlab
from nnlab.train.precision import cpu_name


def spread(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "min": min(xs), "max": max(xs)}


def curve(runs: list[list[dict]], event: str, key: str) -> list[dict]:
    """Per step present in every run: the spread of `key`, and of the seconds since the run began."""
    by_run = []
    for rows in runs:
        t0 = rows[0]["time"]
        by_run.append({r["step"]: (r[key], r["time"] - t0) for r in rows if r["event"] == event and key in r})
    steps = sorted(set.intersection(*(set(d) for d in by_run)))
    return [{"step": s, key: spread([d[s][0] for d in by_run]), "seconds": spread([d[s][1] for d in by_run])}
            for s in steps]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("recipe")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", default="runs/curves")
    a = p.parse_args(argv)
    runs, summaries = [], []
    for seed in a.seeds:
        run_dir = nnlab.train(a.recipe, [*a.set, f"train.seed={seed}"], out=f"{a.out}/{a.recipe}-seed{seed}")
        runs.append([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()])
        summaries.append(json.loads((run_dir / "summary.json").read_text()))
    metrics = sorted({k for rows in runs for r in rows if r["event"] == "eval" for k in r} - {"event", "step", "time"})
    doc = {"recipe": a.recipe, "overrides": a.set, "seeds": a.seeds, "cpu": cpu_name(), "torch": torch.__version__,
           "precision": summaries[0]["precision"],
           "note": "seconds = wall time since the run's first log record, evaluations included",
           "train_loss": curve(runs, "train", "loss"),
           "eval": {m: curve(runs, "eval", m) for m in metrics},
           "final": {m: spread([s[m] for s in summaries]) for m in metrics if m in summaries[0]}}
    path = Path(__file__).parent / "curves" / f"{a.recipe}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    for m, v in doc["final"].items():
        print(f"{a.recipe}: final {m} mean {v['mean']:.4f} [{v['min']:.4f}-{v['max']:.4f}] over seeds {a.seeds}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Reference training curves: loss against step and against seconds, mean and spread over seeds.

    python benchmarks/curves.py RECIPE [--seeds 0 1 2] [--set KEY=VALUE ...] [--out runs/curves]
                                       [--target METRIC=VALUE ...] [--reuse] [--json PATH]

Trains RECIPE once per seed and writes src/nnlab/recipes/curves/RECIPE.json (shipped with the
package, so `nnlab report` draws it beside a run of the recipe): for every logged step the
mean, min and max training loss and elapsed seconds, and the same for each evaluation metric
(with the training seconds to it: evaluations excluded). A user can hold a run of theirs against
it to tell whether it is on track. The file names the processor and torch version: seconds from
another machine are not comparable.

--target test_accuracy=0.94 also reports, per seed, the first evaluation that reaches the value
(at least it; at most it for a metric named *loss* or *mse*) and its training seconds.
--reuse reads finished runs already in --out instead of training them again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import nnlab
from common import output_file
from nnlab.config import load_config
from nnlab.errors import NnlabError
from nnlab.recipes import CURVES
from nnlab.runfolder import atomic_write_text
from nnlab.train.precision import cpu_name


def spread(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "min": min(xs), "max": max(xs)}


def curve(runs: list[list[dict]], event: str, key: str) -> list[dict]:
    """Per step present in every run: the spread of `key`, of the seconds since the run began, and
    of the training seconds (evaluations excluded) where the records carry them."""
    by_run = []
    for rows in runs:
        t0 = rows[0]["time"]
        by_run.append({r["step"]: r | {"seconds": r["time"] - t0} for r in rows if r["event"] == event and key in r})
    steps = sorted(set.intersection(*(set(d) for d in by_run)))
    return [{"step": s, **{k: spread([d[s][k] for d in by_run])
                           for k in (key, "seconds", "train_seconds") if all(k in d[s] for d in by_run)}}
            for s in steps]


def time_to(runs: list[list[dict]], metric: str, value: float) -> dict:
    """Per run, the first evaluation whose `metric` reaches `value`: its step and training seconds."""
    lower = "loss" in metric or "mse" in metric
    hits = []
    for rows in runs:
        evals = [r for r in rows if r["event"] == "eval" and metric in r]
        hit = next((r for r in evals if (r[metric] <= value if lower else r[metric] >= value)), None)
        hits.append(None if hit is None else {"step": hit["step"], metric: hit[metric],
                                               "train_seconds": hit.get("train_seconds")})
    reached = [h for h in hits if h]
    return {"metric": metric, "value": value, "runs": hits, "reached": f"{len(reached)}/{len(hits)}",
            "train_seconds": spread([h["train_seconds"] for h in reached]) if reached else None}


def metric_value(text: str) -> tuple[str, float]:
    """--target's METRIC=VALUE, refused with a one-line error otherwise."""
    metric, _, value = text.partition("=")
    try:
        if metric:
            return metric, float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected METRIC=NUMBER, got {text!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="curves.py")
    p.add_argument("recipe")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", default="runs/curves")
    p.add_argument("--target", action="append", default=[], metavar="METRIC=VALUE", type=metric_value)
    p.add_argument("--reuse", action="store_true", help="read finished runs in --out instead of training")
    p.add_argument("--json", type=output_file, help="where to write (default: src/nnlab/recipes/curves/RECIPE.json)")
    a = p.parse_args(argv)
    if len(set(a.seeds)) < len(a.seeds):
        p.error(f"--seeds: each seed once, got {a.seeds}")
    try:  # a bad recipe or override fails here, in a second, not after the first seed's training
        for seed in a.seeds:
            load_config(a.recipe, overrides=[*a.set, f"train.seed={seed}"])
        return write_curves(a)
    except NnlabError as e:
        p.exit(2, f"curves.py: error: {e}\n")


def write_curves(a: argparse.Namespace) -> int:
    runs, summaries = [], []
    for seed in a.seeds:
        run_dir = Path(f"{a.out}/{a.recipe}-seed{seed}")
        if not (a.reuse and (run_dir / "summary.json").exists()):
            run_dir = nnlab.train(a.recipe, [*a.set, f"train.seed={seed}"], out=str(run_dir))
        runs.append([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()])
        summaries.append(json.loads((run_dir / "summary.json").read_text()))
    metrics = sorted({k for rows in runs for r in rows if r["event"] == "eval" for k in r} - {"event", "step", "time", "train_seconds"})
    unknown = [m for m, _ in a.target if m not in metrics]
    if unknown:  # "reached by 0/3 seeds" would hide a misspelt name
        raise NnlabError(f"--target: the runs log no metric {unknown[0]!r} (they log {', '.join(metrics)}); "
                         f"the runs are kept in {a.out}: rerun with --reuse")
    doc = {"recipe": a.recipe, "overrides": a.set, "seeds": a.seeds, "cpu": cpu_name(), "torch": torch.__version__,
           "precision": summaries[0]["precision"],
           "note": "seconds = wall time since the run's first log record, evaluations included",
           "train_loss": curve(runs, "train", "loss"),
           "eval": {m: curve(runs, "eval", m) for m in metrics},
           "final": {m: spread([s[m] for s in summaries]) for m in metrics if m in summaries[0]},
           "train_seconds": spread([s["train_seconds"] for s in summaries]),
           "targets": [time_to(runs, m, v) for m, v in a.target]}
    path = a.json or CURVES / f"{a.recipe}.json"
    atomic_write_text(path, json.dumps(doc, indent=1))
    for m, v in doc["final"].items():
        print(f"{a.recipe}: final {m} mean {v['mean']:.4f} [{v['min']:.4f}-{v['max']:.4f}] over seeds {a.seeds}")
    for t in doc["targets"]:
        secs = t["train_seconds"]
        print(f"{a.recipe}: {t['metric']} {t['value']} reached by {t['reached']} seeds"
              + (f", training seconds {secs['mean']:.1f} [{secs['min']:.1f}-{secs['max']:.1f}]" if secs else "")
              + f" (steps {[h and h['step'] for h in t['runs']]})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

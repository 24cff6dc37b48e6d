"""B6: the six traditional baselines of `nnlab baselines` on the full Fashion-MNIST, against a budget.

Each model is fitted by nnlab.analysis.baselines.fit_and_score, with its default caps (which models
fit a subsample, and of how many rows), in a fresh process (common.isolated) on the split and
inputs the deep models use: 60,000 training and 10,000 test images of 784 normalised pixels. The
table gives test accuracy, fit seconds, prediction seconds for the 10,000 test images, and the
median latency of a one-image call; the last row adds the fitting seconds of all six against the
budget the caps are chosen for, 10 minutes on 2 cores. One fit per model: the fits are
deterministic (seeded), and the budget is one pass over all six.
--quick fits every model on 300 of the first 1,000 training images and scores the first 1,000 test
images: seconds, not figures.
"""

from __future__ import annotations

from common import Ctx, isolated
from nnlab.analysis.baselines import LATENCY_CALLS, data_config, fit_and_score, names

BUDGET_S = 600.0
QUICK = {"data": ["data.limit=1000"], "max_fit_rows": 300}


def fit_side(name: str, quick: bool) -> dict:
    """One baseline in its own process: load the data as a deep model's run does, fit, score."""
    from nnlab.tasks import make_task

    task = make_task(data_config("fashion-mnist", QUICK["data"] if quick else None))
    x_train, y_train, x_test, y_test = task.arrays()
    return fit_and_score(name, x_train, y_train, x_test, y_test, True, QUICK["max_fit_rows"] if quick else None)


def run(ctx: Ctx) -> dict:
    rows, results = [], {}
    for name in names(classification=True):
        r = isolated(ctx, fit_side, name, ctx.quick)
        results[name] = r
        rows.append([name, f"{r['n_fit']:,}", f"{100 * r['test_accuracy']:.2f}%", f"{r['fit_s']:.1f}",
                     f"{r['predict_s']:.2f}", f"{r['latency_ms']:.2f}", r["note"] or ""])
    total = sum(r["fit_s"] for r in results.values())
    within = total <= BUDGET_S
    rows.append(["all six", "", "", f"{total:.1f}", "", "",
                 f"budget {BUDGET_S:.0f} s: {'within' if within else 'OVER'}"])
    notes = [f"each model fitted once, in a fresh process (common.isolated), with nnlab baselines' defaults; "
             f"n_jobs = torch's threads ({ctx.machine['threads']})",
             f"latency: median wall ms of {LATENCY_CALLS} one-image predict() calls; predict s: the whole test "
             "split in one call"]
    if ctx.quick:
        notes.append(f"--quick: {QUICK['max_fit_rows']} of the first 1,000 training images, the first 1,000 test "
                     "images; the budget applies to the full run only")
    best = max(results, key=lambda n: results[n]["test_accuracy"])
    return {
        "fresh_processes": True,  # every model was fitted in a process of its own (common.isolated)
        "title": "B6 traditional baselines (scikit-learn) on Fashion-MNIST, the deep models' split and inputs",
        "notes": notes,
        "columns": ["model", "rows fitted", "test accuracy", "fit s", "predict s", "latency ms", "note"],
        "rows": rows,
        "results": results,
        "fit_s_total": total,
        "budget_s": BUDGET_S,
        "within_budget": within,
        "best": {"model": best, "test_accuracy": results[best]["test_accuracy"]},
        "config": {"data": "fashion-mnist", **({"quick": QUICK} if ctx.quick else {})},
    }

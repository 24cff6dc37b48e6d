"""B11: the cost of an adversarial evaluation: PGD-10 on 1,000 test images of seed-cnn, against 30 s.

Trains seed-cnn-fast briefly (300 steps; --quick: 20 on the first 2,000 images), then, in a fresh
process per repeat, times nnlab.analysis.attack.perturb (the attack `nnlab attack` runs) on the
first 1,000 test images at eps 0.1 (pixel units): PGD with 10 steps and one random start, and FGSM
beside it, with the accuracy each leaves. The issue's budget, PGD-10 on 1,000 images within 30 s
on 2 cores, is printed beside the median.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import Ctx, fmt, isolated, summarize, train_quiet

SAMPLES, EPS, STEPS, BUDGET_S = 1000, 0.1, 10, 30.0
QUICK = {"train.max_steps": 20, "data.limit": 2000}


def side(run_dir: str, samples: int) -> dict:
    from nnlab import runfolder
    from nnlab.analysis.attack import accuracy, perturb, pixel_model, test_pixels

    model, info = runfolder.load(run_dir)
    fn = pixel_model(model, info).eval()
    x, y, _, _ = test_pixels(Path(run_dir), samples)
    out = {"clean_accuracy": accuracy(fn, x, y)}
    for name, steps in (("pgd", STEPS), ("fgsm", 1)):
        t0 = time.perf_counter()
        adv = perturb(fn, x, y, name, EPS, steps, 1)
        out[f"{name}_s"] = time.perf_counter() - t0
        out[f"{name}_accuracy"] = accuracy(fn, adv, y)
    return out


def run(ctx: Ctx) -> dict:
    samples = 200 if ctx.quick else SAMPLES
    with tempfile.TemporaryDirectory() as tmp:
        overrides = QUICK if ctx.quick else {"train.max_steps": 300}
        run_dir = train_quiet("seed-cnn-fast", overrides, str(Path(tmp) / "cnn"))["run_dir"]
        sides = [isolated(ctx, side, run_dir, samples) for _ in range(ctx.repeats)]
    results = {k: summarize(s[k] for s in sides) for k in sides[0]}
    pgd_s = results["pgd_s"]["median"]
    rows = [[f"PGD-{STEPS}", fmt(results["pgd_s"], ".2f"), fmt(results["pgd_accuracy"], ".1%")],
            ["FGSM", fmt(results["fgsm_s"], ".2f"), fmt(results["fgsm_accuracy"], ".1%")],
            ["clean", "", fmt(results["clean_accuracy"], ".1%")]]
    notes = [f"budget: PGD-{STEPS} on {SAMPLES:,} images within {BUDGET_S:.0f} s; median {pgd_s:.1f} s: "
             f"{'within' if pgd_s <= BUDGET_S else 'OVER'} budget" if not ctx.quick else
             "--quick: 200 images of a 20-step model: seconds, not figures"]
    return {"fresh_processes": True, "title": f"B11 attack cost on seed-cnn-fast, {samples:,} test images, eps {EPS}",
            "notes": notes, "columns": ["attack", "seconds", "accuracy left"], "rows": rows, "results": results,
            "within_budget": pgd_s <= BUDGET_S, "config": {"samples": samples, "eps": EPS, "steps": STEPS}}

"""B10: what DP-SGD costs in training speed: dp-cnn private against the same model trained normally.

Three sides, each nnlab.train on the dp-cnn recipe (tanh CNN, batch 2048, SGD) in a fresh process
(common.isolated), timed from outside by the optimizer-step clock (common.time_nnlab):
  - non-private: train.privacy.epsilon null (and lr 0.1): ordinary shuffled batches, one gradient
    per batch;
  - clipping only: DP-SGD with train.privacy.noise=false: Poisson batches, per-example gradients
    and clipping, no noise;
  - DP-SGD: the recipe as shipped (epsilon 3).
samples/s of the steady steps, median [min-max] over the repeats, and each side's ratio to the
non-private side. A breakdown, timed in one process on one fixed batch of 2,048 images, says what
dominates a private step: forward and backward with Opacus's per-example hooks, the per-example
clipping and summing (DPOptimizer.clip_and_accumulate), the noise (add_noise), against a plain
forward and backward.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from common import Ctx, fmt, isolated, median_ms, summarize, time_nnlab

RECIPE = "dp-cnn"
# Unclipped gradients need a smaller step than the recipe's 4.0 (sized for gradients clipped to 0.1).
SIDES = {"non-private": {"train.privacy.epsilon": None, "train.lr": 0.1},
         "clipping only (no noise)": {"train.privacy.noise": False},
         "DP-SGD (epsilon 3)": {}}
WARM, STEADY = 3, 20
QUICK = {"data.limit": 4096, "train.batch_size": 256}


def side(overrides: dict, warm: int, steady: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return time_nnlab(RECIPE, overrides, warm, steady, str(Path(tmp) / "run"))


def breakdown(quick: bool, reps: int = 5) -> dict:
    """Milliseconds (median of `reps`) of the parts of one step on a fixed batch."""
    from opacus.grad_sample import GradSampleHooks
    from opacus.optimizers import DPOptimizer

    from nnlab.config import load_config
    from nnlab.models import build_model
    from nnlab.train.privacy import check_model

    cfg = load_config(RECIPE)
    n = QUICK["train.batch_size"] if quick else cfg.train.batch_size
    torch.manual_seed(0)
    x, y = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))
    model = build_model(cfg.model)
    check_model(model)

    def ms(fn) -> float:
        return median_ms(fn, reps)

    def plain():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    out = {"forward + backward (non-private)": ms(plain)}
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.0,
                      max_grad_norm=cfg.train.privacy.max_grad_norm, expected_batch_size=n, loss_reduction="mean")

    def private():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    out["forward + backward with per-example gradients"] = ms(private)
    clip, noise = [], []
    for _ in range(reps):
        private()
        t0 = time.perf_counter()
        opt.clip_and_accumulate()
        t1 = time.perf_counter()
        opt.add_noise()
        clip.append(t1 - t0)
        noise.append(time.perf_counter() - t1)
    out["clip each example's gradient and sum (clip_and_accumulate)"] = sorted(clip)[reps // 2] * 1e3
    out["add the noise (add_noise)"] = sorted(noise)[reps // 2] * 1e3
    hooks.cleanup()
    return {"batch": n, "ms": out}


def run(ctx: Ctx) -> dict:
    warm, steady = (2, 3) if ctx.quick else (WARM, STEADY)
    extra = QUICK if ctx.quick else {}
    rates = {name: [] for name in SIDES}
    for _ in range(ctx.repeats):  # the sides in turn, so drift hits all alike
        for name, ov in SIDES.items():
            rates[name].append(isolated(ctx, side, {**extra, **ov}, warm, steady)["rate"])
    base = rates["non-private"]
    results, rows = {}, []
    for name, rs in rates.items():
        res = {"samples_per_s": summarize(rs), "ratio_vs_non_private": summarize(r / b for r, b in zip(rs, base))}
        results[name] = res
        rows.append([name, fmt(res["samples_per_s"]), fmt(res["ratio_vs_non_private"], ".2f", suffix="x")])
    parts = isolated(ctx, breakdown, ctx.quick)
    notes = [f"breakdown on one batch of {parts['batch']} (ms, median of 5): " +
             "; ".join(f"{k} {v:.1f}" for k, v in parts["ms"].items())]
    if ctx.quick:
        notes.append("--quick: 4,096 images, batch 256, 3 steady steps: seconds, not figures")
    return {"fresh_processes": True, "title": f"B10 DP-SGD training speed, {RECIPE}, fp32",
            "notes": notes, "columns": ["side", "samples/s", "ratio"], "rows": rows, "results": results,
            "breakdown": parts, "config": {"warm": warm, "steady": steady, "recipe": RECIPE, **extra}}

"""B2: time to 92% Fashion-MNIST test accuracy, nnlab's `fmnist-speedrun` recipe vs a careful plain loop.

Baseline (the issue's "careful plain-PyTorch baseline"): the article's CNN, standardised inputs,
AdamW (lr 3e-3, weight decay 0.01) with a one-cycle schedule over 8 epochs, batch 256, batches
sliced from in-memory tensors, the best precision the CPU runs natively (bf16 autocast only where
native), evaluated after every epoch; its time is the wall time until the first evaluation at or
above 92%, data loading included, evaluation time included.

nnlab: `nnlab.train("fmnist-speedrun")` for each seed; its time is the wall time of the whole
call (data loading, training, the one final evaluation, saving the run folder), and its accuracy
the final test accuracy. The target is a mean >= 92.0% over seeds.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import Ctx, fmt, summarize, train_quiet
from plain_cnn import Net

TARGET = 0.92


def baseline(ctx: Ctx, seed: int, epochs: int, limit: int | None) -> dict:
    from nnlab.data import load_images

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    d = load_images("fashion-mnist", limit=limit)
    xtr, ytr = d.normalize(d.x_train).to(ctx.device), d.y_train.to(ctx.device)
    xte, yte = d.normalize(d.x_test).to(ctx.device), d.y_test.to(ctx.device)
    model = Net().to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    steps_per_epoch = len(xtr) // 256
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    dtype = torch.bfloat16 if ctx.bf16 else None
    hit, accs = None, []
    for epoch in range(epochs):
        perm = torch.randperm(len(xtr), device=ctx.device)
        for i in range(steps_per_epoch):
            idx = perm[i * 256 : (i + 1) * 256]
            with torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            acc = sum((model(xte[j : j + 1000]).argmax(1) == yte[j : j + 1000]).sum().item()
                      for j in range(0, len(xte), 1000)) / len(xte)
        accs.append(acc)
        if hit is None and acc >= TARGET:
            hit = time.perf_counter() - t0
            break  # the clock stops here; the rest of the schedule would only cost time
    return {"seconds_to_92": hit, "accuracies": accs, "seconds": time.perf_counter() - t0}


def nnlab_run(seed: int, limit: int | None, out: Path) -> dict:
    ov = {"train.seed": seed, **({"data.limit": limit, "train.epochs": 1} if limit else {})}
    t0 = time.perf_counter()
    s = train_quiet("fmnist-speedrun", ov, str(out))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "test_accuracy": s["test_accuracy"], "train_seconds": s["train_seconds"]}


def run(ctx: Ctx) -> dict:
    seeds = [0] if ctx.quick else [0, 1, 2, 3, 4]
    limit = 2048 if ctx.quick else None
    base_seeds = seeds[:1] if ctx.quick else seeds[: max(1, min(3, ctx.repeats))]
    base = [baseline(ctx, s, 1 if ctx.quick else 8, limit) for s in base_seeds]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [nnlab_run(s, limit, Path(tmp) / f"s{s}") for s in seeds]
    base_t = [b["seconds_to_92"] for b in base if b["seconds_to_92"] is not None]
    mean_acc = statistics.mean(r["test_accuracy"] for r in runs)
    res = {
        "baseline_seconds_to_92": summarize(base_t) if base_t else None,
        "baseline_runs": base,
        "nnlab_seconds": summarize([r["seconds"] for r in runs]),
        "nnlab_mean_accuracy": mean_acc,
        "nnlab_runs": runs,
        "target_met_accuracy": mean_acc >= TARGET,
    }
    if base_t:
        res["time_ratio"] = res["nnlab_seconds"]["median"] / res["baseline_seconds_to_92"]["median"]
    rows = [
        ["plain baseline: time to first >= 92%", fmt(res["baseline_seconds_to_92"], ",.1f"),
         " ".join(f"{b['accuracies'][-1]:.4f}" for b in base)],
        [f"nnlab fmnist-speedrun, {len(seeds)} seeds", fmt(res["nnlab_seconds"], ",.1f"),
         f"mean {mean_acc:.4f}, min {min(r['test_accuracy'] for r in runs):.4f}"],
    ]
    notes = ["wall time includes data loading; the baseline's includes its per-epoch evaluations up to the "
             "first >= 92%, nnlab's its one final evaluation and writing the run folder"]
    if "time_ratio" in res:
        notes.append(f"time ratio nnlab / baseline: {res['time_ratio']:.2f}x (target <= 0.5x); mean accuracy "
                     f"{'meets' if res['target_met_accuracy'] else 'misses'} 92.0%")
    else:
        notes.append("the baseline never reached 92% in this run (quick mode trains 1 epoch on 2,048 images)")
    res.update(title=f"B2 time to 92% Fashion-MNIST test accuracy ({'bf16' if ctx.bf16 else 'fp32'} where "
                     f"the baseline runs natively)", columns=["side", "wall s", "test accuracy"], rows=rows,
               notes=notes)
    return res

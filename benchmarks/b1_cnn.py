"""B1: seed-cnn training throughput, nnlab's loop vs the article's plain loop, side by side.

Both sides train the same CNN (421,642 parameters) on the same normalised Fashion-MNIST tensors
with batch 64 and SGD lr 0.01. The baseline is benchmarks/plain_cnn.py's loop, written the way
the article writes it: a DataLoader over a TensorDataset, fp32. nnlab runs its `seed-cnn` recipe
through nnlab.train, first as shipped (fp32), then with the switches that keep
model, batch and optimizer: channels_last, and channels_last + precision=auto (bf16 autocast only
where the hardware has it natively); then that last variant again with ATen in place of nnlab's
own kernels (nnlab.kernels: the fused conv1 + pool + ReLU block, conv2 + pool + ReLU with its weight
gradient from the pooled gradient, the 2x2 pool), so their share shows in the same run.

Every run is a fresh process (common.isolated), as a user's script would be. After the timing,
3 epochs of the plain loop and of the fastest eager variant compare test accuracy.
Steady state = the steps after the first `warm` (timed separately, as warm-up). Repeats run the
variants in turn (plain, nnlab, ..., plain, nnlab, ...) so drift hits every side alike.
MFU counts the conv/fc multiply-adds: 2 FLOPs each, x3 for forward + backward (a direct
convolution's count: in fp32 nnlab convolves by Winograd's F(2x2, 3x3), with fewer).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from common import (Ctx, attempt, auto_note, conv_fc_macs, isolated, keep, kernels_off, time_nnlab, timed,
                    train_quiet, training_table)
from plain_cnn import Net

from nnlab import kernels

NNLAB = [
    ("nnlab seed-cnn (recipe as shipped)", {}),
    ("nnlab + channels_last", {"train.channels_last": True}),
    ("nnlab + channels_last + precision=auto", {"train.channels_last": True, "train.precision": "auto"}),
]
# The same as the last, with ATen in place of nnlab's own kernels: their share of the speed-up.
ATEN_ONLY = ("nnlab + channels_last + auto, ATen only (NNLAB_NO_KERNELS=1)",
             {"train.channels_last": True, "train.precision": "auto"})


def time_nnlab_aten_only(*args) -> dict:
    kernels_off()
    return time_nnlab(*args)


def plain(device: str, warm: int, steady: int, limit: int | None) -> dict:
    """The article's loop, timed at step boundaries; nothing in it is changed for the benchmark."""
    from torch.utils.data import DataLoader, TensorDataset

    from nnlab.data import load_images

    t0 = time.perf_counter()
    d = load_images("fashion-mnist", limit=limit)
    loader = DataLoader(TensorDataset(d.normalize(d.x_train), d.y_train), batch_size=64, shuffle=True)
    device = torch.device(device)
    model = Net().to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    setup_s = time.perf_counter() - t0

    def epochs():  # a fresh shuffle every pass, as `for epoch ...: for inputs, labels in loader` does
        while True:
            yield from loader

    batches = epochs()

    def step():
        inputs, labels = next(batches)
        inputs, labels = inputs.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()

    warm_s = timed(step, warm, device)
    steady_s = timed(step, steady, device)
    return {"rate": steady * 64 / steady_s, "warmup_s": warm_s, "setup_s": setup_s, "precision": "fp32"}


def plain_accuracy(epochs: int, limit: int | None) -> dict:
    import plain_cnn

    return plain_cnn.main(["--epochs", str(epochs)] + (["--limit", str(limit)] if limit else []))


def run(ctx: Ctx) -> dict:
    warm, steady = ctx.steps(3, 10), ctx.steps(10, 400)  # long windows: bursts of noise average out
    limit = 2048 if ctx.quick else None  # quick: read fewer images; full: the whole training set
    flops = 3 * 2 * conv_fc_macs(Net(), torch.zeros(1, 1, 28, 28))  # per training sample
    variants = list(NNLAB) + [ATEN_ONLY]
    if not ctx.quick:  # a cold compile costs tens of seconds; warm-up reports it apart
        variants += [("nnlab + compile", {"train.compile": True}),
                     ("nnlab + compile + channels_last + precision=auto",
                      {"train.compile": True, "train.channels_last": True, "train.precision": "auto"})]
    names = ["plain loop (article: DataLoader, fp32)"] + [n for n, _ in variants]
    raw, errors = {n: [] for n in names}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(ctx.repeats):
            raw[names[0]].append(isolated(ctx, plain, ctx.device.type, warm, steady, limit))
            for i, (name, ov) in enumerate(variants):
                ov = {**ov, **({"data.limit": limit} if limit else {})}
                out = str(Path(tmp) / f"{i}-{r}")
                fn = time_nnlab_aten_only if name == ATEN_ONLY[0] else time_nnlab
                keep(raw, name, attempt(lambda: isolated(ctx, fn, "seed-cnn", ov, warm, steady, out), errors, name))
        # The fastest switches must not cost accuracy: 3 epochs of each, test accuracy side by side.
        epochs = 1 if ctx.quick else 3
        acc_ov = {**dict(NNLAB[-1][1]), "train.epochs": epochs, **({"data.limit": limit} if limit else {})}
        acc = {"plain": isolated(ctx, plain_accuracy, epochs, limit),
               "nnlab": isolated(ctx, train_quiet, "seed-cnn", acc_ov, str(Path(tmp) / "acc"))}
    results, rows, crosscheck = training_table(ctx, raw, errors, flops, "samples")
    gap = acc["nnlab"]["test_accuracy"] - acc["plain"]["test_accuracy"]
    results["accuracy_after_epochs"] = {"epochs": epochs, "plain": acc["plain"]["test_accuracy"],
                                        "nnlab": acc["nnlab"]["test_accuracy"], "nnlab_variant": NNLAB[-1][0],
                                        "nnlab_precision": acc["nnlab"]["precision"], "gap_points": 100 * gap}
    return {
        "fresh_processes": True,  # every side ran in a process of its own (common.isolated)
        "title": f"B1 seed-cnn training throughput: batch 64, SGD lr 0.01, {warm} warm-up + {steady} timed steps",
        "notes": [f"model FLOPs per training sample: {flops / 1e6:.1f} M (3 x 2 x conv/fc multiply-adds, as a direct "
                  "convolution does them; nnlab's fp32 Winograd convolution does fewer, so its MFU may pass 100%)",
                  "ratio = samples/s over the plain loop's in the same repeat; warm-up = first "
                  f"{warm} steps; setup = data loading and model building before the first step",
                  auto_note(results[NNLAB[-1][0]]), crosscheck, f"nnlab's kernels: {kernels.status()['why']}",
                  f"test accuracy after {epochs} epoch(s), one seed each: plain loop "
                  f"{100 * acc['plain']['test_accuracy']:.2f}%, {NNLAB[-1][0]} ({acc['nnlab']['precision']}) "
                  f"{100 * acc['nnlab']['test_accuracy']:.2f}% ({100 * gap:+.2f} points)"],
        "columns": ["variant", "precision", "samples/s", "ratio", "MFU", "warm-up s", "setup s"],
        "rows": rows,
        "config": {"warm_steps": warm, "steady_steps": steady, "data_limit": limit, "flops_per_sample": flops},
        "results": results,
    }

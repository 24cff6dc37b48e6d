"""B1's or B3's fp32 rows on an AVX-512 machine with every library held to AVX2 code: an emulation
of an AVX2-only CPU's code paths (not of its caches, clocks or memory), for when none is at hand.

    python benchmarks/avx2_emulation.py [--bench B1|B3] [--repeats 5] [--accuracy-epochs 3]

Each side runs in a fresh process (as in B1) with ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2,
MKL_ENABLE_INSTRUCTIONS=AVX2 and NNLAB_KERNELS_MARCH=x86-64-v3. Only fp32 variants: without
AVX-512 bf16 runs oneDNN's slow reference code, which B1 measures on real AVX2 machines anyway.
The fp32 matmul peak (MFU's denominator) is measured before and after the runs, and the higher of the
two is used: on a busy host one measurement alone can come out low and push MFU past 100%. MFU
counts the model's direct-convolution multiply-adds; nnlab's fp32 Winograd convolution does fewer
(16 multiplies per 2x2 outputs instead of 36), so B1's MFU can pass 100% without any error.
With --accuracy-epochs, B1 also trains the plain loop and nnlab + channels_last for that many epochs
and prints their test accuracy (B1's target: within 1 point).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "NNLAB_KERNELS_MARCH": "x86-64-v3"}
os.environ.update(AVX2)  # before torch loads, here and in every subprocess (they inherit it)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import b1_cnn  # noqa: E402
import b3_gpt  # noqa: E402
from common import (Ctx, conv_fc_macs, fmt, gpt_train_flops_per_token, isolated, matmul_peak,  # noqa: E402
                    positive_int, summarize, time_nnlab, train_quiet)
from plain_cnn import Net  # noqa: E402

from nnlab.models.gpt import GPT, GPTConfig  # noqa: E402

# Per benchmark: the plain loop (name, function, its arguments after the device), nnlab's recipe,
# its variants (name, overrides, timing function), steps (warm-up, timed), FLOPs per item and unit.
BENCH = {
    "B1": dict(plain=("plain loop (article: DataLoader, fp32)", b1_cnn.plain, (10, 400, None)), recipe="seed-cnn",
               variants=[("nnlab seed-cnn (recipe as shipped, fp32)", {}, time_nnlab),
                         ("nnlab + channels_last (fp32)", {"train.channels_last": True}, time_nnlab),
                         ("nnlab + channels_last, ATen only (NNLAB_NO_KERNELS=1)", {"train.channels_last": True},
                          b1_cnn.time_nnlab_aten_only)],
               steps=(10, 400), flops=lambda: 3 * 2 * conv_fc_macs(Net(), torch.zeros(1, 1, 28, 28)), unit="samples"),
    "B3": dict(plain=("plain loop (nanoGPT-style, fp32)", b3_gpt.plain, (10, 100)), recipe="gpt-shakespeare",
               # Compiled code goes to inductor's cache folder for this capability, not the plain one
               # (nnlab.train.compile.separate_inductor_cache says why: they must not mix).
               variants=[("nnlab gpt-shakespeare (fp32, as shipped)", {}, time_nnlab),
                         ("nnlab + compile (fp32)", {"train.compile": True}, time_nnlab)],
               steps=(10, 100), flops=lambda: gpt_train_flops_per_token(GPT(GPTConfig(vocab_size=65)), b3_gpt.BLOCK),
               unit="tokens"),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bench", choices=sorted(BENCH), default="B1")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--accuracy-epochs", type=positive_int, help="B1: also compare test accuracy after N epochs")
    args = p.parse_args(argv)
    if args.accuracy_epochs and args.bench != "B1":
        p.error("--accuracy-epochs: only B1 compares test accuracy")
    b = BENCH[args.bench]
    ctx = Ctx(quick=False, repeats=args.repeats, device=torch.device("cpu"),
              machine={"threads": torch.get_num_threads()})
    peaks = [matmul_peak(torch.float32, 2048, ctx.device) * 1e9]  # under the same settings: MFU's denominator
    flops = b["flops"]()  # per training sample (B1) or token (B3), as the benchmark counts them
    plain_name, plain_fn, plain_args = b["plain"]
    extra = {"data.path": str(b3_gpt.text_path()), "train.eval_iters": 1} if args.bench == "B3" else {}
    raw = {plain_name: [], **{n: [] for n, _, _ in b["variants"]}}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # in turn, so drift hits every side alike
            raw[plain_name].append(isolated(ctx, plain_fn, "cpu", *plain_args)["rate"])
            for i, (name, ov, fn) in enumerate(b["variants"]):
                raw[name].append(isolated(ctx, fn, b["recipe"], {**extra, **ov}, *b["steps"], f"{tmp}/{i}-{r}")["rate"])
        peaks.append(matmul_peak(torch.float32, 2048, ctx.device) * 1e9)
        if args.bench == "B1" and args.accuracy_epochs:
            n = args.accuracy_epochs
            acc = (isolated(ctx, b1_cnn.plain_accuracy, n, None)["test_accuracy"],
                   isolated(ctx, train_quiet, "seed-cnn", {"train.channels_last": True, "train.epochs": n},
                            f"{tmp}/acc")["test_accuracy"])
    peak = max(peaks)
    print("# " + " ".join(f"{k}={v}" for k, v in AVX2.items()) + f"; ATen's CPU capability here: "
          f"{torch.backends.cpu.get_cpu_capability()}; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s (the higher of "
          f"{peaks[0] / 1e9:.0f} before and {peaks[1] / 1e9:.0f} after the runs)")
    for name, rates in raw.items():
        ratios = [x / y for x, y in zip(rates, raw[plain_name])]
        mfu = summarize([r * flops / peak for r in rates])
        print(f"{name:55s} {fmt(summarize(rates))} {b['unit']}/s  ratio {fmt(summarize(ratios), '.2f', suffix='x')}  "
              f"MFU {fmt(mfu, '.1%')}")
        if name != plain_name:  # a median can hide how often a target is missed
            print("    ratio per repeat: " + " ".join(f"{r:.2f}" for r in ratios))
    if args.bench == "B1" and args.accuracy_epochs:
        print(f"test accuracy after {args.accuracy_epochs} epoch(s), one seed each: plain loop {100 * acc[0]:.2f}%, "
              f"nnlab + channels_last (fp32) {100 * acc[1]:.2f}% ({100 * (acc[1] - acc[0]):+.2f} points)")


if __name__ == "__main__":
    main()

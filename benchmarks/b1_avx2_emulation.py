"""B1's fp32 rows on an AVX-512 machine with every library held to AVX2 code: an emulation of an
AVX2-only CPU's code paths (not of its caches, clocks or memory), for when none is at hand.

    python benchmarks/b1_avx2_emulation.py [--repeats 5]

Each side runs in a fresh process (as in B1) with ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2,
MKL_ENABLE_INSTRUCTIONS=AVX2 and NNLAB_KERNELS_MARCH=x86-64-v3. Only fp32 variants: without
AVX-512 bf16 runs oneDNN's slow reference code, which B1 measures on real AVX2 machines anyway.
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

from b1_cnn import plain, time_nnlab_aten_only  # noqa: E402
from common import Ctx, conv_fc_macs, fmt, isolated, matmul_peak, summarize, time_nnlab  # noqa: E402
from plain_cnn import Net  # noqa: E402

PLAIN = "plain loop (article: DataLoader, fp32)"
VARIANTS = [("nnlab seed-cnn (recipe as shipped, fp32)", {}, time_nnlab),
            ("nnlab + channels_last (fp32)", {"train.channels_last": True}, time_nnlab),
            ("nnlab + channels_last, ATen only (NNLAB_NO_KERNELS=1)", {"train.channels_last": True},
             time_nnlab_aten_only)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    ctx = Ctx(quick=False, repeats=args.repeats, device=torch.device("cpu"),
              machine={"threads": torch.get_num_threads()})
    peak = matmul_peak(torch.float32, 2048, ctx.device) * 1e9  # under the same settings, as MFU's denominator
    flops = 3 * 2 * conv_fc_macs(Net(), torch.zeros(1, 1, 28, 28))  # per training sample, as B1 counts them
    print("# " + " ".join(f"{k}={v}" for k, v in AVX2.items()) + f"; ATen's CPU capability here: "
          f"{torch.backends.cpu.get_cpu_capability()}; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    raw = {PLAIN: [], **{n: [] for n, _, _ in VARIANTS}}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # in turn, so drift hits every side alike
            raw[PLAIN].append(isolated(ctx, plain, "cpu", 10, 400, None)["rate"])
            for i, (name, ov, fn) in enumerate(VARIANTS):
                raw[name].append(isolated(ctx, fn, "seed-cnn", ov, 10, 400, f"{tmp}/{i}-{r}")["rate"])
    for name, rates in raw.items():
        ratio = summarize([a / b for a, b in zip(rates, raw[PLAIN])])
        mfu = summarize([r * flops / peak for r in rates])
        print(f"{name:55s} {fmt(summarize(rates))} samples/s  ratio {fmt(ratio, '.2f', suffix='x')}  "
              f"MFU {fmt(mfu, '.1%')}")


if __name__ == "__main__":
    main()

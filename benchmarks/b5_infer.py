"""B5: inference, batch-1 latency and batch-256 throughput, eager vs torch.compile vs bf16 autocast.

Two models: seed-cnn (the article's CNN, 28x28 images) and the baby GPT (4 layers, 4 heads, 128
wide, block 64; one "sample" is a 64-token sequence). Each variant runs under
torch.inference_mode in eval mode; bf16 autocast only where the hardware has bf16 natively.
torch.compile specialises on shape (dynamic=False), so batch 1 and batch 256 compile separately;
the first call of each shape is reported apart ("first calls") and includes the compilation.
--quick compiles seed-cnn only: a cold compile of the GPT alone would take it past its budget.
Latency = the median of single timed calls; throughput = items over the time of back-to-back calls.
MFU at batch 256 counts forward FLOPs only: 2 x conv/fc multiply-adds per image; 2N + 4*L*C*T
per token for the GPT (nanoGPT's training estimate / 3).
"""

from __future__ import annotations

import contextlib
import statistics

import torch

from common import Ctx, conv_fc_macs, fmt, gpt_forward_flops, summarize, timed
from plain_cnn import Net
from nnlab.models import build_model
from nnlab.models.gpt import PRESETS

BIG = 256


def models(ctx: Ctx):
    """(name, model, input of batch b, items per sample, unit, forward FLOPs per item, compile in --quick)."""
    torch.manual_seed(0)
    cnn = build_model("seed-cnn").to(ctx.device).eval()
    gpt = build_model("gpt", vocab_size=65, **PRESETS["baby"]).to(ctx.device).eval()
    T = gpt.cfg.block_size
    # FLOPs counted on the article's plain Net (the same layers): nnlab's fused kernels bypass the
    # Conv2d modules' forward, which the count hooks into.
    yield ("seed-cnn", cnn, lambda b: torch.randn(b, 1, 28, 28, device=ctx.device), 1, "images/s",
           2 * conv_fc_macs(Net(), torch.zeros(1, 1, 28, 28)), True)
    yield ("gpt baby", gpt, lambda b: torch.randint(0, 65, (b, T), device=ctx.device), T, "tokens/s",
           gpt_forward_flops(gpt, [T] * T) / T, False)


def run(ctx: Ctx) -> dict:
    n1, nbig = (10, 2) if ctx.quick else (50, 5)
    autocast = lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16)
    rows, results, skipped = [], {}, []
    for mname, model, make, per, unit, flops, quick_compile in models(ctx):
        x1, xbig = make(1), make(BIG)
        variants = {"eager fp32": (model, contextlib.nullcontext, "fp32")}
        if ctx.quick and not quick_compile:
            skipped.append(f"{mname} torch.compile: skipped in --quick (a cold compile takes ~20 s on 2 cores)")
        else:
            variants["torch.compile fp32"] = (torch.compile(model, dynamic=False), contextlib.nullcontext, "fp32")
        if ctx.bf16:
            variants["eager bf16 autocast"] = (model, autocast, "bf16")
        first = {}
        with torch.inference_mode():
            for vname, (fn, cast, _) in list(variants.items()):
                try:
                    with cast():  # first call of each shape: compilation, kernel selection, allocation
                        first[vname] = timed(lambda: fn(x1), 1, ctx.device) + timed(lambda: fn(xbig), 1, ctx.device)
                        for _ in range(2):
                            fn(x1), fn(xbig)
                except Exception as e:  # e.g. torch.compile without a working C compiler
                    del variants[vname]
                    skipped.append(f"{mname} {vname}: failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
            lat, thr = {v: [] for v in variants}, {v: [] for v in variants}
            for _ in range(ctx.repeats):  # variants in turn within each repeat, so drift hits all alike
                for vname, (fn, cast, _) in variants.items():
                    with cast():
                        lat[vname].append(statistics.median(timed(lambda: fn(x1), 1, ctx.device) for _ in range(n1)))
                        thr[vname].append(nbig * BIG * per / timed(lambda: fn(xbig), nbig, ctx.device))
        for vname, (_, _, prec) in variants.items():
            res = {"precision": prec, "latency_b1_ms": summarize(s * 1e3 for s in lat[vname]),
                   f"throughput_b{BIG}": summarize(thr[vname]), "unit": unit,
                   "ratio_vs_eager": summarize(a / b for a, b in zip(thr[vname], thr["eager fp32"])),
                   "latency_ratio_vs_eager": summarize(b / a for a, b in zip(lat[vname], lat["eager fp32"])),
                   "mfu": summarize(r * flops / ctx.peak(prec) for r in thr[vname]), "first_calls_s": first[vname]}
            results[f"{mname} / {vname}"] = res
            rows.append([mname, vname, fmt(res["latency_b1_ms"], ".2f"), fmt(res["latency_ratio_vs_eager"], ".2f", suffix="x"),
                         fmt(res[f"throughput_b{BIG}"]) + " " + unit.split("/")[0], fmt(res["ratio_vs_eager"], ".2f", suffix="x"),
                         fmt(res["mfu"], ".1f", 100, "%"), f"{first[vname]:.2f}"])
        if not ctx.bf16:
            rows.append([mname, "eager bf16 autocast", "skipped: no native bf16", "", "", "", "", ""])
    notes = ["latency ratio = eager latency / this latency; throughput ratio = this / eager (higher is faster)",
             "first calls = the first batch-1 plus the first batch-256 call (for compile: the compilations)",
             f"MFU at batch {BIG}, against the measured peak of the precision used"] + skipped
    if not ctx.bf16:
        notes.append(f"bf16: skipped: no native bf16 ({ctx.machine['native_bf16_reason']})")
    return {
        "title": f"B5 inference: batch-1 latency ({n1} calls) and batch-{BIG} throughput ({nbig} calls)",
        "notes": notes,
        "columns": ["model", "variant", "b1 latency ms", "ratio", f"b{BIG} throughput", "ratio", "MFU", "first calls s"],
        "rows": rows,
        "config": {"latency_calls": n1, "throughput_calls": nbig, "big_batch": BIG},
        "results": results,
    }

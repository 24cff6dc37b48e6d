"""B5: inference, batch-1 latency and batch-256 throughput, eager vs torch.compile vs bf16 autocast.

Two models: seed-cnn (the article's CNN, 28x28 images) and the baby GPT gpt-shakespeare trains (4
layers, 4 heads, 128 wide, block 64; one "sample" is a 64-token sequence). Each variant of each
model runs in a fresh process (common.isolated), under torch.inference_mode in eval mode; bf16
autocast only where the hardware has bf16 natively.
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

from common import Ctx, conv_fc_macs, fmt, gpt_forward_flops, isolated, recipe_gpt_fields, summarize, timed
from plain_cnn import Net
from nnlab.models import build_model
from nnlab.models.gpt import GPT, GPTConfig

BIG = 256
VARIANTS = {"eager fp32": "fp32", "torch.compile fp32": "fp32", "eager bf16 autocast": "bf16"}


def build(name: str, device: torch.device):
    """(model, input of batch b, items per sample, unit, forward FLOPs per item) of one of the two models."""
    torch.manual_seed(0)
    if name == "seed-cnn":
        # FLOPs counted on the article's plain Net (the same layers): nnlab's fused kernels bypass the
        # Conv2d modules' forward, which the count hooks into.
        return (build_model("seed-cnn").to(device).eval(), lambda b: torch.randn(b, 1, 28, 28, device=device), 1,
                "images/s", 2 * conv_fc_macs(Net(), torch.zeros(1, 1, 28, 28)))
    gpt = GPT(GPTConfig(**{"vocab_size": 65, "dropout": 0.0, **recipe_gpt_fields("gpt-shakespeare")})).to(device).eval()
    T = gpt.cfg.block_size
    return (gpt, lambda b: torch.randint(0, 65, (b, T), device=device), T, "tokens/s",
            gpt_forward_flops(gpt, [T] * T) / T)


def infer_side(device: str, name: str, variant: str, n1: int, nbig: int) -> dict:
    """One variant of one model in its own process: first calls, then batch-1 latency and batch-BIG throughput."""
    device = torch.device(device)
    model, make, per, _, _ = build(name, device)
    fn = torch.compile(model, dynamic=False) if variant.startswith("torch.compile") else model
    cast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if "bf16" in variant else contextlib.nullcontext
    x1, xbig = make(1), make(BIG)
    with torch.inference_mode(), cast():
        # The first call of each shape: compilation, kernel selection, allocation.
        first = timed(lambda: fn(x1), 1, device) + timed(lambda: fn(xbig), 1, device)
        for _ in range(2):
            fn(x1), fn(xbig)
        latency = statistics.median(timed(lambda: fn(x1), 1, device) for _ in range(n1))
        throughput = nbig * BIG * per / timed(lambda: fn(xbig), nbig, device)
    return {"latency_s": latency, "throughput": throughput, "first_calls_s": first}


def run(ctx: Ctx) -> dict:
    n1, nbig = (10, 2) if ctx.quick else (50, 5)
    rows, results, skipped = [], {}, []
    for mname, label in (("seed-cnn", "seed-cnn"), ("gpt-shakespeare", "gpt baby")):
        _, _, _, unit, flops = build(mname, torch.device("cpu"))
        variants = [v for v in VARIANTS if ctx.bf16 or VARIANTS[v] != "bf16"]
        if ctx.quick and mname != "seed-cnn":
            variants.remove("torch.compile fp32")
            skipped.append(f"{label} torch.compile: skipped in --quick (a cold compile takes tens of seconds)")
        raw, errors = {v: [] for v in variants}, {}
        for _ in range(ctx.repeats):  # variants in turn within each repeat, so drift hits all alike
            for v in variants:
                if v in errors:
                    continue
                try:
                    raw[v].append(isolated(ctx, infer_side, ctx.device.type, mname, v, n1, nbig))
                except RuntimeError as e:  # e.g. torch.compile without a working C compiler
                    errors[v] = str(e).splitlines()[0][:120]
        for v, msg in errors.items():
            skipped.append(f"{label} {v}: failed ({msg})")
        eager = raw["eager fp32"]
        for v in variants:
            if v in errors:
                continue
            xs, prec = raw[v], VARIANTS[v]
            res = {"precision": prec, "latency_b1_ms": summarize(x["latency_s"] * 1e3 for x in xs),
                   f"throughput_b{BIG}": summarize(x["throughput"] for x in xs), "unit": unit,
                   "ratio_vs_eager": summarize(x["throughput"] / e["throughput"] for x, e in zip(xs, eager)),
                   "latency_ratio_vs_eager": summarize(e["latency_s"] / x["latency_s"] for x, e in zip(xs, eager)),
                   "mfu": summarize(x["throughput"] * flops / ctx.peak(prec) for x in xs),
                   "first_calls_s": xs[0]["first_calls_s"]}
            results[f"{label} / {v}"] = res
            rows.append([label, v, fmt(res["latency_b1_ms"], ".2f"), fmt(res["latency_ratio_vs_eager"], ".2f", suffix="x"),
                         fmt(res[f"throughput_b{BIG}"]) + " " + unit.split("/")[0], fmt(res["ratio_vs_eager"], ".2f", suffix="x"),
                         fmt(res["mfu"], ".1f", 100, "%"), f"{res['first_calls_s']:.2f}"])
        if not ctx.bf16:
            rows.append([label, "eager bf16 autocast", "skipped: no native bf16", "", "", "", "", ""])
    notes = ["each variant of each model runs in a fresh process (common.isolated), the variants in turn",
             "latency ratio = eager latency / this latency; throughput ratio = this / eager (higher is faster)",
             "first calls = the first batch-1 plus the first batch-256 call (for compile: the compilations), "
             "from the first repeat",
             f"MFU at batch {BIG}, against the measured peak of the precision used"] + skipped
    if not ctx.bf16:
        notes.append(f"bf16: skipped: no native bf16 ({ctx.machine['native_bf16_reason']})")
    return {
        "fresh_processes": True,  # every side ran in a process of its own (common.isolated)
        "title": f"B5 inference: batch-1 latency ({n1} calls) and batch-{BIG} throughput ({nbig} calls)",
        "notes": notes,
        "columns": ["model", "variant", "b1 latency ms", "ratio", f"b{BIG} throughput", "ratio", "MFU", "first calls s"],
        "rows": rows,
        "config": {"latency_calls": n1, "throughput_calls": nbig, "big_batch": BIG},
        "results": results,
    }

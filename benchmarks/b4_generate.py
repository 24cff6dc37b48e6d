"""B4: sampling with the KV cache vs recomputing the whole context for every new token.

nnlab.generate.generate(use_cache=True) prefills the prompt once and then feeds one token per step
through GPT.decode_step (functional calls over a preallocated cache);
use_cache=False reruns the model on the whole context each step (nanoGPT's sample.py). Both
produce 500 new tokens from the same prompt under greedy decoding (temperature 0), and the tokens
must be identical: the check is printed and stored. The model is a randomly initialised GPT
(4 layers, 4 heads, 128 wide) with block_size 1024 >= prompt + 500, because generate() falls back
to recomputation once the sequence outgrows block_size; random weights cost the same as trained ones.

MFU counts the model FLOPs of cached decoding (each position's forward once: 2N + 4*L*C*t for a
token with t keys), the same for both paths, so the recompute path's extra work shows as lower
MFU; `hfu_recompute` in the JSON counts the work it actually does.
"""

from __future__ import annotations

import time

import torch

from common import Ctx, fmt, gpt_forward_flops, summarize, sync
from nnlab.generate import generate
from nnlab.models.gpt import GPT, GPTConfig

NEW, PROMPT = 500, 16


def run(ctx: Ctx) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, n_layer=4, n_head=4, n_embd=128, block_size=1024)).to(ctx.device)
    prompt = torch.randint(0, 65, (1, PROMPT), device=ctx.device)
    paths = {"KV cache (use_cache=True)": True, "recompute context (use_cache=False)": False}

    def sample(use_cache: bool, n: int):
        sync(ctx.device)
        t0 = time.perf_counter()
        out = generate(model, prompt, n, temperature=0.0, use_cache=use_cache)
        sync(ctx.device)
        return out, time.perf_counter() - t0

    warm = {name: sample(uc, 8)[1] for name, uc in paths.items()}  # first calls, timed apart
    seconds = {name: [] for name in paths}
    identical = []
    for _ in range(ctx.repeats):
        outs = {}
        for name, uc in paths.items():
            outs[name], s = sample(uc, NEW)
            seconds[name].append(s)
        identical.append(torch.equal(*outs.values()))

    model_flops = gpt_forward_flops(model, range(1, PROMPT + NEW))  # positions 0..P+NEW-2, each once
    recompute_flops = sum(gpt_forward_flops(model, range(1, t + 1)) for t in range(PROMPT, PROMPT + NEW))
    cache = list(paths)[0]
    results, rows = {}, []
    for name in paths:
        res = {"tokens_per_s": summarize(NEW / s for s in seconds[name]),
               "ratio_vs_recompute": summarize(b / s for s, b in zip(seconds[name], seconds[list(paths)[1]])),
               "mfu": summarize(model_flops / s / ctx.peak("fp32") for s in seconds[name]),
               "warmup_s": warm[name]}
        results[name] = res
        rows.append([name, fmt(res["tokens_per_s"]), fmt(res["ratio_vs_recompute"], ".2f", suffix="x"),
                     fmt(res["mfu"], ".2f", 100, "%"), f"{warm[name]:.2f}"])
    results[list(paths)[1]]["hfu_recompute"] = summarize(recompute_flops / s / ctx.peak("fp32")
                                                         for s in seconds[list(paths)[1]])
    ok = all(identical)
    return {
        "title": f"B4 sampling {NEW} new tokens after a {PROMPT}-token prompt, batch 1, greedy, fp32",
        "notes": [f"greedy tokens identical (cache vs recompute), every repeat: {ok}",
                  "model: random-init GPT n_layer 4, n_head 4, n_embd 128, block_size 1024 (speed does not "
                  "depend on the weights)",
                  f"model FLOPs of the {NEW} tokens: {model_flops / 1e9:.2f} G; recomputing does "
                  f"{recompute_flops / 1e9:.1f} G; warm-up = an 8-token call per path, before timing"],
        "columns": ["path", "tokens/s", "ratio", "MFU", "warm-up s"],
        "rows": rows,
        "greedy_identical": ok,
        "config": {"new_tokens": NEW, "prompt_tokens": PROMPT, "n_layer": 4, "n_head": 4, "n_embd": 128,
                   "block_size": 1024, "weights": "random init (seed 0)"},
        "results": results,
        "cache_speedup": results[cache]["ratio_vs_recompute"],
    }

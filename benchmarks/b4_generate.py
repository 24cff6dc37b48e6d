"""B4: sampling with the KV cache vs recomputing the whole context for every new token.

nnlab.generate.generate(use_cache=True) prefills the prompt once and then feeds one token per step
through GPT.decode_step (functional calls over a preallocated cache); use_cache=False reruns the
model on the whole context, cropped to its last block_size tokens, each step (nanoGPT's
sample.py). Both produce 500 new tokens from the same prompt under greedy decoding (temperature
0), and the tokens must be identical: the check is printed and stored.

Two models, both randomly initialised (random weights cost the same as trained ones):
  - a GPT (4 layers, 4 heads, 128 wide) with block_size 1024 >= prompt + 500, so the cache holds
    every token and recomputing costs the most;
  - the model the gpt-shakespeare recipe ships (block_size 64): once the sequence outgrows 64
    tokens, the cache cannot slide (nnlab.generate says why) and both paths recompute the last 64
    positions, so this row shows what the cache is worth on the model a user trains.
Each side runs in a fresh process (common.isolated), repeats in turn.

MFU counts the model FLOPs of cached decoding (each position's forward once: 2N + 4*L*C*t for a
token with t keys, t at most block_size), the same for both paths, so extra work shows as lower
MFU; `hfu_recompute` in the JSON counts the work recomputation actually does.
"""

from __future__ import annotations

import time

import torch

from common import Ctx, fmt, gpt_forward_flops, isolated, recipe_gpt_fields, summarize, sync
from nnlab.generate import generate
from nnlab.models.gpt import GPT, GPTConfig

NEW, PROMPT, VOCAB = 500, 16, 65  # VOCAB: Tiny Shakespeare's characters
QUICK_NEW = 120  # --quick: still past gpt-shakespeare's 64-token context, so both of its paths run
PATHS = {"KV cache (use_cache=True)": True, "recompute context (use_cache=False)": False}


def model_configs() -> dict:
    """key -> (label, GPTConfig fields) of the two models B4 samples from."""
    return {"random-1024": ("random GPT, block_size 1024", dict(n_layer=4, n_head=4, n_embd=128, block_size=1024)),
            "gpt-shakespeare": ("gpt-shakespeare's model, block_size 64", recipe_gpt_fields("gpt-shakespeare"))}


def sample_side(device: str, use_cache: bool, configs: dict, new: int) -> dict:
    """One side in its own process: per model, a warm-up call, then `new` greedy tokens, timed."""
    device = torch.device(device)
    out = {}
    for key, (_, fields) in configs.items():
        torch.manual_seed(0)  # the same weights in every process
        model = GPT(GPTConfig(**{"vocab_size": VOCAB, "dropout": 0.0, **fields})).to(device)
        prompt = torch.randint(0, VOCAB, (1, PROMPT), device=device)

        def sample(n: int):
            sync(device)
            t0 = time.perf_counter()
            tokens = generate(model, prompt, n, temperature=0.0, use_cache=use_cache)
            sync(device)
            return tokens, time.perf_counter() - t0

        warm = sample(8)[1]  # the first call, timed apart
        tokens, seconds = sample(new)
        out[key] = {"tokens": tokens[0].tolist(), "seconds": seconds, "warmup_s": warm}
    return out


def run(ctx: Ctx) -> dict:
    configs = model_configs()
    new = QUICK_NEW if ctx.quick else NEW
    runs = {path: [] for path in PATHS}
    for _ in range(ctx.repeats):  # the sides in turn, so drift hits both alike
        for path, use_cache in PATHS.items():
            runs[path].append(isolated(ctx, sample_side, ctx.device.type, use_cache, configs, new))
    cache, recompute = PATHS
    models, rows, notes = {}, [], []
    for key, (label, fields) in configs.items():
        cfg = GPTConfig(**{"vocab_size": VOCAB, "dropout": 0.0, **fields})
        block = cfg.block_size
        model = GPT(cfg)
        # Cached decoding: each position once, over at most block_size keys; recomputing: the whole
        # (cropped) context for every new token.
        model_flops = gpt_forward_flops(model, [min(t, block) for t in range(1, PROMPT + new)])
        recompute_flops = sum(gpt_forward_flops(model, range(1, min(t, block) + 1)) for t in range(PROMPT, PROMPT + new))
        seconds = {path: [r[key]["seconds"] for r in runs[path]] for path in PATHS}
        identical = all(a[key]["tokens"] == b[key]["tokens"] for a, b in zip(runs[cache], runs[recompute]))
        results = {}
        for path in PATHS:
            res = {"tokens_per_s": summarize(new / s for s in seconds[path]),
                   "ratio_vs_recompute": summarize(b / s for s, b in zip(seconds[path], seconds[recompute])),
                   "mfu": summarize(model_flops / s / ctx.peak("fp32") for s in seconds[path]),
                   "warmup_s": runs[path][0][key]["warmup_s"]}
            results[path] = res
            rows.append([label, path, fmt(res["tokens_per_s"]), fmt(res["ratio_vs_recompute"], ".2f", suffix="x"),
                         fmt(res["mfu"], ".2f", 100, "%"), f"{res['warmup_s']:.2f}"])
        results[recompute]["hfu_recompute"] = summarize(recompute_flops / s / ctx.peak("fp32") for s in seconds[recompute])
        models[key] = {"label": label, "config": {**fields, "vocab_size": VOCAB, "weights": "random init (seed 0)"},
                       "greedy_identical": identical, "results": results,
                       "cache_speedup": results[cache]["ratio_vs_recompute"],
                       "model_gflops": model_flops / 1e9, "recompute_gflops": recompute_flops / 1e9}
        notes.append(f"{label}: greedy tokens identical (cache vs recompute), every repeat: {identical}; model "
                     f"FLOPs of the {new} tokens {model_flops / 1e9:.2f} G, recomputing does {recompute_flops / 1e9:.1f} G")
    ok = all(m["greedy_identical"] for m in models.values())
    notes += [f"greedy tokens identical (cache vs recompute), every model and repeat: {ok}",
              "both models random-init (speed does not depend on the weights); warm-up = an 8-token call per "
              "path and model, before timing, in each process"]
    return {
        "fresh_processes": True,  # every side ran in a process of its own (common.isolated)
        "title": f"B4 sampling {new} new tokens after a {PROMPT}-token prompt, batch 1, greedy, fp32",
        "notes": notes,
        "columns": ["model", "path", "tokens/s", "ratio", "MFU", "warm-up s"],
        "rows": rows,
        "greedy_identical": ok,
        "config": {"new_tokens": new, "prompt_tokens": PROMPT},
        "models": models,
    }

"""B4: sampling speed. The KV cache against recomputing, and nnlab against nanoGPT's sample.py.

Every side produces 500 new tokens after a 16-token prompt at batch 1, greedy (temperature 0),
in a fresh process of its own (common.isolated), repeats in turn.

Two models:
  - random-1024: a random GPT (4 layers, 4 heads, 128 wide) with block_size 1024 >= prompt + 500,
    so the cache holds every token: nnlab's cached path (use_cache=True) against recomputing the
    context for every token (use_cache=False); the tokens must be identical.
  - gpt-shakespeare: the model the recipe ships (block_size 64), trained here by the recipe
    (--quick: 20 steps). Once the sequence passes 64 tokens the cache cannot slide (the positions
    are absolute: nnlab.generate says why). Sides:
      * nanoGPT's sample.py loop as written there: crop to block_size, forward, last logits, pick,
        append, with nnlab's kernels off (ATen's SDPA, as nanoGPT) and the same weights: the baseline;
      * nnlab generate, exact (context_shift=0): the same tokens as sample.py, required;
      * nnlab generate with context_shift 16 and 32: cached decoding that re-prefills the newest
        block_size - s tokens whenever the context fills; other tokens, so the price is measured
        too: the validation loss the model reaches with the contexts each policy gives it (the
        mean over many validation windows of the loss at those context lengths), next to exact's.
    A breakdown, timed in the exact side's process, says where a token's time goes: a 64-token
    forward, a one-token cached step, a prefill, and picking the token.

MFU counts the model FLOPs of cached decoding (each position's forward once: 2N + 4*L*C*t for a
token with t keys, t at most block_size), the same for every path, so extra work shows as lower
MFU.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (Ctx, fmt, gpt_forward_flops, isolated, kernels_off, median_ms, summarize,
                    sync, train_quiet)
from nnlab.generate import generate
from nnlab.models.gpt import GPT, GPTConfig

NEW, PROMPT, VOCAB = 500, 16, 65  # VOCAB: Tiny Shakespeare's characters
QUICK_NEW = 120  # --quick: still past gpt-shakespeare's 64-token context, so every policy runs
SHIFTS = (16, 32)
LOSS_WINDOWS = 2000  # validation windows of block_size tokens for the loss-by-context figure
RANDOM = {"KV cache (use_cache=True)": {"use_cache": True}, "recompute context (use_cache=False)": {"use_cache": False}}
BASELINE = "nanoGPT sample.py loop"
TRAINED = {BASELINE: None, "nnlab exact (context_shift=0)": {"context_shift": 0},
           **{f"nnlab context_shift={s}": {"context_shift": s} for s in SHIFTS}}


def random_model() -> GPT:
    torch.manual_seed(0)  # the same weights in every process
    return GPT(GPTConfig(vocab_size=VOCAB, n_layer=4, n_head=4, n_embd=128, block_size=1024, dropout=0.0))


def timed_tokens(sample, device: torch.device, new: int) -> dict:
    """A warm-up call (timed apart), then `new` tokens, timed."""
    def once(n):
        sync(device)
        t0 = time.perf_counter()
        tokens = sample(n)
        sync(device)
        return tokens, time.perf_counter() - t0

    warm = once(8)[1]
    tokens, seconds = once(new)
    return {"tokens": tokens[0].tolist(), "seconds": seconds, "warmup_s": warm}


def prompt_for(vocab: int, device) -> torch.Tensor:
    return torch.randint(0, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0)).to(device)


def random_side(device: str, kw: dict, new: int) -> dict:
    device = torch.device(device)
    model, prompt = random_model().to(device), prompt_for(VOCAB, device)
    return timed_tokens(lambda n: generate(model, prompt, n, temperature=0.0, **kw), device, new)


def sample_py(model, idx: torch.Tensor, n: int) -> torch.Tensor:
    """nanoGPT's GPT.generate as sample.py calls it, with its multinomial draw replaced by argmax
    (greedy: the limit of temperature -> 0) so that the tokens can be compared."""
    for _ in range(n):
        idx_cond = idx if idx.size(1) <= model.cfg.block_size else idx[:, -model.cfg.block_size:]
        logits = model(idx_cond)
        logits = logits[:, -1, :]
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def trained_side(device: str, run_dir: str, kw: dict | None, new: int) -> dict:
    """One side on the trained model: sample.py's loop (kw None, kernels off) or nnlab generate."""
    if kw is None:
        kernels_off()
    from nnlab.runfolder import load

    device = torch.device(device)
    model, info = load(run_dir)
    model = model.to(device).eval()
    prompt = prompt_for(model.cfg.vocab_size, device)
    if kw is None:
        def sample(n):
            with torch.no_grad():  # sample.py wraps generation in torch.no_grad()
                return sample_py(model, prompt, n)
        return timed_tokens(sample, device, new)
    out = timed_tokens(lambda n: generate(model, prompt, n, temperature=0.0, **kw), device, new)
    if kw["context_shift"] == 0:
        out["breakdown_ms"] = breakdown(model, prompt)
    return out


def breakdown(model, prompt: torch.Tensor, reps: int = 200) -> dict:
    """Milliseconds of what one generated token is made of (median of `reps` calls each)."""
    block = model.cfg.block_size
    ctx = torch.cat([prompt, prompt.new_zeros(1, block)], dim=1)[:, -block:]  # a full context

    def ms(fn) -> float:
        return median_ms(fn, reps)

    with torch.inference_mode():
        logits = model(ctx)[:, -1]
        _, past = model.forward_with_cache(ctx[:, : block - 16])

        def decode():
            cache = model.decode_cache_from(past, block)
            model.decode_step(ctx[:, -1], cache)

        out = {f"forward of the full {block}-token context (exact, per token)": ms(lambda: model(ctx)[:, -1]),
               "one-token cached step (decode_step, ~48 keys)": ms(decode),
               **{f"prefill of {block - s} tokens (context_shift={s}, once per {s} tokens)":
                  ms(lambda s=s: model.forward_with_cache(ctx[:, : block - s])) for s in SHIFTS},
               "pick the token and append it (argmax, cat)":
                   ms(lambda: torch.cat([ctx, logits.argmax(-1, keepdim=True)], dim=1))}
    return out


def loss_by_context(run_dir: str) -> dict:
    """The trained model's mean validation loss at each context length 1..block_size, over
    LOSS_WINDOWS random validation windows, and what each sampling policy averages to."""
    from nnlab.runfolder import load, read_config
    from nnlab.tasks import make_task

    model, _ = load(run_dir)
    model.eval()
    task = make_task(read_config(run_dir))
    val, block = task.data.val, model.cfg.block_size
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(val) - block - 1, (LOSS_WINDOWS,), generator=g)
    losses = torch.zeros(block, dtype=torch.float64)
    with torch.inference_mode():
        for chunk in starts.split(250):
            x = torch.stack([val[i : i + block] for i in chunk])
            y = torch.stack([val[i + 1 : i + 1 + block] for i in chunk])
            logits = model(x)
            ce = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, block)
            losses += ce.double().sum(0)
    per_length = (losses / LOSS_WINDOWS).tolist()  # index t: a context of t + 1 tokens
    policies = {"nnlab exact (context_shift=0)": per_length[-1]}
    for s in SHIFTS:  # a cycle predicts from contexts of block - s .. block tokens
        policies[f"nnlab context_shift={s}"] = sum(per_length[block - s - 1:]) / (s + 1)
    return {"per_context_length": per_length, "policy_val_loss": policies, "windows": LOSS_WINDOWS}


def run(ctx: Ctx) -> dict:
    new = QUICK_NEW if ctx.quick else NEW
    dev = ctx.device.type
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"train.max_steps": 20, "train.eval_every": 20, "train.eval_iters": 2} if ctx.quick else {}
        run_dir = train_quiet("gpt-shakespeare", overrides, str(Path(tmp) / "gpt"))["run_dir"]
        runs = {key: {path: [] for path in paths} for key, paths in (("random-1024", RANDOM),
                                                                      ("gpt-shakespeare", TRAINED))}
        for _ in range(ctx.repeats):  # the sides in turn, so drift hits all alike
            for path, kw in RANDOM.items():
                runs["random-1024"][path].append(isolated(ctx, random_side, dev, kw, new))
            for path, kw in TRAINED.items():
                runs["gpt-shakespeare"][path].append(isolated(ctx, trained_side, dev, run_dir, kw, new))
        quality = loss_by_context(run_dir)
        shakespeare_cfg = load_cfg(run_dir)
    return report(ctx, new, runs, quality, shakespeare_cfg)


def load_cfg(run_dir: str) -> GPTConfig:
    from nnlab.runfolder import load

    return load(run_dir)[0].cfg


def report(ctx: Ctx, new: int, runs: dict, quality: dict, shakespeare_cfg: GPTConfig) -> dict:
    models, rows, notes = {}, [], []
    specs = {"random-1024": ("random GPT, block_size 1024", random_model().cfg, "recompute context (use_cache=False)",
                             "KV cache (use_cache=True)"),
             "gpt-shakespeare": ("gpt-shakespeare (trained), block_size 64", shakespeare_cfg, BASELINE,
                                 "nnlab exact (context_shift=0)")}
    for key, (label, cfg, base, same) in specs.items():
        model, block = GPT(cfg), cfg.block_size
        model_flops = gpt_forward_flops(model, [min(t, block) for t in range(1, PROMPT + new)])
        side_runs = runs[key]
        seconds = {path: [r["seconds"] for r in rs] for path, rs in side_runs.items()}
        identical = all(a["tokens"] == b["tokens"] for a, b in zip(side_runs[same], side_runs[base]))
        results = {}
        for path in side_runs:
            res = {"tokens_per_s": summarize(new / s for s in seconds[path]),
                   f"ratio_vs_{'recompute' if key == 'random-1024' else 'sample_py'}":
                       summarize(b / s for s, b in zip(seconds[path], seconds[base])),
                   "mfu": summarize(model_flops / s / ctx.peak("fp32") for s in seconds[path]),
                   "warmup_s": side_runs[path][0]["warmup_s"]}
            if key == "gpt-shakespeare" and path in quality["policy_val_loss"]:
                res["val_loss_at_its_contexts"] = quality["policy_val_loss"][path]
            results[path] = res
            ratio_key = next(k for k in res if k.startswith("ratio_vs_"))
            loss = res.get("val_loss_at_its_contexts")
            rows.append([label, path, fmt(res["tokens_per_s"]), fmt(res[ratio_key], ".2f", suffix="x"),
                         fmt(res["mfu"], ".2f", 100, "%"), f"{loss:.4f}" if loss else "", f"{res['warmup_s']:.2f}"])
        fields = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
        models[key] = {"label": label, "config": fields, "greedy_identical": identical, "results": results,
                       "baseline": base, "model_gflops": model_flops / 1e9}
        notes.append(f"{label}: greedy tokens identical ({same} vs {base}), every repeat: {identical}")
    cache = models["random-1024"]["results"]["KV cache (use_cache=True)"]
    models["random-1024"]["cache_speedup"] = cache["ratio_vs_recompute"]
    exact = models["gpt-shakespeare"]["results"]["nnlab exact (context_shift=0)"]
    models["gpt-shakespeare"]["cache_speedup"] = exact["ratio_vs_sample_py"]  # the README's row
    models["gpt-shakespeare"]["loss_by_context"] = quality
    models["gpt-shakespeare"]["breakdown_ms"] = runs["gpt-shakespeare"]["nnlab exact (context_shift=0)"][0][
        "breakdown_ms"]
    ok = all(m["greedy_identical"] for m in models.values())
    notes += [f"greedy tokens identical where they must be, every model and repeat: {ok}",
              "val loss: the trained model's mean loss over the context lengths each policy samples from, "
              f"{quality['windows']} validation windows; exact = a full context every token",
              "breakdown (ms, one call each, median): " + "; ".join(
                  f"{k} {v:.3f}" for k, v in models["gpt-shakespeare"]["breakdown_ms"].items())]
    return {
        "fresh_processes": True,  # every side ran in a process of its own (common.isolated)
        "title": f"B4 sampling {new} new tokens after a {PROMPT}-token prompt, batch 1, greedy, fp32",
        "notes": notes,
        "columns": ["model", "path", "tokens/s", "ratio", "MFU", "val loss", "warm-up s"],
        "rows": rows,
        "greedy_identical": ok,
        "config": {"new_tokens": new, "prompt_tokens": PROMPT},
        "models": models,
    }

"""B3: gpt-shakespeare training tokens/s, nnlab's loop vs a plain nanoGPT-style loop, side by side.

Both sides train the same baby GPT (4 layers, 4 heads, 128 wide, block 64, vocab 65) on Tiny
Shakespeare with batch 12, AdamW lr 1e-3 (betas 0.9/0.99, weight decay 0.1 on matrices only, as
nanoGPT) and gradient clipping at 1.0. The baseline is written by hand the ordinary way: random
blocks via torch.randint as nanoGPT's get_batch, F.cross_entropy, backward, clip, step; it uses
nnlab.models.gpt.GPT as its module so that only the loop differs, with nnlab's own CPU kernels
switched off (nanogpt_setup), so its attention is SDPA's as in nanoGPT. nnlab runs its recipe through
nnlab.train as shipped (fp32), with precision=auto, with train.compile=true, with both, and with
both under compile_mode=max-autotune-no-cudagraphs (the compile variants in full mode only).

Every run is a fresh process (common.isolated), as a user's script would be.
Steady state = the steps after the first `warm`; the warm-up (compilation included) is reported
apart. MFU uses nanoGPT's estimate_mfu: 6N + 12*L*C*T FLOPs per token.

Time to target: the target is the val loss the plain loop reaches at the end of its own
2,000-iteration schedule (each repeat its own); each side's time is its training seconds (steps
only: evaluations excluded, nnlab's compilation included) to its first evaluation at or below it.
Both sides estimate val loss the same way: the mean loss over the same EVAL_BATCHES fixed batches
of EVAL_BATCH random validation blocks (drawn from a generator seeded 0, as nnlab's text task draws
them), so an evaluation differs between the sides only by the model it evaluates.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (Ctx, attempt, auto_note, fmt, gpt_train_flops_per_token, isolated, keep, read_events,
                    kernels_off, summarize, time_nnlab, timed, train_quiet, training_table)
from nnlab.config import load_config
from nnlab.errors import NnlabError
from nnlab.models.gpt import GPT, GPTConfig

BATCH, BLOCK = 12, 64
SCHEDULE = 2000  # nanoGPT's baby GPT: lr_decay_iters = max_iters
BEST = "gpt-shakespeare-speedrun"
EVAL_BATCHES = 200  # nanoGPT's eval_iters: fewer batches give a noisier estimate (benchmarks/README.md)
TARGET_RULE = (f"the val loss the plain loop reaches at the end of its own {SCHEDULE:,}-iteration schedule; "
               f"both sides estimate val loss on the same {EVAL_BATCHES} fixed batches of validation blocks")


def text_path() -> Path:
    """The recipe's corpus (config resolves it under the data root)."""
    path = Path(load_config("gpt-shakespeare").data.path)
    if not path.is_file():
        raise NnlabError(f"{path}: no such file; set NNLAB_DATA_ROOT to the folder that holds tinyshakespeare.txt")
    return path


def nanogpt_setup(device: torch.device, with_val: bool = False):
    """nanoGPT's data and model setup for the baby GPT: (get_batch(split), model, optimizer), and
    the validation split's tokens after them when `with_val`.

    The model runs ATen only: nnlab's own CPU kernels are switched off for this process (every
    plain side runs in a fresh one), so its attention is F.scaled_dot_product_attention, as in
    nanoGPT, and not nnlab's attention kernel, which would speed the baseline up with nnlab's work."""
    kernels_off()
    text = text_path().read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    splits = {"train": data[:n], "val": data[n:]}

    def get_batch(split: str):
        d = splits[split]
        ix = torch.randint(len(d) - BLOCK, (BATCH,))
        x = torch.stack([d[i : i + BLOCK] for i in ix])
        y = torch.stack([d[i + 1 : i + 1 + BLOCK] for i in ix])
        return x.to(device), y.to(device)

    model = GPT(GPTConfig(vocab_size=len(chars), n_layer=4, n_head=4, n_embd=128, block_size=BLOCK, dropout=0.0))
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
    return (get_batch, model, optimizer, splits["val"]) if with_val else (get_batch, model, optimizer)


def nanogpt_step(get_batch, model, optimizer) -> None:
    X, Y = get_batch("train")
    logits = model(X)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), Y.view(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def plain(device: str, warm: int, steady: int) -> dict:
    t0 = time.perf_counter()
    device = torch.device(device)
    get_batch, model, optimizer = nanogpt_setup(device)
    setup_s = time.perf_counter() - t0
    step = lambda: nanogpt_step(get_batch, model, optimizer)
    warm_s = timed(step, warm, device)
    steady_s = timed(step, steady, device)
    return {"rate": steady * BATCH * BLOCK / steady_s, "warmup_s": warm_s, "setup_s": setup_s, "precision": "fp32"}


def nanogpt_lr(it: int, lr=1e-3, min_lr=1e-4, warmup=100, decay_iters=2000) -> float:
    """nanoGPT's get_lr for the baby GPT: linear warmup, cosine to min_lr at decay_iters, then min_lr."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / (decay_iters - warmup))) * (lr - min_lr)


def val_loss(model, val: torch.Tensor, device: torch.device, batches: int, batch: int) -> float:
    """Mean loss over `batches` fixed batches of `batch` random validation blocks: the blocks nnlab's
    text task evaluates on (a generator seeded 0, the same batches at every evaluation)."""
    g = torch.Generator().manual_seed(0)
    ar = torch.arange(BLOCK)
    losses = []
    model.eval()
    with torch.no_grad():
        for _ in range(batches):
            offsets = torch.randint(len(val) - BLOCK, (batch,), generator=g)
            X, Y = val[offsets[:, None] + ar].to(device), val[offsets[:, None] + ar + 1].to(device)
            logits = model(X)
            losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), Y.view(-1)).item())
    model.train()
    return sum(losses) / len(losses)


def plain_to_target(device: str, seed: int, eval_every: int, eval_batches: int, eval_batch: int,
                    iters: int) -> dict:
    """nanoGPT's baby-GPT run for `iters` iterations of its 2,000-iteration schedule, evaluated every
    `eval_every` iterations and at the end. Its target is its own last val loss; its time is the
    training seconds (evaluations excluded) to its first evaluation at or below that."""
    device = torch.device(device)
    torch.manual_seed(seed)
    get_batch, model, optimizer, val = nanogpt_setup(device, with_val=True)
    seconds, curve = 0.0, []
    for it in range(1, iters + 1):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = nanogpt_lr(it - 1)
        nanogpt_step(get_batch, model, optimizer)
        seconds += time.perf_counter() - t0
        if it % eval_every == 0 or it == iters:
            curve.append((it, val_loss(model, val, device, eval_batches, eval_batch), seconds))
    target = curve[-1][1]
    hit = next(c for c in curve if c[1] <= target)
    return {"target": target, "reached": True, "step": hit[0], "val_loss": hit[1], "seconds": hit[2],
            "curve": curve}


def nnlab_to_target(recipe: str, overrides: dict, out: str, target: float) -> dict:
    """nnlab.train(recipe); the first evaluation at or below `target`, read from metrics.jsonl
    (train_seconds there: time in training steps, compilation included, evaluations excluded)."""
    summary = train_quiet(recipe, overrides, out)
    evals = read_events(summary["run_dir"], "eval")
    hit = next((e for e in evals if e["val_loss"] <= target), evals[-1])
    return {"reached": hit["val_loss"] <= target, "step": hit["step"], "val_loss": hit["val_loss"],
            "seconds": hit["train_seconds"], "final_val_loss": evals[-1]["val_loss"],
            "precision": summary["precision"], "curve": [(e["step"], e["val_loss"], e["train_seconds"]) for e in evals]}


def run(ctx: Ctx) -> dict:
    warm, steady = ctx.steps(3, 10), ctx.steps(8, 100)
    recipe = "gpt-shakespeare"
    nnlab_variants = [("nnlab gpt-shakespeare (fp32, as shipped)", recipe, {}),
                      ("nnlab + precision=auto", recipe, {"train.precision": "auto"})]
    if not ctx.quick:  # a cold compile of the training graph takes tens of seconds
        nnlab_variants += [("nnlab + compile", recipe, {"train.compile": True}),
                           ("nnlab + compile + precision=auto", recipe, {"train.compile": True, "train.precision": "auto"}),
                           ("nnlab + compile (max-autotune) + precision=auto", recipe,
                            {"train.compile": True, "train.compile_mode": "max-autotune-no-cudagraphs",
                             "train.precision": "auto"}),
                           (f"nnlab {BEST} (batch 32, auto, compile)", BEST, {})]
    # Evaluate once at the end with one batch: evaluation is outside the timing, and this keeps it short.
    common_ov = {"data.path": str(text_path()), "train.eval_iters": 1}
    flops = gpt_train_flops_per_token(GPT(GPTConfig(vocab_size=65)), BLOCK)
    names = ["plain loop (nanoGPT-style, fp32)"] + [n for n, _, _ in nnlab_variants]
    raw, errors = {n: [] for n in names}, {}
    # Time to the plain loop's final val loss: nanoGPT's full run against nnlab's best recipe, both
    # evaluated on the same fixed batches (quick: a few steps and one batch, to run the code).
    eval_batch = load_config(BEST).train.batch_size
    eval_batches = 1 if ctx.quick else EVAL_BATCHES
    plain_tt = dict(eval_every=2 if ctx.quick else 100, eval_batches=eval_batches, eval_batch=eval_batch,
                    iters=4 if ctx.quick else SCHEDULE)
    best_ov = {"data.path": str(text_path()), "train.eval_iters": eval_batches,
               **({"train.max_steps": 4, "train.eval_every": 2, "train.compile": False} if ctx.quick else {})}
    tt = {"plain": [], "nnlab": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(ctx.repeats):
            raw[names[0]].append(isolated(ctx, plain, ctx.device.type, warm, steady))
            for i, (name, rec, ov) in enumerate(nnlab_variants):
                ov, out = {**common_ov, **ov}, str(Path(tmp) / f"{i}-{r}")
                keep(raw, name, attempt(lambda: isolated(ctx, time_nnlab, rec, ov, warm, steady, out), errors, name))
        for r in range(ctx.repeats):
            tt["plain"].append(isolated(ctx, plain_to_target, ctx.device.type, r, *plain_tt.values()))
            tt["nnlab"].append(isolated(ctx, nnlab_to_target, BEST, {**best_ov, "train.seed": r},
                                        str(Path(tmp) / f"tt-{r}"), tt["plain"][-1]["target"]))
    results, rows, crosscheck = training_table(ctx, raw, errors, flops, "tokens")
    results["time_to_target"] = tt_res = _time_to_target(tt)
    notes = [f"model FLOPs per token: {flops / 1e6:.2f} M (nanoGPT: 6N + 12*L*C*T, N without the position table)",
             f"ratio = tokens/s over the plain loop's in the same repeat; warm-up = first {warm} steps "
             "(for compile: the compilation); repeats after the first reuse inductor's on-disk cache",
             auto_note(results[names[2]]), crosscheck, f"time-to-target rule: {TARGET_RULE}", tt_res["note"]]
    if ctx.quick:
        notes.append("train.compile=true and the best recipe's throughput: skipped in --quick (a cold compile "
                     "takes tens of seconds); time-to-target ran 4 steps on one evaluation batch only")
    return {
        "fresh_processes": True,  # every side ran in a process of its own (common.isolated)
        "title": f"B3 gpt-shakespeare training tokens/s: batch {BATCH} x block {BLOCK}, AdamW, clip 1.0, "
                 f"{warm} warm-up + {steady} timed steps",
        "notes": notes,
        "columns": ["variant", "precision", "tokens/s", "ratio", "MFU", "warm-up s", "setup s"],
        "rows": rows,
        "config": {"warm_steps": warm, "steady_steps": steady, "flops_per_token": flops,
                   "plain_to_target": plain_tt, "best_recipe": BEST},
        "results": results,
    }


def _time_to_target(tt: dict) -> dict:
    """Seconds to the plain loop's final val loss on each side (training steps only: evaluations
    excluded, nnlab's compilation included), and their ratio; a side that never got there is
    reported as such."""
    res = {side: {"runs": runs, "reached": all(r["reached"] for r in runs),
                  "seconds": summarize([r["seconds"] for r in runs]), "steps": [r["step"] for r in runs]}
           for side, runs in tt.items()}
    res["target_rule"] = TARGET_RULE
    res["targets"] = [round(r["target"], 4) for r in tt["plain"]]
    p, n = res["plain"], res["nnlab"]
    line = (f"time to the plain loop's final val loss ({', '.join(f'{t:.4f}' for t in res['targets'])}): plain "
            f"nanoGPT loop {fmt(p['seconds'], ',.1f')} s (iterations {p['steps']}), nnlab {BEST} "
            f"{fmt(n['seconds'], ',.1f')} s (steps {n['steps']}{'' if n['reached'] else ', NOT reached'})")
    if p["reached"] and n["reached"]:
        res["ratio"] = summarize([b["seconds"] / a["seconds"] for a, b in zip(tt["plain"], tt["nnlab"])])
        line += f"; ratio nnlab / plain {fmt(res['ratio'], '.2f', suffix='x')} (target <= 0.4x)"
    res["note"] = line + "; seconds = training steps only (evaluations excluded, compilation included)"
    return res

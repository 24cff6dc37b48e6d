"""B3: gpt-shakespeare training tokens/s, nnlab's loop vs a plain nanoGPT-style loop, side by side.

Both sides train the same baby GPT (4 layers, 4 heads, 128 wide, block 64, vocab 65) on Tiny
Shakespeare with batch 12, AdamW lr 1e-3 (betas 0.9/0.99, weight decay 0.1 on matrices only, as
nanoGPT) and gradient clipping at 1.0. The baseline is written by hand the ordinary way: random
blocks via torch.randint as nanoGPT's get_batch, F.cross_entropy, backward, clip, step; it uses
nnlab.models.gpt.GPT as its module so that only the loop differs. nnlab runs its recipe through
nnlab.train as shipped (fp32), with precision=auto, with train.compile=true, and with both (the
compile variants in full mode only).

Steady state = the steps after the first `warm`; the warm-up (compilation included) is reported
apart. MFU uses nanoGPT's estimate_mfu: 6N + 12*L*C*T FLOPs per token.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import ROOT, Ctx, attempt, auto_note, keep, gpt_train_flops_per_token, time_nnlab, timed, training_table
from nnlab.config import load_config
from nnlab.models.gpt import GPT, GPTConfig

BATCH, BLOCK = 12, 64


def text_path() -> Path:
    """The recipe's corpus; its path is relative to the repository root, so resolve it from there."""
    p = Path(load_config("gpt-shakespeare").data.path)
    return p if p.is_absolute() else (ROOT / p).resolve()


def plain(ctx: Ctx, warm: int, steady: int) -> dict:
    t0 = time.perf_counter()
    text = text_path().read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    train_data = data[: int(0.9 * len(data))]

    def get_batch():
        ix = torch.randint(len(train_data) - BLOCK, (BATCH,))
        x = torch.stack([train_data[i : i + BLOCK] for i in ix])
        y = torch.stack([train_data[i + 1 : i + 1 + BLOCK] for i in ix])
        return x.to(ctx.device), y.to(ctx.device)

    model = GPT(GPTConfig(vocab_size=len(chars), n_layer=4, n_head=4, n_embd=128, block_size=BLOCK, dropout=0.0))
    model.to(ctx.device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
    setup_s = time.perf_counter() - t0

    def step():
        X, Y = get_batch()
        logits = model(X)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), Y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    warm_s = timed(step, warm, ctx.device)
    steady_s = timed(step, steady, ctx.device)
    return {"rate": steady * BATCH * BLOCK / steady_s, "warmup_s": warm_s, "setup_s": setup_s, "precision": "fp32"}


def run(ctx: Ctx) -> dict:
    warm, steady = ctx.steps(3, 10), ctx.steps(8, 100)
    nnlab_variants = [("nnlab gpt-shakespeare (fp32, as shipped)", {}),
                      ("nnlab + precision=auto", {"train.precision": "auto"})]
    if not ctx.quick:  # a cold compile of the training graph takes ~35 s on 2 shared cores
        nnlab_variants += [("nnlab + compile", {"train.compile": True}),
                           ("nnlab + compile + precision=auto", {"train.compile": True, "train.precision": "auto"})]
    # Evaluate once at the end with one batch: evaluation is outside the timing, and this keeps it short.
    common_ov = {"data.path": str(text_path()), "train.eval_iters": 1}
    flops = gpt_train_flops_per_token(GPT(GPTConfig(vocab_size=65)), BLOCK)
    names = ["plain loop (nanoGPT-style, fp32)"] + [n for n, _ in nnlab_variants]
    raw, errors = {n: [] for n in names}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(ctx.repeats):
            raw[names[0]].append(plain(ctx, warm, steady))
            for i, (name, ov) in enumerate(nnlab_variants):
                ov, out = {**common_ov, **ov}, Path(tmp) / f"{i}-{r}"
                keep(raw, name, attempt(lambda: time_nnlab("gpt-shakespeare", ov, warm, steady, out), errors, name))
    results, rows, crosscheck = training_table(ctx, raw, errors, flops, "tokens")
    notes = [f"model FLOPs per token: {flops / 1e6:.2f} M (nanoGPT: 6N + 12*L*C*T, N without the position table)",
             f"ratio = tokens/s over the plain loop's in the same repeat; warm-up = first {warm} steps "
             "(for compile: the compilation); repeats after the first reuse inductor's on-disk cache",
             auto_note(results[names[2]]), crosscheck]
    if ctx.quick:
        notes.append("train.compile=true (alone and with precision=auto): skipped in --quick (a cold compile "
                     "takes ~35 s on 2 shared cores)")
    return {
        "title": f"B3 gpt-shakespeare training tokens/s: batch {BATCH} x block {BLOCK}, AdamW, clip 1.0, "
                 f"{warm} warm-up + {steady} timed steps",
        "notes": notes,
        "columns": ["variant", "precision", "tokens/s", "ratio", "MFU", "warm-up s", "setup s"],
        "rows": rows,
        "config": {"warm_steps": warm, "steady_steps": steady, "flops_per_token": flops},
        "results": results,
    }

"""The training loop: the article's init -> forward -> loss -> backward -> update, made real.

Read `train()` top to bottom: set up (config, data, model, optimizer, resume), then one loop over
optimizer steps: set the learning rate; for each micro-batch forward, loss, backward; clip; step;
zero the gradients; then log, evaluate and checkpoint when due. Precision, compile and
distribution are applied by helpers, never by a second copy of this loop.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from nnlab import kernels, runfolder
from nnlab.config import load_config
from nnlab.errors import ConfigError, NnlabError
from nnlab.info import machine_info
from nnlab.models import build_model
from nnlab.tasks import lr_at, make_task
from nnlab.train import distributed, privacy
from nnlab.train.adversarial import adversarial_batch
from nnlab.train.allocator import tune_allocator
from nnlab.train.log import RunLogger
from nnlab.train.optim import make_optimizer
from nnlab.train.precision import autocast, resolve_precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(recipe: str | None = None, overrides: list[str] | dict | None = None, *, config_file: str | None = None,
          out: str | None = None, resume: str | None = None, _examples: tuple | None = None) -> Path:
    """Train a recipe (or resume a run) and return its run folder.

    `_examples`, internal: (x, y) tensors, in the task's own normalised form, to train on in place of
    the training split (membership-inference shadow models, nnlab.analysis.lira); the test split
    stays as loaded."""
    env = distributed.init()
    try:
        run_dir = _train(recipe, overrides, config_file, out, resume, env, _examples)
    except BaseException:
        distributed.shutdown(ok=False)
        raise
    distributed.shutdown()
    return run_dir


def _train(recipe, overrides, config_file, out, resume, env, examples=None) -> Path:
    # ---- configuration and run folder ------------------------------------------------------------
    if resume:
        run_dir = Path(resume)
        cfg = runfolder.read_config(run_dir)
        if not (run_dir / runfolder.CHECKPOINT).exists():
            raise NnlabError(f"--resume {run_dir}: no checkpoint at {run_dir / runfolder.CHECKPOINT}")
    else:
        if recipe is None:
            raise ConfigError("train: give a recipe (see `nnlab recipes`) or --resume RUN_DIR")
        cfg = load_config(recipe, config_file, overrides)
        run_dir = runfolder.new_run_dir(out, cfg.recipe) if env.is_main else None
        if env.world_size > 1:  # every rank needs the folder's name (to resume), rank 0 chose it
            obj = [str(run_dir)]
            torch.distributed.broadcast_object_list(obj, src=0)
            run_dir = Path(obj[0])
    t = cfg.train
    privacy.check(cfg, env.world_size, bool(resume))
    micro, rem = divmod(t.batch_size, env.world_size * t.grad_accum)
    if rem or micro == 0:
        raise ConfigError(f"train.batch_size: {t.batch_size} is not divisible by world size {env.world_size} "
                          f"x train.grad_accum {t.grad_accum}")

    # ---- data, model, optimizer ------------------------------------------------------------------
    seed_everything(t.seed)
    task = make_task(cfg)
    if examples is not None:
        task.train_on(*examples)
    try:  # the data decides classes / vocabulary / input size
        cfg.model = dataclasses.replace(cfg.model, **task.model_fields())
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    model = build_model(cfg.model)
    precision, precision_why = resolve_precision(t.precision, env.device)
    allocator = tune_allocator()[1] if t.tune_allocator and env.device.type == "cpu" else "default"
    model.to(env.device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
        if env.world_size > 1 and t.strategy == "fsdp" and not all(p.is_contiguous() for p in model.parameters()):
            raise ConfigError("train.channels_last: FSDP2 shards only contiguous parameters, and this model's "
                              "channels-last conv weights are not; set train.channels_last=false or train.strategy=ddp")
    n_params = sum(p.numel() for p in model.parameters())

    if privacy.enabled(t):  # before the run folder is made: a model DP-SGD cannot train leaves none
        privacy.check_model(model)
    if env.is_main and not resume:
        runfolder.write_config(run_dir, cfg)
    # Sharding (FSDP) changes the parameters, so it comes before the optimizer is built.
    fmodel = distributed.parallelize(model, t, env)
    optimizer = make_optimizer(model, t, fused=env.world_size == 1)
    # DP-SGD swaps in Poisson batches and an optimizer that clips and noises per-example gradients.
    private = privacy.PrivateTraining(model, optimizer, task, t, task.total_steps()) if privacy.enabled(t) else None
    if private:
        task, optimizer = private.task, private.optimizer
    # Listed once: walking the modules for model.parameters() took ~3.5 us a tensor, ~185 us a step
    # for the baby GPT.
    params = [p for p in model.parameters() if p.requires_grad]
    step, bad_steps, train_seconds = 0, 0, 0.0
    if resume:
        step, bad_steps, train_seconds = runfolder.load_checkpoint(run_dir, model, optimizer, env)
    # Under FSDP every rank holds a shard, so every rank must take part in evaluation and saving.
    all_ranks = env.world_size > 1 and t.strategy == "fsdp"

    total = task.total_steps()
    unit, per_step = task.unit, task.items_per_step()
    log = RunLogger(run_dir if env.is_main else None, total, unit, start_step=step)
    log.say(f"{cfg.recipe}: {cfg.model.name} with {n_params:,} parameters, {total} steps of {t.batch_size} "
            f"on {env.device} x{env.world_size}, precision {precision} ({precision_why}); run folder {run_dir}")
    if resume:
        log.say(f"resumed at step {step}")
    if private:
        log.say(private.describe())
    metrics: dict = {}

    # ---- the loop --------------------------------------------------------------------------------
    model.train()
    # The log's throughput window is measured in train_seconds, which count training steps only:
    # evaluations and checkpoints between two log lines never dilute (or, reset, inflate) the rate.
    window_start, window_steps = train_seconds, 0
    # This process's first step apart from the rest: it pays for warm-up (and, with compile, for
    # compiling), so the summary's rate is the steady state's, as the benchmarks report it.
    first_step_seconds, steady_seconds, steady_steps = None, 0.0, 0
    while step < total:
        t_step = time.perf_counter()
        lr = lr_at(step, total, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=env.device)
        for k in range(t.grad_accum):
            lo = (env.rank * t.grad_accum + k) * micro
            x, y = task.batch(step, lo, lo + micro)
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            if t.adversarial == "pgd":  # train on the batch's worst case within the eps ball
                x = adversarial_batch(model, x, y, task, step, lo)
            if t.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            # Gradients are reduced over ranks only on the last micro-batch's backward.
            with distributed.grad_sync(fmodel, k == t.grad_accum - 1):
                with autocast(precision, env.device):
                    loss = task.loss(fmodel(x), y) / t.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        # The one device-to-host sync per step: the loss for the log, and the NaN/Inf check.
        loss_val = distributed.all_mean(loss_sum, env).item()
        if not math.isfinite(loss_val):
            bad_steps += 1
            optimizer.zero_grad(set_to_none=True)
            if bad_steps > t.max_bad_steps:
                log.close()
                ckpt = run_dir / runfolder.CHECKPOINT
                kept = f"; last good checkpoint kept at {ckpt}" if ckpt.exists() else ""
                raise NnlabError(f"train: loss is {loss_val} at step {step}; stopped{kept}")
            log.say(f"step {step}: loss is {loss_val}, batch skipped ({bad_steps}/{t.max_bad_steps})")
            step += 1
            continue
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t_step
        train_seconds += dt
        window_steps += 1
        if first_step_seconds is None:
            first_step_seconds = dt
        else:
            steady_seconds, steady_steps = steady_seconds + dt, steady_steps + 1

        if step % t.log_every == 0 or step == total:
            elapsed = train_seconds - window_start
            rate = window_steps * per_step / max(elapsed, 1e-9)
            eta = (total - step) * elapsed / max(window_steps, 1)
            log.train_line(step, loss_val, lr, rate, eta)
            log.record("train", step, loss=loss_val, lr=lr, **{f"{unit}_per_s": rate},
                       train_seconds=round(train_seconds, 6))
            window_start, window_steps = train_seconds, 0

        epoch_end = step % task.steps_per_epoch() == 0
        if (step % t.eval_every == 0 if t.eval_every else epoch_end) or step == total:
            if env.is_main or all_ranks:
                model.eval()
                metrics = task.evaluate(model, env.device)
                model.train()
                # train_seconds: time in training steps so far (compile included, evaluations not),
                # so a time-to-target is read straight from metrics.jsonl.
                log.record("eval", step, **metrics, train_seconds=round(train_seconds, 3))
                log.say(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if t.checkpoint_every == 0:
                runfolder.save_checkpoint(run_dir, model, optimizer, cfg, env, step=step, bad_steps=bad_steps,
                                          train_seconds=train_seconds)
        if t.checkpoint_every and (step % t.checkpoint_every == 0 or step == total):
            runfolder.save_checkpoint(run_dir, model, optimizer, cfg, env, step=step, bad_steps=bad_steps,
                                      train_seconds=train_seconds)
    log.close()

    # ---- the finished run ------------------------------------------------------------------------
    weights = runfolder.full_model_state(model)  # a collective under FSDP: every rank calls it
    if env.is_main:
        if not metrics:  # resumed after the last step: nothing was evaluated in this process
            model.eval()
            metrics = task.evaluate(model, env.device)
        runfolder.save_model(run_dir, weights, dataclasses.asdict(cfg.model), task.kind, task.meta())
        speed = {f"{unit}_per_s": round(steady_steps * per_step / steady_seconds, 1) if steady_steps else None,
                 "first_step_seconds": round(first_step_seconds, 3) if first_step_seconds is not None else None}
        summary = {"recipe": cfg.recipe, "model": cfg.model.name, "steps": step, "train_seconds": round(train_seconds, 2),
                   **speed, "params": n_params, **metrics, "precision": precision, "precision_reason": precision_why,
                   "allocator": allocator,
                   "world_size": env.world_size, "bad_steps": bad_steps, "seed": t.seed,
                   "machine": machine_info(), "kernels_used": kernels.used(),
                   **(private.summary(step) if private else {})}
        runfolder.write_summary(run_dir, summary)
        rate = (f"; {speed[f'{unit}_per_s']:,.0f} {unit}/s after a first step of {first_step_seconds:.2f} s"
                if steady_steps else "")
        log.say("done: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"{rate}; run folder {run_dir}")
    return run_dir


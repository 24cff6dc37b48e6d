"""The likelihood-ratio membership-inference attack with shadow models (LiRA, Carlini et al., 2022).

A model's confidence in an example's label depends on the example: easy ones score high whether
trained on or not. LiRA measures that per example. K shadow models of the target's recipe are
trained on random halves of a pool (the audit's candidate members and non-members), so that each
candidate is IN (trained on) exactly K//2 shadows and OUT of the rest. Its score under each model
is the logit-scaled confidence

    phi = log(p_y / (1 - p_y)) = z_y - logsumexp(z_j, j != y)

(z the logits, in float64: the right side never forms 1 - p_y, which rounds to 0 for a memorised
example). Fitting a Gaussian to the IN and to the OUT shadows' phi of each example gives

    online:  score = log N(phi_target; mu_in, s_in^2) - log N(phi_target; mu_out, s_out^2)
    offline: score = log P(phi_OUT <= phi_target) under N(mu_out, s_out^2)

higher meaning "member". The means are per example; the variances are global (pooled over
examples), the paper's choice for fewer than 64 shadows, where a per-example variance from a
handful of scores is noise. The offline score needs only the OUT shadows: with the same shadows
it comes free beside the online one.

Shadows train through nnlab's own loop (nnlab.train.loop.train) on the run's own config, with the
chosen examples in place of the training split and a fresh seed each. A shadow keeps the target's
sampling rate (batch size / training examples, so its batch shrinks with its smaller set) and its
number of steps: it sees each example as many times as the target saw its own, in as many
updates, since exposure and updates are what memorisation depends on (a kept batch would give a
batch-2,048 target's shadows on 2,000 examples one step per epoch). For a DP-SGD target the same rate and steps give the same
noise multiplier, so its shadows run the target's own private mechanism (and spend its epsilon).
A shadow's test accuracy (reported as a sanity check) is measured on the whole test split, which
holds the pool's non-members, about half of them trained on: slightly optimistic.
"""

from __future__ import annotations

import contextlib
import io
import tempfile

import numpy as np
import torch
from scipy.stats import norm

from nnlab import runfolder

DEFAULT_SHADOWS = 8


def logit_confidence(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """phi = z_y - logsumexp(z_j, j != y) per example under `model` (eval mode), in float64."""
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            z = model(x[i : i + batch_size]).double()
            yb = y[i : i + batch_size, None]
            others = z.scatter(1, yb, float("-inf"))
            out.append((z.gather(1, yb)[:, 0] - torch.logsumexp(others, 1)).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def in_masks(pool: int, shadows: int, seed: int) -> np.ndarray:
    """(shadows, pool) booleans: which examples each shadow trains on. Every example is IN exactly
    shadows // 2 of them, chosen at random per example, so each shadow holds about half the pool."""
    rng = np.random.default_rng([seed, 0x11AA])
    ranks = rng.random((shadows, pool)).argsort(0).argsort(0)
    return ranks < shadows // 2


def _schedule(cfg, shadow_rows: int, target_rows: int) -> tuple[int, int | None]:
    """A shadow's (batch size, max_steps or None): see the module docstring."""
    t = cfg.train
    batch_size = max(1, round(t.batch_size * shadow_rows / target_rows))  # the target's sampling rate
    return batch_size, t.max_steps  # with the same epochs (or max_steps): the target's number of steps


def shadow_overrides(cfg, shadow_rows: int, target_rows: int, seed: int) -> list[str]:
    """--set strings that turn the target run's config into shadow `seed`'s: its own seed, the same
    exposure per example, one evaluation at the end, no per-step log."""
    batch_size, max_steps = _schedule(cfg, shadow_rows, target_rows)
    sets = [f"train.seed={seed}", f"train.batch_size={batch_size}", "train.eval_every=1000000000",
            "train.log_every=1000000000", "train.checkpoint_every=1000000000"]
    return sets + ([f"train.max_steps={max_steps}"] if max_steps else [])


def shadow_training(cfg, shadow_rows: int, target_rows: int) -> str:
    """How long a shadow trains, in words, for audit.json."""
    batch_size, max_steps = _schedule(cfg, shadow_rows, target_rows)
    return (f"{max_steps} steps" if max_steps else f"{cfg.train.epochs} epochs") + f" of batch {batch_size}"


def train_shadows(config_file, cfg, x: torch.Tensor, y: torch.Tensor, masks: np.ndarray, target_rows: int,
                  seed: int, say=print) -> tuple[np.ndarray, list[dict]]:
    """Train one shadow per row of `masks` on the pool examples it marks; return (shadows, pool) phi
    of every pool example under every shadow, and each shadow's summary.json. Shadow run folders
    live in a temporary folder."""
    from nnlab.train.loop import train

    scores, summaries = np.empty(masks.shape), []
    with tempfile.TemporaryDirectory(prefix="nnlab-shadows-") as tmp:
        for k, mask in enumerate(masks):
            rows = torch.from_numpy(np.flatnonzero(mask))
            sets = shadow_overrides(cfg, len(rows), target_rows, seed=seed * 1000 + k + 1)
            with contextlib.redirect_stdout(io.StringIO()):  # one line per shadow instead of a training log
                # The run's own config.yaml as the recipe: complete, and found even when the run was
                # trained from a YAML file that has since moved.
                run_dir = train(str(config_file), sets, out=f"{tmp}/shadow{k}", _examples=(x[rows], y[rows]))
            model, _ = runfolder.load(run_dir)
            scores[k] = logit_confidence(model, x, y)
            summaries.append(runfolder.read_json(run_dir / runfolder.SUMMARY))
            say(f"shadow {k + 1}/{len(masks)}: trained on {len(rows)} of {len(x)} pool examples, "
                f"test accuracy {summaries[-1].get('test_accuracy', float('nan')):.4f}")
    return scores, summaries


def lira_scores(target_phi: np.ndarray, shadow_phi: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(online, offline) membership scores, higher meaning member, for the target's phi of each pool
    example given the shadows' phi (shadows, pool) and which shadows trained on it (masks)."""
    out_n, in_n = (~masks).sum(0), masks.sum(0)
    mu_out = np.where(~masks, shadow_phi, 0).sum(0) / out_n
    mu_in = np.where(masks, shadow_phi, 0).sum(0) / in_n
    # Global variances: the residuals of every example around its own mean, pooled.
    s_out = np.sqrt(np.mean((shadow_phi - mu_out)[~masks] ** 2)) + 1e-12
    s_in = np.sqrt(np.mean((shadow_phi - mu_in)[masks] ** 2)) + 1e-12
    online = norm.logpdf(target_phi, mu_in, s_in) - norm.logpdf(target_phi, mu_out, s_out)
    offline = norm.logcdf(target_phi, mu_out, s_out)
    return online, offline

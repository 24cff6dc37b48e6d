"""Differentially private training: DP-SGD (Abadi et al., 2016) through Opacus.

DP-SGD changes three things in a training step, and the loop keeps everything else:

    sampling   each training example joins step t's batch independently with probability
               q = batch_size / N (Poisson sampling, what the accountants assume): batches vary in
               size and may be empty
    clipping   each example's gradient g_i is scaled to norm at most C:  g_i * min(1, C / ||g_i||)
    noise      the step's gradient is (sum_i clip(g_i) + N(0, sigma^2 C^2 I)) / (q N)

The noise multiplier sigma is the smallest that keeps the run's T steps within (epsilon, delta)
by the chosen accountant (train.privacy.accountant); summary.json then records the epsilon that
both the RDP and the PRV accountant compute for that (sigma, q, T), side by side. With
train.privacy.noise=false the run clips but adds no noise: no privacy at all, the baseline that
separates what clipping costs in accuracy from what noise costs.

Per-example gradients come from Opacus's hooks: a forward hook keeps each layer's input, a backward
hook its output gradient, and a grad sampler per layer type turns the two into one gradient per
example. nnlab's layers subclass nn.Linear / nn.Conv2d, and Opacus looks samplers up by exact type,
so the samplers for them are registered below; ConvPoolReLU's output is pooled, so its sampler
first carries the output gradient back through ReLU and pooling to the convolution's output.
nnlab's CPU kernels may still run the forward pass: the samplers recompute what they need with
torch's functional ops.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnlab.config import TrainConfig
from nnlab.errors import ConfigError
from nnlab.nn import Conv2d, ConvPoolReLU, Dense

# PRV's discretised grid grows with epsilon: at epsilon ~500 one evaluation takes a minute and GBs.
PRV_MAX_EPSILON = 50.0


def enabled(t: TrainConfig) -> bool:
    return t.privacy.epsilon is not None


def _opacus():
    try:
        import opacus
    except ModuleNotFoundError:
        raise ConfigError("train.privacy.epsilon: DP-SGD needs Opacus: pip install 'nnlab[privacy]'") from None
    return opacus


# ---- per-example gradients of nnlab's layers ----------------------------------------------------

def _conv_grad_sample(layer: nn.Conv2d, x: Tensor, grad_c: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients of a convolution C = X * W + b from its input x (N, C_in, H, W) and the
    gradient of the loss at its output grad_c (N, C_out, H', W'): dW_n[o, i, a, b] = sum_hw
    grad_c_n[o, h, w] x_n[i, s h + a, s w + b], as one batched matmul per example. The k*k shifted
    views are gathered by slicing: F.unfold (im2col) is several times slower on CPU."""
    n, c_out, h_out, w_out = grad_c.shape
    (k, _), (s, _), (pad, _) = layer.kernel_size, layer.stride, layer.padding
    xp = F.pad(x.to(grad_c.dtype), (pad, pad, pad, pad))
    cols = torch.stack([xp[:, :, a : a + s * (h_out - 1) + 1 : s, b : b + s * (w_out - 1) + 1 : s]
                        for a in range(k) for b in range(k)], 2)  # (N, C_in, k*k, H', W')
    g = grad_c.reshape(n, c_out, h_out * w_out)  # (N, C_out, L); sizes spelled out: N may be 0
    cols = cols.reshape(n, x.shape[1] * k * k, h_out * w_out)  # (N, C_in*k*k, L)
    out = {layer.weight: torch.bmm(g, cols.transpose(1, 2)).reshape(n, *layer.weight.shape)}
    if layer.bias is not None:
        out[layer.bias] = g.sum(2)
    return out


def _sample_conv(layer: Conv2d, activations: list[Tensor], backprops: Tensor) -> dict:
    return _conv_grad_sample(layer, activations[0], backprops)


def _sample_conv_pool_relu(layer: ConvPoolReLU, activations: list[Tensor], backprops: Tensor) -> dict:
    x = activations[0]
    with torch.enable_grad():  # the hook runs inside backward, where grad mode is off
        c = F.conv2d(x.to(backprops.dtype), layer.weight.detach(), layer.bias.detach() if layer.bias is not None
                     else None, layer.stride, layer.padding).requires_grad_()
        (grad_c,) = torch.autograd.grad(torch.relu(F.max_pool2d(c, 2)), c, backprops)
    return _conv_grad_sample(layer, x, grad_c)


def _register_samplers() -> None:
    from opacus.grad_sample.linear import compute_linear_grad_sample
    from opacus.grad_sample.utils import register_grad_sampler

    register_grad_sampler(Dense)(compute_linear_grad_sample)  # Dense's forward is F.linear's
    register_grad_sampler(Conv2d)(_sample_conv)
    register_grad_sampler(ConvPoolReLU)(_sample_conv_pool_relu)


# ---- the private run -----------------------------------------------------------------------------

class PoissonBatches:
    """The task as DP-SGD sees it: the batch at step s holds each training example with probability
    q, drawn from (seed, s) alone, so it is a pure function of the step as the task's own batches
    are; the loss of an empty batch is a zero that still runs the backward (the step adds noise)."""

    def __init__(self, task, rate: float):
        self.task, self.rate = task, rate
        if task.kind == "image":
            self.x, self.y = task.x_train, task.data.y_train
        else:
            self.x, self.y = task.x_train, task.y_train

    def __getattr__(self, name):
        return getattr(self.task, name)

    def batch(self, step: int, lo: int = 0, hi: int | None = None) -> tuple[Tensor, Tensor]:
        keep = torch.rand(len(self.x), generator=self.task._gen(0x9015_5017, step)) < self.rate
        idx = keep.nonzero().squeeze(1)
        return self.x.index_select(0, idx), self.y.index_select(0, idx)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return self.task.loss(out, y) if len(y) else out.sum() * 0.0


class PrivateTraining:
    """What the loop swaps in for a DP-SGD run: `task` (Poisson batches) and `optimizer` (per-example
    clipping and noise before each step); `summary(steps)` says what the run spent."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, task, t: TrainConfig, steps: int):
        from opacus.grad_sample import GradSampleHooks
        from opacus.optimizers import DPOptimizer

        check_model(model)
        self.t, self.steps = t, steps
        self.rate = t.batch_size / task.num_train()
        if self.rate > 1:
            raise ConfigError(f"train.batch_size: {t.batch_size} is larger than the {task.num_train()} training "
                              f"examples DP-SGD samples from")
        self.noise_multiplier = self._noise_multiplier() if t.privacy.noise else 0.0
        self.hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean")
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                     max_grad_norm=t.privacy.max_grad_norm, expected_batch_size=t.batch_size,
                                     loss_reduction="mean")
        self.task = PoissonBatches(task, self.rate)

    def _noise_multiplier(self) -> float:
        from opacus.accountants.utils import get_noise_multiplier

        t = self.t
        return get_noise_multiplier(target_epsilon=t.privacy.epsilon, target_delta=t.privacy.delta,
                                    sample_rate=self.rate, steps=self.steps, accountant=t.privacy.accountant)

    def describe(self) -> str:
        t = self.t
        if not t.privacy.noise:
            return (f"DP-SGD without noise (clipping only, no privacy): C {t.privacy.max_grad_norm}, "
                    f"Poisson rate {self.rate:.5f}")
        return (f"DP-SGD to epsilon {t.privacy.epsilon} at delta {t.privacy.delta:g}: noise multiplier "
                f"{self.noise_multiplier:.4f}, C {t.privacy.max_grad_norm}, Poisson rate {self.rate:.5f}")

    def summary(self, steps: int) -> dict:
        """summary.json's "privacy" entry for `steps` steps taken."""
        t = self.t
        out = {"target_epsilon": t.privacy.epsilon if t.privacy.noise else None, "delta": t.privacy.delta,
               "noise": t.privacy.noise, "noise_multiplier": self.noise_multiplier,
               "max_grad_norm": t.privacy.max_grad_norm, "sample_rate": self.rate, "steps": steps,
               "noise_set_by": t.privacy.accountant}
        return {"privacy": {**out, **spent_epsilon(self.noise_multiplier, self.rate, steps, t.privacy.delta)}}


def spent_epsilon(noise_multiplier: float, rate: float, steps: int, delta: float) -> dict:
    """The epsilon that `steps` DP-SGD steps at (noise_multiplier, rate) spend at `delta`, by the RDP
    and the PRV accountant. None where there is no noise (epsilon is infinite). PRV's numerical
    method can fail at large epsilon or many steps; its entry is then None, with the reason."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    if noise_multiplier == 0 or steps == 0:
        return {"epsilon_rdp": None if steps else 0.0, "epsilon_prv": None if steps else 0.0}
    rdp = RDPAccountant()
    rdp.history = [(noise_multiplier, rate, steps)]
    out = {"epsilon_rdp": float(rdp.get_epsilon(delta))}
    if out["epsilon_rdp"] > PRV_MAX_EPSILON:
        return {**out, "epsilon_prv": None, "epsilon_prv_failed": f"PRV accountant not run above epsilon "
                                                                   f"{PRV_MAX_EPSILON:g}; the RDP figure stands"}
    prv = PRVAccountant()
    prv.history = [(noise_multiplier, rate, steps)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eps = prv.get_epsilon(delta)
        if not math.isfinite(eps):
            raise RuntimeError(f"epsilon {eps}")
        out["epsilon_prv"] = float(eps)
    except (RuntimeError, ValueError, OverflowError, MemoryError) as e:
        out["epsilon_prv"] = None
        out["epsilon_prv_failed"] = f"PRV accountant failed ({e}); the RDP figure stands"
    return out


def check_model(model: nn.Module) -> None:
    """A ConfigError unless Opacus can give every trainable layer of `model` per-example gradients."""
    _opacus()
    from opacus.grad_sample import GradSampleHooks
    from opacus.validators import ModuleValidator

    _register_samplers()
    name = getattr(getattr(model, "cfg", None), "name", type(model).__name__)
    problems = [str(e).splitlines()[0] for e in ModuleValidator.validate(model, strict=False)]
    problems += [f"{type(m).__name__} has no per-example gradient in Opacus"
                 for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))
                 and type(m) not in GradSampleHooks.GRAD_SAMPLERS]
    if problems:
        hint = "; set model.norm=group" if name == "cnn" else ""
        raise ConfigError(f"train.privacy.epsilon: model {name} cannot train with DP-SGD ({problems[0]}){hint}")


def check(cfg, world_size: int, resume: bool) -> None:
    """Settings DP-SGD cannot honour, as one-line ConfigErrors (before anything is built)."""
    t = cfg.train
    if not enabled(t):
        return
    _opacus()
    if cfg.data.name == "text":
        raise ConfigError("train.privacy.epsilon: DP-SGD here trains classifiers and regressors of images and "
                          "tables, not language models")
    if not math.isfinite(t.privacy.epsilon):
        raise ConfigError("train.privacy.epsilon: must be finite; train.privacy.noise=false clips without noise")
    if not 0 < t.privacy.delta < 1:
        raise ConfigError(f"train.privacy.delta: must be in (0, 1), got {t.privacy.delta}")
    for key, bad, why in (
            ("grad_accum", t.grad_accum != 1, "a Poisson batch is one micro-batch"),
            ("grad_clip", t.grad_clip != 0, "DP-SGD clips each example's gradient (train.privacy.max_grad_norm)"),
            ("compile", t.compile, "Opacus's hooks do not run under torch.compile"),
            ("activation_checkpointing", t.activation_checkpointing, "Opacus's hooks need each layer's input"),
            ("max_bad_steps", t.max_bad_steps != 0, "a skipped step would leave the accountant's count")):
        if bad:
            raise ConfigError(f"train.{key}: does not combine with train.privacy.epsilon ({why})")
    if world_size > 1:
        raise ConfigError("train.privacy.epsilon: DP-SGD runs in one process here, not under torchrun")
    if resume:
        raise ConfigError("--resume: a DP-SGD run cannot resume (its optimizer and sampler state are not "
                          "checkpointed); train it again")

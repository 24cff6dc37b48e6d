"""PGD adversarial training (Madry et al., 2018): min_theta E[max_{|d|_inf <= eps} L(f(x + d), y)].

The inner max is approximated by nnlab.analysis.attack.pgd: train.adversarial_steps signed-gradient
steps of 2.5 eps / steps from a uniform random start in the eps ball, in pixel space [0, 1] with the
task's normalisation inside the attacked function, so eps means the same as in `nnlab attack`. The
loop then takes its ordinary forward/backward on the adversarial batch in place of the clean one.

The attack runs with the model in eval mode (restored after): BatchNorm uses its running statistics
and does not count the attack's forward passes in them, and dropout is off, so the batch is
adversarial to the model that is evaluated. It runs in fp32 outside autocast. The random start is
drawn from (train.seed, step, first row), not from the global generator, so a resumed run draws
exactly the same starts.
"""

from __future__ import annotations

from torch import Tensor, nn


def adversarial_batch(model: nn.Module, x: Tensor, y: Tensor, task, step: int, first_row: int) -> Tensor:
    """The PGD adversarial version of the normalised image batch x (same shape and normalisation)."""
    from nnlab.analysis.attack import PixelModel, evaluating, pgd

    t = task.cfg.train
    mean, std = task.data.mean, task.data.std
    seed = hash((t.seed, step, first_row)) & 0x7FFF_FFFF_FFFF_FFFF
    with evaluating(model):
        pixels = pgd(PixelModel(model, mean, std), x * std + mean, y, t.adversarial_eps, t.adversarial_steps,
                     seed=seed)
    return (pixels - mean) / std

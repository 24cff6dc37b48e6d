"""nnlab.train.optim.make_optimizer: weight decay reaches matrices and conv filters only, never
biases (the GPT-2 / nanoGPT convention its docstring states)."""

import pytest
import torch

from nnlab.config import TrainConfig
from nnlab.models import build_model
from nnlab.train.optim import make_optimizer


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_weight_decay_shrinks_matrices_and_filters_only(optimizer):
    """With zero gradients a step is weight decay alone: every matrix and filter shrinks by
    lr * weight_decay (AdamW's decoupled decay) or moves against its decay gradient (SGD); every
    bias stays as it was."""
    torch.manual_seed(0)
    model = build_model("seed-cnn")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, TrainConfig(optimizer=optimizer, lr=0.1, weight_decay=0.5), fused=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if p.dim() >= 2:  # theta <- theta - lr * wd * theta, in both optimizers here
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5), msg=n)
        else:
            assert torch.equal(p.detach(), before[n]), n

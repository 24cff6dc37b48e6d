"""Optimizers: the article's gradient descent (torch.optim.SGD: theta <- theta - alpha * grad, plus
optional momentum) and AdamW. Weight decay applies only to matrices and conv filters, never to
biases, norms or embeddings' position tables (the GPT-2 / nanoGPT convention)."""

from __future__ import annotations

import torch
from torch import nn

from nnlab.config import TrainConfig


def make_optimizer(model: nn.Module, t: TrainConfig, fused: bool = True) -> torch.optim.Optimizer:
    """`fused`: AdamW as one fused kernel over all parameters. On CPU torch otherwise loops over the
    parameters one by one (its foreach default is CUDA-only). The loop passes fused=False under
    torchrun, where FSDP's sharded parameters take the reference path."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        # momentum=0 is exactly theta <- theta - lr * grad (tests/test_ops.py checks it by hand).
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused or None)


"""Optimizers: the article's gradient descent (torch.optim.SGD: theta <- theta - alpha * grad, plus
optional momentum) and AdamW. Weight decay applies only to matrices and conv filters, never to
biases, norms or embeddings' position tables (the GPT-2 / nanoGPT convention)."""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterable

import torch
from torch import nn

from nnlab.config import TrainConfig


def make_optimizer(model: nn.Module, t: TrainConfig, fused: bool = True) -> torch.optim.Optimizer:
    """`fused`: AdamW as one fused kernel over all parameters. On CPU torch otherwise loops over the
    parameters one by one (its foreach default is CUDA-only): for the baby GPT a step took 3.9 ms
    that way and 0.9 ms fused, about 8% of a training step. The loop passes fused=False under
    torchrun, where FSDP's sharded parameters take the reference path."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        # momentum=0 is exactly theta <- theta - lr * grad (tests/test_ops.py checks it by hand).
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused or None)


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_(parameters, max_norm): scale every gradient by
    min(1, max_norm / (total L2 norm + 1e-6)) and return that total norm (before clipping).

    On CPU torch runs one norm and one multiply per tensor (its fused foreach kernels are for GPUs):
    for the baby GPT's 52 gradients ~1 ms of a ~22 ms compiled bf16 step, mostly call overhead.
    Where every gradient is a plain contiguous fp32 CPU tensor, nn/clip.c does each pass in one call
    over all of them. Anything else (no kernels, DTensor shards under FSDP, other dtypes, GPU) goes
    to torch's, which tests/test_optim.py checks this against."""
    from nnlab.nn import kernels  # here, not at the top: importing nnlab.train stays light

    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    lib = kernels.library()
    if lib is None or not grads or not all(type(g) is torch.Tensor and g.is_cpu  # noqa: E721 (not a subclass)
                                           and g.dtype is torch.float32 and g.is_contiguous() for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)  # a tensor: no GPU sync here
    n, threads = len(grads), torch.get_num_threads()
    ptrs = (ctypes.c_void_p * n)(*(g.data_ptr() for g in grads))
    sizes = (ctypes.c_int64 * n)(*(g.numel() for g in grads))
    total = math.sqrt(lib.sumsq_many(ptrs, sizes, n, threads))
    coef = max_norm / (total + 1e-6)
    if not coef >= 1.0:  # as torch: a NaN norm makes every gradient NaN
        lib.scale_many(ptrs, sizes, n, coef, threads)
    return torch.tensor(total)

"""Process group set-up and the one place where scaling is applied to a single-device model.

Launch with torchrun (`torchrun --nproc_per_node=N -m nnlab train RECIPE`); without it, world
size is 1 and nothing here does anything. Backend: nccl on CUDA, gloo on CPU.

Order, applied from outside the model (as in torchtitan): channels_last memory format (loop) ->
activation checkpointing (per block, in place) -> FSDP2 sharding (in place, per block, then the
root) -> torch.compile (nnlab/train/compile.py) -> DDP wrapper. The model files never see any of it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nnlab.config import TrainConfig
from nnlab.errors import ConfigError
from nnlab.train.compile import compile_model


@dataclass
class Env:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> Env:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Env(rank=rank, world_size=world, local_rank=local, device=device)


def shutdown(ok: bool = True) -> None:
    if dist.is_initialized():
        # After a clean run, wait for rank 0 to finish writing: tearing down gloo while a peer is
        # still in its last collective can abort that peer. After an error, don't wait: the peers
        # may never arrive.
        try:
            if ok:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def all_mean(x: torch.Tensor, env: Env) -> torch.Tensor:
    """The mean of a scalar tensor over ranks (so every rank logs and decides alike)."""
    if env.world_size > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= env.world_size
    return x


@contextlib.contextmanager
def grad_sync(fmodel: nn.Module, sync: bool):
    """Inside: backward reduces gradients over ranks only if `sync` (skip it for all but the last
    micro-batch of a gradient-accumulation step; the last one reduces the accumulated sum)."""
    if sync or not dist.is_initialized():
        yield
    elif hasattr(fmodel, "no_sync"):  # DDP
        with fmodel.no_sync():
            yield
    elif hasattr(fmodel, "set_requires_gradient_sync"):  # FSDP2
        fmodel.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            fmodel.set_requires_gradient_sync(True)
    else:
        yield


def repeated_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's list of repeated blocks (transformer blocks, CNN stages, MLP layers), if any:
    the units activation checkpointing and FSDP apply to."""
    return next((m for m in (getattr(model, n, None) for n in ("blocks", "stages", "layers"))
                 if isinstance(m, nn.ModuleList)), None)


def checkpoint_activations(model: nn.Module) -> None:
    """Wrap each repeated block of `model` in place so that backward recomputes its activations
    from its input instead of keeping them. The wrapper adds no state-dict keys (it maps its own
    prefix away), so checkpoints and saved models load into a plain model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = repeated_blocks(model)
    if blocks is None:
        raise ConfigError(f"train.activation_checkpointing: {type(model).__name__} has no repeated blocks to "
                          "checkpoint")
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block)  # non-reentrant torch.utils.checkpoint; dropout masks replay


def parallelize(model: nn.Module, t: TrainConfig, env: Env) -> nn.Module:
    """Apply train config `t`'s scaling to the single-device model; returns the module to call in
    the loop.

    Activation checkpointing and FSDP2 change `model` in place (FSDP's parameters become
    DTensors), so the loop keeps using `model` for evaluation and checkpoints; compile and DDP
    return wrappers used only for training.
    """
    if t.activation_checkpointing:
        checkpoint_activations(model)
    if env.world_size > 1 and t.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Shard each repeated block on its own, so only one block's full weights exist at a time.
        for block in repeated_blocks(model) or []:
            fully_shard(block)
        fully_shard(model)
    if t.compile:
        model = compile_model(model, t.compile_mode, env.device)
    if env.world_size > 1 and t.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return model

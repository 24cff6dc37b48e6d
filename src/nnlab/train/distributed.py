"""Process group set-up and the one place where scaling is applied to a single-device model.

Launch with torchrun (`torchrun --nproc_per_node=N -m nnlab train RECIPE`); without it, world
size is 1 and nothing here does anything. Backend: nccl on CUDA, gloo on CPU.

Order, applied from outside the model (as in torchtitan): channels_last memory format (loop) ->
activation checkpointing (a model config switch) -> FSDP2 sharding (in place, per block, then the
root) -> torch.compile -> DDP wrapper. The model files never see any of it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


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
        # still in its last collective aborted a rank ("terminate called without an active
        # exception") in CI. After an error, don't wait: the peers may never arrive.
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


def compile_options(mode: str, device: torch.device) -> dict:
    """torch.compile's options for `mode` (what mode=... would set), plus, on CPU, a C++ wrapper.

    Why the wrapper: by default inductor's generated code calls each of its kernels and extern ops
    from Python, and for the baby GPT's training step (batch 12, ~100 kernel calls of 0.1 MB tensors)
    that Python was a fifth of the step: interleaved runs of the compiled bf16 step took 25.3-26.1 ms
    with cpp_wrapper against 31.8-33.3 ms without (AMX Xeon, 2 threads). A cold first compile took
    46 instead of 43 s."""
    import torch._inductor

    options = dict(torch._inductor.list_mode_options(mode))
    if device.type == "cpu":
        options["cpp_wrapper"] = True
    return options


def separate_inductor_cache() -> str | None:
    """When ATEN_CPU_CAPABILITY picks ATen's (and so inductor's) CPU code paths and no
    TORCHINDUCTOR_CACHE_DIR is set, point inductor at a cache folder of that capability's own; returns
    the folder, or None when nothing was changed.

    Why: inductor's on-disk graph cache is not keyed by the capability, so a process under another
    one loads code compiled for it. Seen on the AMX Xeon (torch 2.13): after a compile with
    ATEN_CPU_CAPABILITY=avx2 wrote an empty cache, plain compiled runs of gpt-shakespeare died with
    heap corruption ("malloc(): unaligned tcache chunk detected" and the like) in 3 of 3 tries,
    against 0 of 3 on a cache that only plain runs had written, and 0 of 3 with this folder set;
    the other way round, an avx2 run on the plain runs' cache had NaN loss at step 1."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    # Inductor writes its default folder into the variable at its first cache access (and torch
    # makes one while it loads), so the default there is not a user's choice.
    if not cap or os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) != default_cache_dir():
        return None
    folder = f"{default_cache_dir()}_{''.join(c for c in cap if c.isalnum())}"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder  # read by inductor at each cache access
    return folder


def parallelize(model: nn.Module, compile: bool, strategy: str, env: Env, compile_mode: str = "default") -> nn.Module:
    """Wrap the single-device model for speed and scale; returns the module to call in the loop.

    FSDP2 shards `model` in place (its parameters become DTensors), so the loop keeps using
    `model` for evaluation and checkpoints; DDP and compile return wrappers used only for training.
    """
    if env.world_size > 1 and strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Shard each repeated block on its own, so only one block's full weights exist at a time.
        for blocks in (getattr(model, "blocks", None), getattr(model, "stages", None), getattr(model, "layers", None)):
            for block in blocks or []:
                fully_shard(block)
        fully_shard(model)
    if compile:
        if env.device.type == "cpu":
            separate_inductor_cache()
        try:
            model = torch.compile(model, options=compile_options(compile_mode, env.device))
            # Compilation happens lazily, at the first forward: a graph that fails to compile
            # there (no C compiler, an unsupported op) then runs eager instead of ending the run.
            import torch._dynamo as dynamo  # (`import torch._dynamo` would make `torch` a local name here)

            dynamo.config.suppress_errors = True
        except Exception as e:  # e.g. an unsupported platform or Python version
            warnings.warn(f"train.compile: torch.compile unavailable ({e.__class__.__name__}); running eager")
    if env.world_size > 1 and strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return model

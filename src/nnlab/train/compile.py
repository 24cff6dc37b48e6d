"""torch.compile as nnlab applies it: the mode's own options, inductor's C++ wrapper on CPU, and a
cache folder per forced CPU capability. distributed.parallelize calls compile_model.

The modes (train.compile_mode) are torch's: `default`; `max-autotune-no-cudagraphs` times each
matmul's candidate kernels at the first compile (on CPU, inductor's AMX / AVX-512 C++ GEMM
templates against ATen's) and keeps the fastest, which makes the first compile much longer;
`reduce-overhead` and `max-autotune` add CUDA graphs on a GPU.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn


def compile_model(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """torch.compile(model) with compile_options(mode, device); the model itself where torch.compile
    is unavailable, with a warning."""
    if device.type == "cpu":
        separate_inductor_cache()
    try:
        compiled = torch.compile(model, options=compile_options(mode, device))
    except Exception as e:  # e.g. an unsupported platform or Python version
        warnings.warn(f"train.compile: torch.compile unavailable ({e.__class__.__name__}); running eager")
        return model
    # Compilation happens lazily, at the first forward: a graph that fails to compile there (no C
    # compiler, an unsupported op) then runs eager instead of ending the run.
    import torch._dynamo as dynamo  # (`import torch._dynamo` would make `torch` a local name here)

    dynamo.config.suppress_errors = True
    return compiled


def compile_options(mode: str, device: torch.device) -> dict:
    """torch.compile's options for `mode` (what mode=... would set), plus, on CPU, a C++ wrapper.

    Why the wrapper: by default inductor's generated code calls each of its kernels and extern ops
    from Python, and for a small model's training step (the baby GPT: ~100 kernel calls on 0.1 MB
    tensors) that Python is a large part of the step; the C++ wrapper makes those calls from C++
    at the cost of a slightly longer first compile."""
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
    one would load code compiled for it, and that code corrupts the heap or computes NaN."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    # Inductor writes its default folder into the variable at its first cache access (and torch
    # makes one while it loads), so the default there is not a user's choice.
    if not cap or os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) != default_cache_dir():
        return None
    folder = f"{default_cache_dir()}_{''.join(c for c in cap if c.isalnum())}"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder  # read by inductor at each cache access
    return folder

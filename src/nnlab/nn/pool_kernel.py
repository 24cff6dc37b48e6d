"""A fused 2x2 max-pool (+ ReLU) CPU kernel for channels-last tensors, built with the system's C compiler.

The kernel (pool2x2.c, beside this file) is compiled on first use into the user's cache folder and
loaded with ctypes: a plain C file needs no torch headers, so it builds in under a second. The
build is keyed by the source, the flags and the CPU (it uses -march=native), so a cache folder
shared between machines never loads a binary built for another processor.

`pool2x2(x, relu)` is F.max_pool2d(x, 2), followed by torch.relu when relu=True, with the same
values and the same gradients (tests/test_pool_kernel.py compares them, ties and NaNs included).
`supports(x)` says whether the kernel takes a tensor; callers use ATen otherwise. Without a C
compiler, or with NNLAB_NO_KERNELS=1 set, `supports` is always False and nothing changes but speed.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("pool2x2.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_TYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}
_state: dict = {}


def _cpu_id() -> str:
    """The processor's name and feature flags: what -march=native compiles for."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    first = {}
    for line in lines:
        first.setdefault(line.split(":")[0].strip(), line)
    return first.get("model name", "") + first.get("flags", "")


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "nnlab" / "kernels"


def _build() -> ctypes.CDLL | None:
    """Compile (once per source/CPU) and load the kernel; None, with the reason kept, if that fails."""
    if os.environ.get("NNLAB_NO_KERNELS"):
        _state["why"] = "NNLAB_NO_KERNELS is set"
        return None
    if platform.system() != "Linux" or not torch.backends.openmp.is_available():
        _state["why"] = "needs Linux and torch built with OpenMP"
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        _state["why"] = "no C compiler found"
        return None
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *FLAGS, _cpu_id()]).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"pool2x2-{key}.so"
    try:
        try:
            dll = ctypes.CDLL(str(lib))
        except OSError:  # not built yet, or a damaged file: (re)build it
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # build beside, then rename: atomic
                out = Path(tmp) / lib.name
                subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(out)], check=True, capture_output=True, timeout=120)
                os.replace(out, lib)
            dll = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e) or type(e).__name__
        detail = detail.decode(errors="replace") if isinstance(detail, bytes) else detail
        _state["why"] = f"build or load failed ({detail.strip().splitlines()[0] if detail.strip() else e})"
        return None
    L, I, P = ctypes.c_long, ctypes.c_int, ctypes.c_void_p
    for name in _TYPES.values():
        getattr(dll, f"pool2x2_fwd_{name}").argtypes = [P, P, P, L, L, L, L, I, I]
        getattr(dll, f"pool2x2_bwd_{name}").argtypes = [P, P, P, L, L, L, L, I]
    _state["why"] = f"built {lib}"
    return dll


def library() -> ctypes.CDLL | None:
    if "lib" not in _state:
        _state["lib"] = _build()
    return _state["lib"]


def status() -> str:
    """Why the kernel is or is not in use (for logs and the benchmark report)."""
    library()
    return _state["why"]


def supports(x: Tensor) -> bool:
    """A 4-D CPU bf16/fp32 channels-last tensor with even H and W, outside torch.compile's tracing."""
    return (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dim() == 4 and x.dtype in _TYPES
            and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0 and x.numel() > 0
            and x.is_contiguous(memory_format=torch.channels_last) and library() is not None)


class _Pool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, relu: bool) -> Tensor:
        N, C, H, W = x.shape
        y = torch.empty((N, C, H // 2, W // 2), dtype=x.dtype, memory_format=torch.channels_last)
        code = torch.empty((N, C, H // 2, W // 2), dtype=torch.uint8, memory_format=torch.channels_last)
        getattr(library(), f"pool2x2_fwd_{_TYPES[x.dtype]}")(
            x.data_ptr(), y.data_ptr(), code.data_ptr(), N, H, W, C, int(relu), torch.get_num_threads())
        ctx.save_for_backward(code)
        ctx.shape = x.shape
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):
        (code,) = ctx.saved_tensors
        N, C, H, W = ctx.shape
        gy = gy.contiguous(memory_format=torch.channels_last)
        gx = torch.empty(ctx.shape, dtype=gy.dtype, memory_format=torch.channels_last)
        getattr(library(), f"pool2x2_bwd_{_TYPES[gy.dtype]}")(
            gy.data_ptr(), code.data_ptr(), gx.data_ptr(), N, H, W, C, torch.get_num_threads())
        return gx, None


def pool2x2(x: Tensor, relu: bool = False) -> Tensor:
    """max_pool2d(x, 2) (then ReLU if relu) on a tensor that `supports` accepts."""
    return _Pool2x2.apply(x, relu)

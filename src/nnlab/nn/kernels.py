"""nnlab's CPU kernels for the article's CNN, built with the system's C compiler.

Three kernels, for the memory-bound work around seed-cnn's convolutions and for one gradient that
oneDNN computes densely (kernels.c says why ATen is slow there):
- `pool2x2(x, relu)`: F.max_pool2d(x, 2), then torch.relu when relu=True, for channels-last
  tensors; the same values and gradients bit for bit, ties and NaNs included. `supports(x)`.
- `conv_pool(x, conv, relu)`: max_pool2d(conv(x), 2) (then ReLU) for a 3x3 convolution.
  - One input channel (block 1): one pass that never writes the full-size conv output; it
    declines inputs that need a gradient (attacks and saliency then take the unfused path).
  - Input channels a multiple of 16 (block 2): under bf16 autocast ATen (oneDNN) convolves and
    computes the input gradient; in fp32 winograd.c does both with Winograd's F(2x2, 3x3), 16
    multiplies per 2x2 outputs instead of 36, fused with the pooling in forward (output channels a
    multiple of 32, else ATen). The pool kernel pools, and the weight gradient is summed from the
    pooled gradient, at the windows' winners only.
  Equal to the unfused path up to float rounding, in fp32 and under bf16 autocast.
  `supports_conv_pool(x, conv)`.
tests/test_kernels.py compares each with ATen (Winograd also with a float64 convolution). Callers
use ATen whenever `supports*` says no. The same library holds attention.c, the self-attention
kernel that nn/attention.py wraps.

kernels.c (with winograd.c and attention.c) is compiled on first use into the user's
cache folder and loaded with ctypes: plain C needs no torch headers, so it builds in about a
second. The build is keyed by the sources, the flags and the CPU (it uses -march=native), so a
cache folder shared between machines never loads a binary built for another processor. Without a
C compiler, or with NNLAB_NO_KERNELS=1 set, every `supports*` is False and nothing
changes but speed.
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

# One library: attention.py calls attention.c's functions; the C files share bf16.h and simd.h.
SOURCES = [Path(__file__).with_name(n) for n in ("kernels.c", "winograd.c", "attention.c")]
HEADERS = [Path(__file__).with_name(n) for n in ("bf16.h", "simd.h")]
# -ffp-contract=fast: multiply-adds as FMAs (-std=c11 alone turns that off; 1.5x on the conv kernel).
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
if platform.machine() in ("x86_64", "AMD64"):
    FLAGS.insert(2, "-mprefer-vector-width=512")  # gcc's default for AVX-512 CPUs is 256-bit vectors
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
    """Compile (once per source/CPU) and load the kernels; None, with the reason kept, if that fails."""
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
    src = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    flags = FLAGS
    if os.environ.get("NNLAB_KERNELS_MARCH"):
        # Code for another processor than this one, e.g. x86-64-v3 (AVX2): to time the code an
        # AVX2-only CPU runs, on this one.
        flags = [f.replace("-march=native", "-march=" + os.environ["NNLAB_KERNELS_MARCH"]) for f in FLAGS]
    key = hashlib.sha256(src + " ".join([cc, *flags, _cpu_id()]).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"kernels-{key}.so"
    try:
        try:
            dll = ctypes.CDLL(str(lib))
        except OSError:  # not built yet, or a damaged file: (re)build it
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # build beside, then rename: atomic
                out = Path(tmp) / lib.name
                subprocess.run([cc, *flags, *map(str, SOURCES), "-o", str(out), "-lm"], check=True,
                               capture_output=True, timeout=120)
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
    dll.conv3x3_pool2x2_fwd.argtypes = [P, P, P, P, P, P, L, L, L, L, I, I, I]
    dll.conv3x3_pool2x2_fwd.restype = I
    dll.conv3x3_pool2x2_bwd.argtypes = [P, P, P, P, P, L, L, L, L, I, I]
    dll.conv3x3_pool2x2_wgrad.argtypes = [P, P, P, P, P, L, L, L, L, L, I, I]
    dll.conv3x3_pool2x2_wgrad.restype = I
    dll.conv3x3_winograd.argtypes = [P, P, P, P, P, L, L, L, L, L, I, I, I]
    dll.conv3x3_winograd.restype = I
    dll.conv_kernels_native.restype = I
    F = ctypes.c_float
    dll.attention_fwd.argtypes = [P, P, P, L, L, L, L, F, I, I, I]
    dll.attention_bwd.argtypes = [P, P, P, P, P, L, L, L, L, F, I, I, I]
    dll.attention_fwd.restype = dll.attention_bwd.restype = I
    _state["conv"] = bool(dll.conv_kernels_native())
    _state["why"] = f"built {lib}" + ("" if _state["conv"] else "; conv kernels off: no AVX2, ATen's are faster")
    return dll


def library() -> ctypes.CDLL | None:
    if "lib" not in _state:
        _state["lib"] = _build()
    return _state["lib"]


def conv_native() -> bool:
    """Whether the conv kernels run here (built, and the CPU has AVX2 or AVX-512); the pool kernel
    needs only a build."""
    return library() is not None and _state["conv"]


def status() -> str:
    """Why the kernels are or are not in use (for logs and the benchmark report)."""
    library()
    return _state["why"]


def _poolable(x: Tensor) -> bool:
    """Eager (a ctypes call can't be traced by torch.compile or jit), a non-empty 4-D CPU tensor with
    even H and W, and the kernels built: what both kernels need."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and x.device.type == "cpu" and x.dim() == 4 and x.numel() > 0
            and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0 and library() is not None)


def supports(x: Tensor) -> bool:
    """A bf16/fp32 channels-last tensor that `_poolable` accepts."""
    return _poolable(x) and x.dtype in _TYPES and x.is_contiguous(memory_format=torch.channels_last)


def _pool_forward(x: Tensor, relu: bool) -> tuple[Tensor, Tensor]:
    """(pooled x, winner codes), both channels-last (N, C, H/2, W/2)."""
    N, C, H, W = x.shape
    y = torch.empty((N, C, H // 2, W // 2), dtype=x.dtype, memory_format=torch.channels_last)
    code = torch.empty((N, C, H // 2, W // 2), dtype=torch.uint8, memory_format=torch.channels_last)
    getattr(library(), f"pool2x2_fwd_{_TYPES[x.dtype]}")(
        x.data_ptr(), y.data_ptr(), code.data_ptr(), N, H, W, C, int(relu), torch.get_num_threads())
    return y, code


def _pool_backward(gy: Tensor, code: Tensor, shape: torch.Size) -> Tensor:
    """The gradient of the pool's input, channels-last `shape`, from its output's gradient gy."""
    N, C, H, W = shape
    gy = gy.contiguous(memory_format=torch.channels_last)
    gx = torch.empty(shape, dtype=gy.dtype, memory_format=torch.channels_last)
    getattr(library(), f"pool2x2_bwd_{_TYPES[gy.dtype]}")(
        gy.data_ptr(), code.data_ptr(), gx.data_ptr(), N, H, W, C, torch.get_num_threads())
    return gx


class _Pool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, relu: bool) -> Tensor:
        y, code = _pool_forward(x, relu)
        ctx.save_for_backward(code)
        ctx.shape = x.shape
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):
        (code,) = ctx.saved_tensors
        return _pool_backward(gy, code, ctx.shape), None


def pool2x2(x: Tensor, relu: bool = False) -> Tensor:
    """max_pool2d(x, 2) (then ReLU if relu) on a tensor that `supports` accepts."""
    return _Pool2x2.apply(x, relu)


# ---- conv 1->C (3x3, pad 1) + 2x2 max-pool + ReLU in one pass ---------------------------------------

def _autocast_mode() -> str | None:
    """'bf16' under CPU bf16 autocast, 'fp32' outside autocast, None for anything else (fp16)."""
    if not torch.is_autocast_enabled("cpu"):
        return "fp32"
    return "bf16" if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None


def supports_conv_pool(x: Tensor, conv: torch.nn.Conv2d) -> bool:
    """A 3x3, pad-1, stride-1 convolution `conv` (fp32 weights on CPU) of x, then 2x2 pooling, that
    `conv_pool` computes; outside autocast or under CPU bf16 autocast, H and W even. Two cases:
    - one input channel: x (N, 1, H, W) fp32, no gradient wanted for x, C_out a multiple of 16 (the
      kernel's vector width, 8 or 16 floats);
    - C_in and C_out multiples of 16: x channels-last, fp32 (or bf16 under autocast), and x may need
      a gradient (ATen computes it).
    Only on CPUs with AVX2 or AVX-512: elsewhere their vectors would be split, and with split vectors
    they were slower than ATen's (kernels.c: by how much)."""
    w = conv.weight
    if not (_poolable(x)  # first: under jit tracing nothing below is looked at
            and _state["conv"]  # set by _poolable's library(): kernels.c's conv_kernels_native()
            and w.device.type == "cpu" and w.dtype == torch.float32 and tuple(w.shape[2:]) == (3, 3)
            and w.shape[0] % 16 == 0 and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and x.shape[1] == w.shape[1] and _autocast_mode() is not None):
        return False
    if x.shape[1] == 1:
        return x.dtype == torch.float32 and not x.requires_grad
    return (x.shape[1] % 16 == 0 and x.is_contiguous(memory_format=torch.channels_last)
            and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _autocast_mode() == "bf16")))


class _Conv3x3Pool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, bf16: bool, relu: bool) -> Tensor:
        N, _, H, W = x.shape
        C = weight.shape[0]
        # The kernel pads x (and in bf16 mode rounds x, W and b, as autocast would) into xpad, which
        # the backward reads. (C, 1, 3, 3) and (N, 1, H, W) tensors are contiguous in either layout.
        x, w = x.detach().contiguous(), weight.detach().contiguous()
        b = bias.detach().contiguous().data_ptr() if bias is not None else None
        xpad = torch.empty((N, H + 2, W + 2))
        dtype = torch.bfloat16 if bf16 else torch.float32
        y = torch.empty((N, C, H // 2, W // 2), dtype=dtype, memory_format=torch.channels_last)
        code = torch.empty((N, C, H // 2, W // 2), dtype=torch.uint8, memory_format=torch.channels_last)
        if library().conv3x3_pool2x2_fwd(x.data_ptr(), w.data_ptr(), b, xpad.data_ptr(), y.data_ptr(),
                                         code.data_ptr(), N, H, W, C, int(bf16), int(relu), torch.get_num_threads()):
            raise MemoryError("conv3x3_pool2x2_fwd: out of memory for its scratch")
        ctx.save_for_backward(xpad, code)
        ctx.bf16, ctx.has_bias, ctx.dims = bf16, bias is not None, (N, H, W, C)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):
        xpad, code = ctx.saved_tensors
        N, H, W, C = ctx.dims
        gy = gy.to(torch.bfloat16 if ctx.bf16 else torch.float32).contiguous(memory_format=torch.channels_last)
        threads = torch.get_num_threads()
        gw, gb = torch.zeros(threads, 9, C), torch.zeros(threads, C)  # one partial sum per thread
        library().conv3x3_pool2x2_bwd(gy.data_ptr(), code.data_ptr(), xpad.data_ptr(), gw.data_ptr(), gb.data_ptr(),
                                      N, H, W, C, int(ctx.bf16), threads)
        gw = gw.sum(0).t().reshape(C, 1, 3, 3)
        return None, gw, gb.sum(0) if ctx.has_bias else None, None, None


# Winograd's F(2x2, 3x3): the filter transform G (4x3); winograd.c applies the input and output ones.
_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


def _winograd(x: Tensor, weight: Tensor, bias: Tensor | None, pool: bool, relu: bool = False):
    """conv2d(x, weight, bias, padding=1) in fp32 by winograd.c, x channels-last; with pool, the 2x2
    max-pool (then ReLU) of it and the winner codes, else the convolution, channels-last."""
    if x.dtype != torch.float32 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"conv3x3_winograd: takes a channels-last fp32 tensor, got {x.dtype} with strides {x.stride()}")
    N, C, H, W = x.shape
    O = weight.shape[0]
    U = torch.einsum("ak,oikl,bl->abio", _G, weight.float(), _G).reshape(16, C, O).contiguous()
    shape = (N, O, H // 2, W // 2) if pool else (N, O, H, W)
    y = torch.empty(shape, memory_format=torch.channels_last)
    code = torch.empty(shape, dtype=torch.uint8, memory_format=torch.channels_last) if pool else None
    b = bias.detach().float().contiguous() if bias is not None else None
    rc = library().conv3x3_winograd(x.data_ptr(), U.data_ptr(), b.data_ptr() if b is not None else None, y.data_ptr(),
                                    code.data_ptr() if pool else None, N, H, W, C, O, int(pool), int(relu),
                                    torch.get_num_threads())
    if rc == -2:
        raise ValueError(f"conv3x3_winograd: takes even H, W and whole vectors of channels, "
                         f"got {tuple(x.shape)} -> {O}")
    if rc:
        raise MemoryError("conv3x3_winograd: out of memory for its scratch")
    return (y, code) if pool else y


def _winograd_takes(c_in: int, c_out: int) -> bool:
    """Channel counts winograd.c takes: inputs in whole vectors, outputs in pairs of them (AVX-512's)."""
    return c_in % 16 == 0 and c_out % 32 == 0


class _ConvPool2x2(torch.autograd.Function):
    """max_pool2d(conv(x), 2) (then ReLU) for C_in > 1: the convolution and its input gradient by
    ATen (oneDNN), or in fp32 by winograd.c (fused with the pooling in forward); pool2x2 pools; the
    weight and bias gradients come from kernels.c's conv3x3_pool2x2_wgrad, which reads only the
    windows' winners.

    Why: oneDNN's weight gradient of seed-cnn's conv2 (batch 64, 32x14x14 -> 64 channels) was the
    largest single cost of a training step, 2x its forward. From the pooled gradient it is a quarter
    of the multiply-adds. Interleaved on the AMX Xeon (21 rounds, 14% of windows without gradient),
    kernel / oneDNN's weight+bias gradient: bf16 1.09 / 1.49 ms (0.74x), fp32 1.18 / 2.90 ms (0.43x);
    oneDNN's input gradient alone took a third of its input+weight gradient. Winograd in fp32: the
    seed-cnn channels-last step took 0.79x [0.66-0.89] the time with it as with oneDNN where every
    library was held to AVX2, 0.88x [0.80-0.94] with AVX-512 (interleaved, 14 rounds, AMX Xeon);
    oneDNN's AVX2 convolution ran at about the FMA peak, so only fewer multiplies could be faster.
    Under bf16 oneDNN's AMX convolution stays."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, bf16: bool, relu: bool) -> Tensor:
        dtype = torch.bfloat16 if bf16 else torch.float32
        # What autocast would feed a bf16 convolution: x, W and b rounded to bf16.
        x = x.detach().to(dtype).contiguous(memory_format=torch.channels_last)
        w = weight.detach().to(dtype)
        b = bias.detach().to(dtype) if bias is not None else None
        if not bf16 and _winograd_takes(w.shape[1], w.shape[0]):
            y, code = _winograd(x, w, b, pool=True, relu=relu)
        else:
            y = torch.ops.aten.convolution(x, w, b, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
            y, code = _pool_forward(y.contiguous(memory_format=torch.channels_last), relu)
        ctx.save_for_backward(x, w, code)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):
        x, w, code = ctx.saved_tensors
        N, C_in, H, W = x.shape
        C = w.shape[0]
        gy = gy.to(x.dtype).contiguous(memory_format=torch.channels_last)
        threads = torch.get_num_threads()
        gx = None
        if ctx.needs_input_grad[0]:  # the convolution's full-size gradient, then its input gradient
            gconv = _pool_backward(gy, code, torch.Size((N, C, H, W)))
            if x.dtype == torch.float32 and _winograd_takes(C, C_in):  # the convolution of gconv with W flipped
                gx = _winograd(gconv, w.flip(2, 3).transpose(0, 1), None, pool=False)
            else:
                gx = torch.ops.aten.convolution_backward(gconv, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                                         1, [True, False, False])[0]
        gw, gb = torch.empty(C, 3, 3, C_in), torch.empty(C)
        if library().conv3x3_pool2x2_wgrad(x.data_ptr(), gy.data_ptr(), code.data_ptr(), gw.data_ptr(),
                                           gb.data_ptr(), N, H, W, C_in, C, int(x.dtype == torch.bfloat16), threads):
            raise MemoryError("conv3x3_pool2x2_wgrad: out of memory for its scratch")
        # (C, 3, 3, C_in) in memory is a channels-last (C, C_in, 3, 3) tensor.
        return gx, gw.permute(0, 3, 1, 2), gb if ctx.has_bias else None, None, None


def conv_pool(x: Tensor, conv: torch.nn.Conv2d, relu: bool = True) -> Tensor:
    """max_pool2d(conv(x), 2), then ReLU if relu, for inputs `supports_conv_pool` accepts; the
    output is channels-last, bf16 under bf16 autocast (as the convolution's output would be)."""
    fn = _Conv3x3Pool2x2 if x.shape[1] == 1 else _ConvPool2x2
    return fn.apply(x, conv.weight, conv.bias, _autocast_mode() == "bf16", relu)

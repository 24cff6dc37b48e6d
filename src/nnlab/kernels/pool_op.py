"""nnlab::pool2x2: F.max_pool2d(x, 2), then ReLU if asked, on channels-last tensors (pool.c).

The same values and gradients as ATen's, bit for bit, ties and NaNs included, without ATen's int64
indices and zero-filled gradient. Its speed figure (in _pool2x2) is B1's, with conv_pool_op.py's ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nnlab.kernels.build import built, library, record

DTYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}
CL = torch.channels_last


def pool_applies(x: Tensor) -> bool:
    """A non-empty channels-last (B, C, H, W) bf16/fp32 CPU tensor with even H and W, the library built."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in DTYPES and x.numel() > 0
            and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0 and x.is_contiguous(memory_format=CL) and built())


def pooled_like(x: Tensor, C: int, dtype: torch.dtype | None = None) -> Tensor:
    """An empty channels-last (B, C, H/2, W/2) tensor for the pooled output of x (or its winner codes)."""
    B, _, H, W = x.shape
    return torch.empty((B, C, H // 2, W // 2), dtype=dtype or x.dtype, device=x.device, memory_format=CL)


@torch.library.custom_op("nnlab::pool2x2", mutates_args=(), device_types="cpu")
def _pool2x2(x: Tensor, relu: bool) -> tuple[Tensor, Tensor]:
    """(pooled x, winner codes: 0-3 the window position that won, 4 none), both channels-last.
    Speed: B1's bf16 step 1.55x (9,391/6,076 samples/s vs NNLAB_NO_KERNELS=1, AMX Xeon, 10 runs); fp32 on AVX2 1.83x.
    """
    record("pool2x2")
    x = x.contiguous(memory_format=CL)
    B, C, H, W = x.shape
    y, winners = pooled_like(x, C), pooled_like(x, C, torch.uint8)
    getattr(library(), f"pool2x2_fwd_{DTYPES[x.dtype]}")(x.data_ptr(), y.data_ptr(), winners.data_ptr(), B, H, W, C,
                                                         int(relu), torch.get_num_threads())
    return y, winners


@_pool2x2.register_fake
def _(x: Tensor, relu: bool) -> tuple[Tensor, Tensor]:
    return pooled_like(x, x.shape[1]), pooled_like(x, x.shape[1], torch.uint8)


@torch.library.custom_op("nnlab::pool2x2_backward", mutates_args=(), device_types="cpu")
def pool2x2_backward(gy: Tensor, winners: Tensor) -> Tensor:
    """The gradient of the pool's input, channels-last (B, C, 2 Ho, 2 Wo), from its output's gradient gy."""
    gy = gy.contiguous(memory_format=CL)
    B, C, Ho, Wo = gy.shape
    gx = torch.empty((B, C, 2 * Ho, 2 * Wo), dtype=gy.dtype, memory_format=CL)
    getattr(library(), f"pool2x2_bwd_{DTYPES[gy.dtype]}")(gy.data_ptr(), winners.data_ptr(), gx.data_ptr(), B, 2 * Ho,
                                                          2 * Wo, C, torch.get_num_threads())
    return gx


@pool2x2_backward.register_fake
def _(gy: Tensor, winners: Tensor) -> Tensor:
    B, C, Ho, Wo = gy.shape
    return torch.empty((B, C, 2 * Ho, 2 * Wo), dtype=gy.dtype, device=gy.device, memory_format=CL)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _backward(ctx, gy: Tensor, _gcode):
    (winners,) = ctx.saved_tensors
    return pool2x2_backward(gy, winners), None


_pool2x2.register_autograd(_backward, setup_context=_setup_context)


def pool(x: Tensor, relu: bool = False) -> Tensor:
    """max_pool2d(x, 2), then ReLU if relu, for x that `pool_applies` accepts; channels-last output."""
    return _pool2x2(x, relu)[0]

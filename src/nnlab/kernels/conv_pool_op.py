"""max_pool2d(conv(x), 2) (then ReLU) for a 3x3, pad-1 convolution, as two custom ops (conv_pool.c,
winograd.c); `conv_pool(x, conv, relu)` picks the one that fits, `conv_pool_applies(x, conv)` says
whether one does.

- nnlab::conv1_pool2x2, one input channel (seed-cnn's first block): one pass that never writes the
  full-size conv output. It computes no input gradient, so it declines inputs that need one.
- nnlab::conv3x3_pool2x2, input channels a multiple of 16 (the second block): the convolution by
  Winograd in fp32 (fused with the pooling), by ATen (oneDNN) under bf16 autocast, then pool.c; the
  weight gradient is summed from the pooled gradient at the windows' winners only.
Outputs are channels-last, bf16 under bf16 autocast (as the convolution's would be), and equal to
the unfused path up to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nnlab.kernels.build import conv_native, library, record
from nnlab.kernels.pool_op import CL, pool2x2_backward, pooled_like

# Winograd's F(2x2, 3x3): the filter transform G (4x3); winograd.c applies the input and output ones.
G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


def _bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def conv_pool_applies(x: Tensor, conv: torch.nn.Conv2d) -> bool:
    """A 3x3, pad-1, stride-1 convolution `conv` (fp32 CPU weights, C_out a multiple of 16) of a
    non-empty (B, C_in, H, W) CPU tensor x with even H and W, outside autocast or under CPU bf16
    autocast, on a CPU where the conv kernels run (AVX2 or AVX-512). Then either one input channel,
    x fp32 and needing no gradient; or C_in a multiple of 16, x channels-last, fp32 (or bf16 under
    autocast)."""
    w = conv.weight
    if not (x.device.type == "cpu" and x.dim() == 4 and x.numel() > 0 and x.shape[2] % 2 == 0
            and x.shape[3] % 2 == 0 and w.device.type == "cpu" and w.dtype == torch.float32
            and tuple(w.shape[2:]) == (3, 3) and w.shape[0] % 16 == 0 and x.shape[1] == w.shape[1]
            and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and (not torch.is_autocast_enabled("cpu") or _bf16_autocast())
            and conv_native()):
        return False
    if x.shape[1] == 1:
        return x.dtype == torch.float32 and not x.requires_grad
    return (x.shape[1] % 16 == 0 and x.is_contiguous(memory_format=CL)
            and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _bf16_autocast())))


def conv_pool(x: Tensor, conv: torch.nn.Conv2d, relu: bool = True) -> Tensor:
    """max_pool2d(conv(x), 2), then ReLU if relu, for inputs `conv_pool_applies` accepts."""
    op = _conv1_pool2x2 if x.shape[1] == 1 else _conv3x3_pool2x2
    return op(x, conv.weight, conv.bias, _bf16_autocast(), relu)[0]


# ---- nnlab::conv1_pool2x2: one input channel ------------------------------------------------------

@torch.library.custom_op("nnlab::conv1_pool2x2", mutates_args=(), device_types="cpu")
def _conv1_pool2x2(x: Tensor, weight: Tensor, bias: Tensor | None, bf16: bool, relu: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(pooled output, x zero-padded (B, H+2, W+2) for the backward, winner codes). In bf16 mode the
    kernel rounds x, W, b and each conv output to bf16, as autocast's convolution would.
    Speed: B1's bf16 step 1.55x (9,391/6,076 samples/s vs NNLAB_NO_KERNELS=1, AMX Xeon, 10 runs); fp32 on AVX2 1.83x.
    """
    record("conv1_pool2x2")
    B, _, H, W = x.shape
    C = weight.shape[0]
    x, w = x.contiguous(), weight.contiguous()  # (B, 1, H, W) and (C, 1, 3, 3): either layout is this one
    b = bias.contiguous() if bias is not None else None
    xpad = torch.empty((B, H + 2, W + 2))
    y = pooled_like(x, C, torch.bfloat16 if bf16 else torch.float32)
    winners = pooled_like(x, C, torch.uint8)
    if library().conv3x3_pool2x2_fwd(x.data_ptr(), w.data_ptr(), b.data_ptr() if b is not None else None,
                                     xpad.data_ptr(), y.data_ptr(), winners.data_ptr(), B, H, W, C, int(bf16),
                                     int(relu), torch.get_num_threads()):
        raise MemoryError("conv1_pool2x2: out of memory for its scratch")
    return y, xpad, winners


@_conv1_pool2x2.register_fake
def _(x, weight, bias, bf16, relu):
    B, _, H, W = x.shape
    C = weight.shape[0]
    y = pooled_like(x, C, torch.bfloat16 if bf16 else torch.float32)
    return y, x.new_empty((B, H + 2, W + 2), dtype=torch.float32), pooled_like(x, C, torch.uint8)


@torch.library.custom_op("nnlab::conv1_pool2x2_backward", mutates_args=(), device_types="cpu")
def _conv1_pool2x2_backward(gy: Tensor, xpad: Tensor, winners: Tensor, bf16: bool) -> tuple[Tensor, Tensor]:
    """(weight gradient (C, 1, 3, 3), bias gradient (C,)), from the pooled output's gradient."""
    B, C, Ho, Wo = gy.shape
    gy = gy.to(torch.bfloat16 if bf16 else torch.float32).contiguous(memory_format=CL)
    threads = torch.get_num_threads()
    gw, gb = torch.zeros(threads, 9, C), torch.zeros(threads, C)  # one partial sum per thread
    library().conv3x3_pool2x2_bwd(gy.data_ptr(), winners.data_ptr(), xpad.data_ptr(), gw.data_ptr(), gb.data_ptr(),
                                  B, 2 * Ho, 2 * Wo, C, int(bf16), threads)
    return gw.sum(0).t().contiguous().view(C, 1, 3, 3), gb.sum(0)


@_conv1_pool2x2_backward.register_fake
def _(gy, xpad, winners, bf16):
    C = gy.shape[1]
    return gy.new_empty((C, 1, 3, 3), dtype=torch.float32), gy.new_empty((C,), dtype=torch.float32)


def _conv1_setup(ctx, inputs, output):
    _, _, bias, bf16, _ = inputs
    _, xpad, winners = output
    ctx.mark_non_differentiable(xpad, winners)
    ctx.save_for_backward(xpad, winners)
    ctx.bf16, ctx.has_bias = bf16, bias is not None


def _conv1_backward(ctx, gy, _gxpad, _gcode):
    if ctx.needs_input_grad[0]:
        raise RuntimeError("nnlab::conv1_pool2x2 computes no input gradient (conv_pool_applies declines such x)")
    xpad, winners = ctx.saved_tensors
    gw, gb = _conv1_pool2x2_backward(gy, xpad, winners, ctx.bf16)
    return None, gw, gb if ctx.has_bias else None, None, None


_conv1_pool2x2.register_autograd(_conv1_backward, setup_context=_conv1_setup)


# ---- nnlab::conv3x3_pool2x2: many input channels -----------------------------------------------------

def winograd_takes(c_in: int, c_out: int) -> bool:
    """Channel counts winograd.c takes: inputs in whole vectors, outputs in pairs of them (AVX-512's)."""
    return c_in % 16 == 0 and c_out % 32 == 0


def _winograd(x: Tensor, weight: Tensor, bias: Tensor | None, pool: bool, relu: bool = False):
    """conv2d(x, weight, bias, padding=1) in fp32 by winograd.c, x channels-last; with pool its 2x2
    max-pool (then ReLU) and the winner codes, else the full convolution, channels-last."""
    record("conv3x3_winograd")
    B, C, H, W = x.shape
    O = weight.shape[0]
    U = torch.einsum("ak,oikl,bl->abio", G, weight.float(), G).reshape(16, C, O).contiguous()
    y = pooled_like(x, O, torch.float32) if pool else torch.empty((B, O, H, W), memory_format=CL)
    winners = pooled_like(x, O, torch.uint8) if pool else None
    b = bias.float().contiguous() if bias is not None else None
    rc = library().conv3x3_winograd(x.data_ptr(), U.data_ptr(), b.data_ptr() if b is not None else None, y.data_ptr(),
                                    winners.data_ptr() if pool else None, B, H, W, C, O, int(pool), int(relu),
                                    torch.get_num_threads())
    if rc == -2:
        raise ValueError(f"conv3x3_winograd: takes even H, W and whole vectors of channels, "
                         f"got {tuple(x.shape)} -> {O}")
    if rc:
        raise MemoryError("conv3x3_winograd: out of memory for its scratch")
    return (y, winners) if pool else y


@torch.library.custom_op("nnlab::conv3x3_winograd", mutates_args=(), device_types="cpu")
def conv3x3_winograd(x: Tensor, weight: Tensor) -> Tensor:
    """conv2d(x, weight, padding=1), fp32, channels-last, by Winograd's F(2x2, 3x3): 16 multiplies per
    2x2 outputs instead of 36.
    Speed: seed-cnn's fp32 channels-last step in 0.79x oneDNN's time, all held to AVX2 (AMX Xeon, 14 rounds).
    """
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError(f"conv3x3_winograd: takes fp32 tensors, got {x.dtype} and {weight.dtype}")
    return _winograd(x.contiguous(memory_format=CL), weight, None, pool=False)


@conv3x3_winograd.register_fake
def _(x, weight):
    B, _, H, W = x.shape
    return torch.empty((B, weight.shape[0], H, W), device=x.device, memory_format=CL)


def _conv3x3_inputs(x: Tensor, weight: Tensor, bf16: bool) -> tuple[Tensor, Tensor]:
    """x channels-last and W in the dtype the convolution runs in: bf16 ones as autocast would feed it."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    return x.to(dtype).contiguous(memory_format=CL), weight.to(dtype)


@torch.library.custom_op("nnlab::conv3x3_pool2x2", mutates_args=(), device_types="cpu")
def _conv3x3_pool2x2(x: Tensor, weight: Tensor, bias: Tensor | None, bf16: bool, relu: bool
                     ) -> tuple[Tensor, Tensor]:
    """(pooled output, winner codes), channels-last.
    Speed: B1's bf16 step 1.55x (9,391/6,076 samples/s vs NNLAB_NO_KERNELS=1, AMX Xeon, 10 runs); fp32 on AVX2 1.83x.
    """
    record("conv3x3_pool2x2")
    x, w = _conv3x3_inputs(x, weight, bf16)
    b = bias.to(w.dtype) if bias is not None else None
    if not bf16 and winograd_takes(w.shape[1], w.shape[0]):
        return _winograd(x, w, b, pool=True, relu=relu)
    y = torch.ops.aten.convolution(x, w, b, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    return torch.ops.nnlab.pool2x2.default(y, relu)


@_conv3x3_pool2x2.register_fake
def _(x, weight, bias, bf16, relu):
    C = weight.shape[0]
    return pooled_like(x, C, torch.bfloat16 if bf16 else torch.float32), pooled_like(x, C, torch.uint8)


@torch.library.custom_op("nnlab::conv3x3_pool2x2_wgrad", mutates_args=(), device_types="cpu")
def _conv3x3_pool2x2_wgrad(x: Tensor, gy: Tensor, winners: Tensor, bf16: bool) -> tuple[Tensor, Tensor]:
    """(weight gradient (C, C_in, 3, 3) channels-last, bias gradient (C,)) from the pooled gradient gy,
    read at the windows' winners only: a quarter of the dense gradient's multiply-adds."""
    x = x.to(torch.bfloat16 if bf16 else torch.float32).contiguous(memory_format=CL)
    B, C_in, H, W = x.shape
    C = gy.shape[1]
    gy = gy.to(x.dtype).contiguous(memory_format=CL)
    gw, gb = torch.empty(C, 3, 3, C_in), torch.empty(C)
    if library().conv3x3_pool2x2_wgrad(x.data_ptr(), gy.data_ptr(), winners.data_ptr(), gw.data_ptr(), gb.data_ptr(),
                                       B, H, W, C_in, C, int(bf16), torch.get_num_threads()):
        raise MemoryError("conv3x3_pool2x2_wgrad: out of memory for its scratch")
    return gw.permute(0, 3, 1, 2), gb  # (C, 3, 3, C_in) in memory is a channels-last (C, C_in, 3, 3)


@_conv3x3_pool2x2_wgrad.register_fake
def _(x, gy, winners, bf16):
    C, C_in = gy.shape[1], x.shape[1]
    return torch.empty((C, C_in, 3, 3), device=x.device, memory_format=CL), x.new_empty((C,), dtype=torch.float32)


def _conv3x3_setup(ctx, inputs, output):
    x, weight, bias, bf16, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, output[1])
    ctx.bf16, ctx.has_bias = bf16, bias is not None


def _conv3x3_backward(ctx, gy, _gcode):
    x, weight, winners = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[0]:  # the convolution's full-size gradient, then its input gradient
        xs, w = _conv3x3_inputs(x, weight, ctx.bf16)
        gconv = pool2x2_backward(gy.to(xs.dtype), winners)
        if not ctx.bf16 and winograd_takes(w.shape[0], w.shape[1]):  # conv of gconv with W flipped
            gx = conv3x3_winograd(gconv, w.flip(2, 3).transpose(0, 1))
        else:
            gx = torch.ops.aten.convolution_backward(gconv, xs, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                     [True, False, False])[0]
        gx = gx.to(x.dtype)
    gw, gb = _conv3x3_pool2x2_wgrad(x, gy, winners, ctx.bf16)
    return gx, gw, gb if ctx.has_bias else None, None, None


_conv3x3_pool2x2.register_autograd(_conv3x3_backward, setup_context=_conv3x3_setup)

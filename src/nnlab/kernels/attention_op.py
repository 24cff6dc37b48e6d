"""nnlab::attention: self-attention on the CPU in one call per direction (attention.c).

`attention(qkv, n_head, causal)` takes the fused Q/K/V projection's output (B, T, 3C) and returns
softmax(QK^T/sqrt(d_k) (+ causal mask)) V with the heads side by side, (B, T, C): what
SelfAttention's split, view, transpose, SDPA, transpose and reshape compute, with no copies between
them. fp32 or bf16 (then computed in fp32, rounded once on output).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nnlab.kernels.build import built, library, record

# Past this length SDPA's flash kernel is faster: this kernel's scratch grows as T^2, past L2.
MAX_T = 256
DTYPES = (torch.float32, torch.bfloat16)


def attention_applies(qkv: Tensor, n_head: int, dropout: float = 0.0) -> bool:
    """A (B, T, 3C) fp32/bf16 CPU tensor with C divisible by n_head, 1 <= T <= MAX_T, no dropout."""
    return (qkv.device.type == "cpu" and qkv.dtype in DTYPES and qkv.dim() == 3 and qkv.shape[2] % (3 * n_head) == 0
            and 0 < qkv.shape[1] <= MAX_T and qkv.shape[0] > 0 and qkv.shape[2] > 0 and dropout == 0.0 and built())


def _dims(qkv: Tensor, n_head: int) -> tuple[int, int, int, int]:
    B, T, C3 = qkv.shape
    return B, T, n_head, C3 // 3 // n_head


@torch.library.custom_op("nnlab::attention", mutates_args=(), device_types="cpu")
def _attention(qkv: Tensor, n_head: int, causal: bool) -> tuple[Tensor, Tensor]:
    """(y (B, T, C), each query row's log-sum-exp (B, n_head, T), which the backward reads).
    Speed: B3's compiled bf16 step, attention ~13 of ~33 ms through ATen, ~4.5 ms in the kernel (AMX Xeon).
    """
    record("attention")
    B, T, H, D = _dims(qkv, n_head)
    qkv = qkv.contiguous()
    y = torch.empty((B, T, H * D), dtype=qkv.dtype)
    lse = torch.empty((B, H, T), dtype=torch.float32)
    if library().attention_fwd(qkv.data_ptr(), y.data_ptr(), lse.data_ptr(), B, T, H, D, 1 / math.sqrt(D),
                               int(causal), int(qkv.dtype == torch.bfloat16), torch.get_num_threads()):
        raise MemoryError("attention_fwd: out of memory for its scratch")
    return y, lse


@_attention.register_fake
def _(qkv: Tensor, n_head: int, causal: bool) -> tuple[Tensor, Tensor]:
    B, T, H, D = _dims(qkv, n_head)
    return qkv.new_empty((B, T, H * D)), qkv.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("nnlab::attention_backward", mutates_args=(), device_types="cpu")
def _attention_backward(qkv: Tensor, y: Tensor, lse: Tensor, dy: Tensor, n_head: int, causal: bool) -> Tensor:
    B, T, H, D = _dims(qkv, n_head)
    qkv, y, dy = qkv.contiguous(), y.contiguous(), dy.to(qkv.dtype).contiguous()
    dqkv = torch.empty_like(qkv)
    if library().attention_bwd(qkv.data_ptr(), y.data_ptr(), dy.data_ptr(), lse.data_ptr(), dqkv.data_ptr(),
                               B, T, H, D, 1 / math.sqrt(D), int(causal), int(qkv.dtype == torch.bfloat16),
                               torch.get_num_threads()):
        raise MemoryError("attention_bwd: out of memory for its scratch")
    return dqkv


@_attention_backward.register_fake
def _(qkv: Tensor, y: Tensor, lse: Tensor, dy: Tensor, n_head: int, causal: bool) -> Tensor:
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    qkv, n_head, causal = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(qkv, *output)
    ctx.n_head, ctx.causal = n_head, causal


def _backward(ctx, dy: Tensor, _dlse: Tensor | None):
    qkv, y, lse = ctx.saved_tensors
    return _attention_backward(qkv, y, lse, dy, ctx.n_head, ctx.causal), None, None


_attention.register_autograd(_backward, setup_context=_setup_context)


def attention(qkv: Tensor, n_head: int, causal: bool) -> Tensor:
    """softmax(QK^T/sqrt(d_k)) V per head, heads side by side: (B, T, 3C) -> (B, T, C), for inputs
    `attention_applies` accepts. Q, K, V of head h are qkv's columns h*d_k, C + h*d_k and 2C + h*d_k."""
    return _attention(qkv, n_head, causal)[0]

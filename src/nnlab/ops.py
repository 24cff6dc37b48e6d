"""The article's formulas as explicit functions of plain tensors.

These are the *reference* implementations: each one is written the way the article writes the
math, step by step, with no fused kernel. The models' explicit paths are built from them, and the
tests compare every fast path (nn.Linear, F.conv2d, scaled_dot_product_attention, torch.optim.SGD,
nn.MSELoss) against them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor


def dense(X: Tensor, W: Tensor, b: Tensor | None = None, f: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """A dense (fully connected) layer: y = f(XW + b).

    X: (..., in), W: (in, out), b: (out,). `f` is the activation; None means the identity.
    Note W is (in, out) as in the article; nn.Linear stores the transpose, (out, in).
    """
    y = X @ W
    if b is not None:
        y = y + b
    return f(y) if f is not None else y


def article_mse(y: Tensor, y_star: Tensor) -> Tensor:
    """The article's squared-error loss: L = 1/(2N) * sum_i (y_i - y*_i)^2.

    N counts every element. This is exactly half of torch.nn.MSELoss() (mean reduction); the 1/2
    makes the gradient dL/dy = (y - y*)/N free of a factor 2, so it changes only the effective
    learning rate, not the minimiser.
    """
    diff = y - y_star
    return (diff * diff).sum() / (2 * diff.numel())


@torch.no_grad()
def gd_step(params: Iterable[Tensor], grads: Iterable[Tensor], lr: float) -> None:
    """One step of gradient descent, in place: theta <- theta - alpha * grad_theta L."""
    for p, g in zip(params, grads, strict=True):
        p.sub_(lr * g)


def conv2d(X: Tensor, W: Tensor, b: Tensor | None = None, stride: int = 1, padding: int = 0) -> Tensor:
    """Convolution C = X * W + b, computed as unfold + one matrix multiply.

    X: (B, C_in, H, W_), W: (C_out, C_in, k, k), b: (C_out,). Like every deep-learning library
    (and the article), "convolution" here is cross-correlation: the kernel is not flipped.
    Each output pixel is the dot product of one k*k*C_in patch of X with each filter, so unfolding
    all patches into columns turns the whole convolution into a single matmul.
    """
    B, _, H, W_in = X.shape
    C_out, _, k, _ = W.shape
    cols = torch.nn.functional.unfold(X, k, padding=padding, stride=stride)  # (B, C_in*k*k, L)
    out = W.reshape(C_out, -1) @ cols  # (B, C_out, L)
    if b is not None:
        out = out + b[:, None]
    H_out = (H + 2 * padding - k) // stride + 1
    W_out = (W_in + 2 * padding - k) // stride + 1
    return out.reshape(B, C_out, H_out, W_out)


def max_pool2d(C: Tensor, k: int) -> Tensor:
    """Max pooling over non-overlapping k x k windows: each output is the max of its window.

    C: (B, ch, H, W) with H and W divisible by k (any remainder is dropped, as in F.max_pool2d).
    """
    B, ch, H, W = C.shape
    H2, W2 = H // k, W // k
    C = C[:, :, : H2 * k, : W2 * k]
    return C.reshape(B, ch, H2, k, W2, k).amax(dim=(3, 5))  # (B, ch, H/k, W/k)


def softmax(Z: Tensor, dim: int = -1) -> Tensor:
    """softmax(z)_i = exp(z_i) / sum_j exp(z_j), shifted by the max for numerical stability."""
    Z = Z - Z.amax(dim=dim, keepdim=True)
    E = Z.exp()
    return E / E.sum(dim=dim, keepdim=True)


def attention(Q: Tensor, K: Tensor, V: Tensor, causal: bool = False) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention on already-projected Q, K, V: A = softmax(QK^T/sqrt(d_k)), O = AV.

    Q, K, V: (..., T, d_k). With causal=True, position t may attend only to positions <= t
    (its scores for later positions are set to -inf before the softmax). Returns (O, A).
    """
    d_k = Q.shape[-1]
    S = Q @ K.transpose(-2, -1) / math.sqrt(d_k)  # (..., T_q, T_k)
    if causal:
        T_q, T_k = S.shape[-2], S.shape[-1]
        # Queries are the last T_q positions of the T_k keys (T_q < T_k when decoding with a cache).
        mask = torch.ones(T_q, T_k, dtype=torch.bool, device=S.device).tril(diagonal=T_k - T_q)
        S = S.masked_fill(~mask, float("-inf"))
    A = softmax(S, dim=-1)
    return A @ V, A


def self_attention(
    X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, causal: bool = False, return_attention: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Self-attention exactly as the article writes it (one head).

    Q = X W_Q,  K = X W_K,  V = X W_V,  A = softmax(Q K^T / sqrt(d_k)),  O = A V.

    X: (..., T, d_model); W_Q, W_K: (d_model, d_k); W_V: (d_model, d_v). Returns O (..., T, d_v),
    and A (..., T, T) too when return_attention is True.
    """
    Q, K, V = X @ W_Q, X @ W_K, X @ W_V
    O, A = attention(Q, K, V, causal=causal)
    return (O, A) if return_attention else O

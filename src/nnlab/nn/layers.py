"""The shared layers every model is built from, each with two readable paths and, for some, a fast op.

`explicit=True` computes the layer with the article's formula from `nnlab.ops` (readable, slow);
`explicit=False` uses torch's functional path (nn.functional), or nnlab's CPU kernel
(`nnlab.kernels`) where that op's `*_applies` says it fits. All paths hold the same parameters in
the same layout, so a model can switch after loading weights (`nnlab.models.set_explicit`), and the
tests compare them on the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnlab import kernels, ops


class Dense(nn.Linear):
    """y = XW + b. Stores W as nn.Linear does, (out, in); the explicit path uses W^T = (in, out)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, explicit: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.explicit = explicit

    def forward(self, x: Tensor) -> Tensor:
        if self.explicit:
            return ops.dense(x, self.weight.t(), self.bias)
        return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """C = X * W + b (square kernel). The explicit path is unfold + matmul (ops.conv2d)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0,
                 bias: bool = True, explicit: bool = False):
        super().__init__(c_in, c_out, k, stride=stride, padding=padding, bias=bias)
        self.explicit = explicit

    def forward(self, x: Tensor) -> Tensor:
        if self.explicit:
            return ops.conv2d(x, self.weight, self.bias, stride=self.stride[0], padding=self.padding[0])
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


class ConvPoolReLU(Conv2d):
    """relu(maxpool2(X * W + b)): a convolution, ReLU, then 2x2 max-pooling, as the article's CNN
    blocks compute them. The explicit path runs them in that order (nnlab.ops). The functional path
    pools before its ReLU: the same function, since max(relu(a), relu(b)) = relu(max(a, b)) and the
    gradients agree too, with ReLU on 4x fewer values. The fast path is nnlab.kernels.conv_pool."""

    def forward(self, x: Tensor) -> Tensor:
        if self.explicit:
            c = ops.conv2d(x, self.weight, self.bias, stride=self.stride[0], padding=self.padding[0])
            return ops.max_pool2d(torch.relu(c), 2)
        if kernels.conv_pool_applies(x, self):
            return kernels.conv_pool(x, self, relu=True)
        c = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        if kernels.pool_applies(c):  # the pool kernel alone, where the conv kernels do not apply
            return kernels.pool(c, relu=True)
        return torch.relu(F.max_pool2d(c, 2))


class MaxPool2d(nn.Module):
    """Non-overlapping k x k max pooling. The fast path, for 2x2 windows where kernels.pool_applies
    (channels-last CPU tensors), is nnlab.kernels.pool: the same values and gradients as F.max_pool2d."""

    def __init__(self, k: int = 2, explicit: bool = False):
        super().__init__()
        self.k, self.explicit = k, explicit

    def forward(self, x: Tensor) -> Tensor:
        if self.explicit:
            return ops.max_pool2d(x, self.k)
        if self.k == 2 and kernels.pool_applies(x):
            return kernels.pool(x)
        return F.max_pool2d(x, self.k)


class SelfAttention(nn.Module):
    """Multi-head self-attention: per head Q = XW_Q, K = XW_K, V = XW_V, A = softmax(QK^T/sqrt(d_k)), O = AV.

    The heads' W_Q, W_K, W_V are stacked into one (3*C, C) projection `qkv` (the layout of
    nn.MultiheadAttention's in_proj_weight), and the heads' outputs are concatenated and mixed by
    `proj`. The explicit path runs ops.attention step by step. The fast path, where
    kernels.attention_applies (CPU, short sequences, no dropout), runs nnlab.kernels.attention on the
    fused projection's output; elsewhere, and with a KV cache, F.scaled_dot_product_attention.

    forward(x, past_kv=None, need_weights=False, use_cache=False) -> (y, A or None, (K, V) or None)
      past_kv: cached (K, V) of earlier positions, each (B, n_head, T_past, d_k), for generation.
      need_weights: also return A (B, n_head, T, T_past + T); forces the explicit path.
      use_cache: return (K, V) of all positions (also returned whenever past_kv is given). Not by
        default: they are views of the projection's output, and FSDP2 warns about every view a
        sharded block returns (an in-place op on one would skip its pre-backward hook).
    """

    def __init__(self, n_embd: int, n_head: int, causal: bool, bias: bool = True,
                 dropout: float = 0.0, explicit: bool = False):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        self.n_head, self.causal, self.dropout, self.explicit = n_head, causal, dropout, explicit
        self.qkv = Dense(n_embd, 3 * n_embd, bias=bias, explicit=explicit)
        self.proj = Dense(n_embd, n_embd, bias=bias, explicit=explicit)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, past_kv: tuple[Tensor, Tensor] | None = None, need_weights: bool = False,
                use_cache: bool = False):
        B, T, C = x.shape
        qkv = self.qkv(x)  # (B, T, 3C)
        # Q, K, V, each (B, T, C) -> (B, n_head, T, d_k): every head attends independently (views).
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
        dropout = self.dropout if self.training else 0.0
        if not (self.explicit or need_weights or past_kv is not None) and kernels.attention_applies(
                qkv, self.n_head, dropout):
            y = kernels.attention(qkv, self.n_head, self.causal)  # all heads in one call, from qkv: (B, T, C)
            return self.resid_drop(self.proj(y)), None, (k, v) if use_cache else None
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        A = None
        if self.explicit or need_weights:
            o, A = ops.attention(q, k, v, causal=self.causal)
            if dropout > 0:
                # Dropout on A, then O = AV again: the same regularisation SDPA applies.
                o = F.dropout(A, dropout) @ v
        else:
            # With a cache and a single new query the mask is all-ones; is_causal would wrongly
            # align the mask to the top-left, so only pass it when queries and keys coincide.
            is_causal = self.causal and bool(q.shape[2] == k.shape[2])  # bool: a plain flag under torch.export too
            o = self._sdpa(q, k, v, is_causal, dropout)
        y = o.transpose(1, 2).reshape(B, T, C)  # re-assemble heads side by side: (B, T, C)
        return self.resid_drop(self.proj(y)), A, (k, v) if use_cache or past_kv is not None else None

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool, dropout: float) -> Tensor:
        mask = None
        if self.causal and not is_causal and q.shape[2] > 1:
            # Several new queries after a cache: query i sits at key position T_past + i.
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
            mask = mask.tril(diagonal=k.shape[2] - q.shape[2])
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            return _math_attention(q, k, v, mask, is_causal, dropout)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout)


def _math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, dropout: float) -> Tensor:
    """SDPA's math kernel (matmul + softmax), called by name, for bf16 on CPU.

    Why not let SDPA choose: on CPU its flash kernel's bf16 backward is several times slower than
    matmul + softmax (in fp32 flash is the faster one). Why not the `sdpa_kernel(SDPBackend.MATH)`
    context: inside torch.compile's graph AOTAutograd's cache cannot key it, so every compile
    retraces. The op is private to torch: tests/test_attention.py checks that it stays
    bit-identical to SDPA, so a torch upgrade that changes it fails there.
    """
    if mask is not None:  # the kernel adds a float mask; a bool one is converted first, as SDPA does
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                             is_causal=is_causal)[0]

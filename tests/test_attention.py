"""Attention equivalence tests: the article's formula, nnlab's two paths, and torch's MultiheadAttention.

Tolerances: float64 comparisons use atol=rtol=1e-10 (the same math in a different order); float32
comparisons between different kernels (explicit matmul+softmax vs SDPA vs MHA) use atol=rtol=1e-5,
a few ulps of the O(1) values involved after summing over T <= 8 and C = 16.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nnlab import ops
from nnlab.models import set_explicit
from nnlab.nn import SelfAttention

F64 = dict(atol=1e-10, rtol=1e-10)
F32 = dict(atol=1e-5, rtol=1e-5)
B, T, C, H = 2, 7, 16, 4


def _attn(causal: bool, seed: int = 0) -> SelfAttention:
    torch.manual_seed(seed)
    return SelfAttention(C, H, causal=causal).eval()


@pytest.mark.parametrize("causal", [False, True])
def test_ops_self_attention_matches_hand_computation(causal):
    # One head, written out with Python scalars: s_tj = q_t . k_j / sqrt(d_k), a_tj = e^s_tj / sum_j e^s_tj.
    g = torch.Generator().manual_seed(1)
    X = torch.randn(4, 3, generator=g, dtype=torch.float64)
    W_Q, W_K, W_V = (torch.randn(3, 2, generator=g, dtype=torch.float64) for _ in range(3))
    O, A = ops.self_attention(X, W_Q, W_K, W_V, causal=causal, return_attention=True)
    Q, K, V = ((X @ W).tolist() for W in (W_Q, W_K, W_V))
    n, d_k = len(Q), len(Q[0])
    A_ref = [[0.0] * n for _ in range(n)]
    for t in range(n):
        keys = range(t + 1) if causal else range(n)  # causal: only positions <= t
        s = {j: sum(Q[t][i] * K[j][i] for i in range(d_k)) / math.sqrt(d_k) for j in keys}
        z = sum(math.exp(v) for v in s.values())
        for j in keys:
            A_ref[t][j] = math.exp(s[j]) / z
    O_ref = [[sum(A_ref[t][j] * V[j][i] for j in range(n)) for i in range(len(V[0]))] for t in range(n)]
    torch.testing.assert_close(A, torch.tensor(A_ref, dtype=torch.float64), **F64)
    torch.testing.assert_close(O, torch.tensor(O_ref, dtype=torch.float64), **F64)


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_path_matches_sdpa_path(causal):
    sa = _attn(causal)
    x = torch.randn(B, T, C, requires_grad=True)
    assert sa(x)[2] is None  # K, V only when asked for (use_cache) or extended (past_kv)
    y_fast, A_fast, kv_fast = sa(x, use_cache=True)
    g_fast = torch.autograd.grad(y_fast.square().sum(), x)[0]
    set_explicit(sa, True)
    assert sa(x)[2] is None
    y_ex, A_ex, kv_ex = sa(x, use_cache=True)
    g_ex = torch.autograd.grad(y_ex.square().sum(), x)[0]
    assert A_fast is None and A_ex.shape == (B, H, T, T)  # the fast path never materialises A
    torch.testing.assert_close(y_ex, y_fast, **F32)
    torch.testing.assert_close(g_ex, g_fast, **F32)  # the backward passes agree too
    torch.testing.assert_close(kv_ex, kv_fast, atol=0, rtol=0)  # K, V come from the same Dense


def _mha_like(sa: SelfAttention) -> nn.MultiheadAttention:
    mha = nn.MultiheadAttention(C, H, batch_first=True).eval()
    with torch.no_grad():
        # Same layout: qkv stacks W_Q, W_K, W_V as (3C, C), exactly in_proj_weight.
        mha.in_proj_weight.copy_(sa.qkv.weight)
        mha.in_proj_bias.copy_(sa.qkv.bias)
        mha.out_proj.weight.copy_(sa.proj.weight)
        mha.out_proj.bias.copy_(sa.proj.bias)
    return mha


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_torch_multihead_attention(causal, explicit):
    sa = set_explicit(_attn(causal, seed=2), explicit)
    mha = _mha_like(sa)
    x = torch.randn(B, T, C)
    # MHA's boolean attn_mask: True = "may NOT attend", so the causal mask is the strict upper triangle.
    mask = torch.ones(T, T, dtype=torch.bool).triu(1) if causal else None
    with torch.no_grad():
        y_ref, w_ref = mha(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=True)
        y, _, _ = sa(x)
        y_w, A, _ = sa(x, need_weights=True)
    torch.testing.assert_close(y, y_ref, **F32)
    torch.testing.assert_close(y_w, y_ref, **F32)
    torch.testing.assert_close(A.mean(dim=1), w_ref, **F32)  # average over heads = MHA's weights
    if causal:
        assert (A.triu(1) == 0).all()  # no weight on the future


@pytest.mark.parametrize("explicit", [False, True])
def test_causal_mask_blocks_the_future(explicit):
    sa = set_explicit(_attn(causal=True, seed=3), explicit)
    x = torch.randn(B, T, C)
    t = 3
    x2 = x.clone()
    x2[:, t:] = torch.randn(B, T - t, C)  # change tokens t, t+1, ... only
    with torch.no_grad():
        y, y2 = sa(x)[0], sa(x2)[0]
    torch.testing.assert_close(y2[:, :t], y[:, :t], atol=0, rtol=0)  # earlier outputs: bit-identical
    assert (y2[:, t:] - y[:, t:]).abs().amax() > 1e-3  # later outputs do see the change
    # And the same module without the mask does leak the future into earlier positions.
    sa.causal = False
    with torch.no_grad():
        assert (sa(x2)[0][:, :t] - sa(x)[0][:, :t]).abs().amax() > 1e-3


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("chunks", [(1,) * T, (3, 1, 2, 1)])
def test_past_kv_incremental_equals_full(explicit, chunks):
    # chunks of 1 take SDPA's "single query, no mask" branch; chunks of 2-3 after a prefix take its
    # explicit bottom-right-aligned mask branch.
    sa = set_explicit(_attn(causal=True, seed=4), explicit)
    x = torch.randn(B, T, C)
    with torch.no_grad():
        y_full, _, (K_full, V_full) = sa(x, use_cache=True)
        outs, past, start = [], None, 0
        for n in chunks:
            y, _, past = sa(x[:, start:start + n], past_kv=past, use_cache=True)
            outs.append(y)
            start += n
    assert past[0].shape == (B, H, T, C // H)
    torch.testing.assert_close(torch.cat(outs, dim=1), y_full, **F32)
    torch.testing.assert_close(past, (K_full, V_full), **F32)


def test_past_kv_attention_weights_cover_past_and_new_keys():
    sa = _attn(causal=True, seed=5)
    x = torch.randn(B, T, C)
    with torch.no_grad():
        A_full = sa(x, need_weights=True)[1]
        _, _, past = sa(x[:, :5], use_cache=True)
        A_new = sa(x[:, 5:], past_kv=past, need_weights=True)[1]
    assert A_new.shape == (B, H, 2, T)
    torch.testing.assert_close(A_new, A_full[:, :, 5:], **F32)  # the last rows of the full map


@pytest.mark.parametrize("new_tokens", [T, 3, 1])  # a whole sequence, then 3 or 1 queries after a cache
def test_bf16_cpu_attention_is_sdpas_math_kernel_exactly(new_tokens, monkeypatch):
    """In bf16 on CPU the fast path calls SDPA's math kernel by name: outputs and gradients must be
    bit-identical to F.scaled_dot_product_attention restricted to that kernel (its public entry
    point, which also converts a bool mask), and close to the float32 explicit path."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nnlab import kernels
    from nnlab.nn import layers

    monkeypatch.setattr(kernels, "attention_applies", lambda *a: False)  # not nnlab's kernel: tested apart
    sa = _attn(causal=True).to(torch.bfloat16)
    torch.manual_seed(1)
    x_all = torch.randn(B, T, C, dtype=torch.bfloat16)
    past = sa(x_all[:, : T - new_tokens], use_cache=True)[2] if new_tokens < T else None
    x = x_all[:, T - new_tokens :]

    def run():
        xi = x.clone().requires_grad_(True)
        y = sa(xi, past_kv=past)[0]
        return y, torch.autograd.grad(y.float().square().sum(), xi)[0]

    y, g = run()

    def sdpa_math(q, k, v, mask, is_causal, dropout):  # the same arguments, through SDPA's public entry
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout)

    monkeypatch.setattr(layers, "_math_attention", sdpa_math)
    y_ref, g_ref = run()
    assert torch.equal(y, y_ref) and torch.equal(g, g_ref)

    sa32 = sa.float()
    set_explicit(sa32, True)
    y32 = sa32(x.float(), past_kv=None if past is None else tuple(t.float() for t in past))[0]
    torch.testing.assert_close(y.float(), y32, atol=3e-2, rtol=3e-2)  # bf16 keeps 8 mantissa bits

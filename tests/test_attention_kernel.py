"""nnlab's CPU attention kernel (nnlab.kernels.attention, the op nnlab::attention) against the
article's explicit formula (ops.attention), computed in float64 on the same Q, K, V.

Tolerances: fp32 results within 2e-5 of float64 (1e-4 relative): the scores here reach ~20, where
fp32's rounding of a score (~1e-6) moves a probability by as much; a wrong mask, scale or formula
moves results by O(0.1). bf16 results within 2^-7 of the float64 result computed on
the same (bf16-rounded) inputs: the kernel computes in fp32 and rounds once on output, so one
bf16 rounding step (2^-8 relative) plus fp32 noise.
"""

from __future__ import annotations

import math
import platform

import pytest
import torch

from nnlab import ops
from nnlab.models import build_model
from nnlab import kernels
from nnlab.kernels import build
from nnlab.kernels.attention_op import MAX_T
from nnlab.nn import SelfAttention
from nnlab.train.precision import cpu_flags

# A build failure where a compiler exists fails these tests (and test_kernels.py's build test).
pytestmark = pytest.mark.skipif(build.why_not_tried() is not None,
                                reason=f"no kernel build is tried here: {build.why_not_tried()}")


def _reference(qkv: torch.Tensor, n_head: int, causal: bool) -> torch.Tensor:
    """ops.attention (A = softmax(QK^T/sqrt(d_k)), O = AV) per head, in float64: (B, T, 3C) -> (B, T, C)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.double().view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
    return ops.attention(q, k, v, causal=causal)[0].transpose(1, 2).reshape(B, T, C)


def _both(qkv, n_head, causal, dy):
    """(output, input gradient) of the kernel and of the float64 reference, for upstream gradient dy."""
    x = qkv.clone().requires_grad_(True)
    y = kernels.attention(x, n_head, causal)
    (g,) = torch.autograd.grad(y, x, dy)
    x64 = qkv.detach().double().requires_grad_(True)
    y64 = _reference(x64, n_head, causal)
    (g64,) = torch.autograd.grad(y64, x64, dy.double())
    return y, g, y64, g64


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,T,H,D", [(2, 7, 4, 8), (3, 64, 4, 32), (1, 50, 2, 48), (2, 100, 1, 64), (1, 1, 3, 16),
                                     (1, 33, 2, 5)])
def test_fp32_matches_explicit_formula(causal, B, T, H, D):
    torch.manual_seed(T * D + causal)
    qkv = 2 * torch.randn(B, T, 3 * H * D)  # scores of several units: a softmax far from uniform
    dy = torch.randn(B, T, H * D)
    y, g, y64, g64 = _both(qkv, H, causal, dy)
    assert y.dtype == g.dtype == torch.float32 and y.shape == (B, T, H * D) and g.shape == qkv.shape
    torch.testing.assert_close(y.double(), y64, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(g.double(), g64, atol=2e-5 * g64.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_bf16_is_the_fp32_result_rounded_once(causal):
    torch.manual_seed(1)
    B, T, H, D = 2, 64, 4, 32
    qkv = (2 * torch.randn(B, T, 3 * H * D)).to(torch.bfloat16)
    dy = torch.randn(B, T, H * D).to(torch.bfloat16)
    y, g, y64, g64 = _both(qkv, H, causal, dy)
    assert y.dtype == g.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), y64, atol=2**-7, rtol=2**-7)
    torch.testing.assert_close(g.double(), g64, atol=2**-7 * g64.abs().max().item(), rtol=2**-7)
    # Exactly the fp32 kernel's results on the same values, rounded by torch's cast (nearest even).
    y32, lse = torch.ops.nnlab.attention(qkv.float(), H, causal)
    assert torch.equal(y, y32.to(torch.bfloat16))
    g32 = torch.ops.nnlab.attention_backward(qkv.float(), y.float(), lse, dy.float(), H, causal)
    assert torch.equal(g, g32.to(torch.bfloat16))


def test_causal_rows_ignore_the_future():
    """Changing the last token's Q, K and V changes no earlier output row, and no earlier row's
    gradient reaches it."""
    torch.manual_seed(2)
    qkv = torch.randn(2, 20, 3 * 32)
    y = kernels.attention(qkv, 2, True)
    qkv2 = qkv.clone()
    qkv2[:, -1] += 5.0
    y2 = kernels.attention(qkv2, 2, True)
    assert torch.equal(y[:, :-1], y2[:, :-1]) and not torch.equal(y[:, -1], y2[:, -1])
    x = qkv.clone().requires_grad_(True)
    kernels.attention(x, 2, True)[:, :-1].sum().backward()
    assert torch.equal(x.grad[:, -1], torch.zeros_like(x.grad[:, -1]))


def test_custom_op_registration():
    """torch.library's checks of the op's schema, fake (meta) implementation and autograd formula."""
    torch.manual_seed(3)
    qkv = torch.randn(2, 9, 3 * 16, requires_grad=True)
    torch.library.opcheck(torch.ops.nnlab.attention.default, (qkv, 2, True))


def test_self_attention_uses_the_kernel_only_where_it_applies(monkeypatch):
    sa = SelfAttention(32, 4, causal=True).train()
    x = torch.randn(2, 10, 32)
    calls = []
    real = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *a: calls.append(a) or real(*a))
    y_kernel, A, (k, v) = sa(x, use_cache=True)
    assert len(calls) == 1 and A is None and k.shape == v.shape == (2, 4, 10, 8)
    sa(x, need_weights=True)  # attention weights wanted: the explicit path
    sa(x[:, 5:], past_kv=(k[:, :, :5], v[:, :, :5]))  # a cache: SDPA with a mask
    sa.dropout = 0.1
    sa(x)  # dropout in training: SDPA
    assert len(calls) == 1
    sa.eval()
    sa(x)  # no dropout at evaluation
    assert len(calls) == 2
    sa.dropout = 0.0
    monkeypatch.setattr(kernels, "attention_applies", lambda *a: False)
    torch.testing.assert_close(sa(x)[0], y_kernel, atol=1e-6, rtol=1e-6)  # SDPA: the same values
    assert not kernels.attention_applies(torch.randn(1, MAX_T + 1, 96), 4)
    assert not kernels.attention_applies(torch.randn(1, 8, 96, dtype=torch.float16), 4)


def test_compiled_gpt_step_matches_eager(one_thread):
    """Under torch.compile the op is one node of the forward graph AOTAutograd traces, and its
    registered backward one of the backward graph: the same loss and gradients as eager.
    (tests/test_scaling.py compiles it with inductor.)"""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, _):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    torch.manual_seed(4)
    model = build_model("gpt", vocab_size=20, n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=0.0)
    idx = torch.randint(0, 20, (2, 16))

    def loss_and_grads(m):
        model.zero_grad()
        loss = m(idx).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads(model)
    torch._dynamo.reset()
    loss_c, grads_c = loss_and_grads(torch.compile(model, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep)))
    forward, backward = graphs
    assert "nnlab.attention.default" in forward and "nnlab.attention_backward.default" in backward
    torch.testing.assert_close(loss_c, loss, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 17, 64, 256])
def test_log_sum_exp_is_each_rows(causal, T):
    """The forward's second output, which the backward trusts to rebuild the probabilities: each
    query row's log-sum-exp of its scaled (and masked) scores, here against float64. Scores up to
    ~60 put the row sums between 1 and T and exercise the kernel's own log over them."""
    torch.manual_seed(T + causal)
    H, D = 2, 16
    qkv = 4 * torch.randn(2, T, 3 * H * D)
    _, lse = torch.ops.nnlab.attention(qkv, H, causal)
    q, k, _ = (t.double().view(2, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    assert lse.shape == (2, H, T) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, dim=-1), atol=1e-5, rtol=1e-6)


def test_scale_is_one_over_sqrt_dk():
    """With K = Q and V = I-like rows the output exposes the softmax temperature."""
    T, D = 2, 4
    q = torch.zeros(T, D)
    q[0, 0], q[1, 0] = 1.0, 3.0
    v = torch.eye(T, D)
    qkv = torch.cat([q, q, v], dim=1)[None]  # one head
    y = kernels.attention(qkv, 1, False)[0]
    s = torch.tensor([[1.0, 3.0], [3.0, 9.0]]) / math.sqrt(D)
    torch.testing.assert_close(y[:, :T], torch.softmax(s, dim=1), atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(platform.machine() != "x86_64" or not {"avx2", "fma", "bmi2", "movbe", "f16c"} <= cpu_flags(),
                    reason="needs an x86 CPU that runs x86-64-v3 code")
def test_a_build_for_avx2_only_cpus_computes_what_this_one_does(avx2_build):
    """On AVX2-only CPUs the kernel runs with 8-float vectors (16 with AVX-512): the same products in
    the same order per output, but the softmax's sums split over another number of lanes."""
    torch.manual_seed(5)
    qkv, dy = torch.randn(3, 40, 3 * 64), torch.randn(3, 40, 64)

    def run():
        x = qkv.clone().requires_grad_(True)
        y = kernels.attention(x, 2, True)
        y.backward(dy)
        return y.detach(), x.grad

    native = run()
    avx2_build()
    portable = run()
    for a, b in zip(portable, native):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

"""nnlab.train.optim.clip_grad_norm against its reference, torch.nn.utils.clip_grad_norm_: the same
total norm and the same clipped gradients, through nn/clip.c's one-call passes where they apply
(contiguous fp32 CPU gradients) and through torch's own code everywhere else."""

import math

import pytest
import torch

from nnlab.nn import kernels
from nnlab.train.optim import clip_grad_norm

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="nnlab's C kernels are not built here")

# 1 and 4,097 numbers: remainders past any vector width and past clip.c's 4,096-number blocks.
SHAPES = [(512, 128), (128,), (1,), (4097,), (65, 128), (3, 5, 7), (128, 512)]


def params(scale: float, seed: int = 0, shapes=SHAPES) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * scale
    ps.append(torch.nn.Parameter(torch.zeros(3)))  # no gradient: skipped by both
    return ps


def both(ps: list[torch.nn.Parameter], max_norm: float):
    """(norm, grads) from nnlab's clip and from torch's, each on its own copy of the gradients."""
    mine = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for a, b, p in zip(mine, ref, ps):
        a.grad = None if p.grad is None else p.grad.clone()
        b.grad = None if p.grad is None else p.grad.clone()
    n_mine = float(clip_grad_norm(mine, max_norm))
    n_ref = float(torch.nn.utils.clip_grad_norm_(ref, max_norm))
    return (n_mine, [p.grad for p in mine]), (n_ref, [p.grad for p in ref])


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("scale, max_norm", [(1.0, 1.0), (1e-3, 1.0), (10.0, 0.5)])
def test_clip_matches_torch(threads, scale, max_norm, monkeypatch):
    """Clipped (norm above max_norm) and untouched (below), with the buffers split between 1, 2 or 3
    threads at every boundary the element counts give."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    ps = params(scale)
    (n_mine, g_mine), (n_ref, g_ref) = both(ps, max_norm)
    assert n_mine == pytest.approx(n_ref, rel=1e-6)
    if n_ref < max_norm:  # nothing to clip: the gradients are left exactly as they were
        for a, p in zip(g_mine, ps):
            assert (a is None and p.grad is None) or torch.equal(a, p.grad)
    else:
        assert n_ref > max_norm and any(not torch.equal(a, p.grad) for a, p in zip(g_mine, ps) if a is not None)
    for a, b in zip(g_mine, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@needs_kernels
def test_the_norm_is_at_least_as_close_to_exact_as_torchs():
    """Against float64: the fast path's sum (fp32 blocks added in double) is at least as close as
    torch's per-tensor fp32 norms."""
    ps = params(1.0)
    exact = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in ps if p.grad is not None))
    (n_mine, _), (n_ref, _) = both(ps, 1e9)
    assert abs(n_mine - exact) <= max(abs(n_ref - exact), 1e-6 * exact)


@needs_kernels
def test_a_non_finite_gradient_spreads_as_in_torch():
    """An inf gradient makes the norm inf and the coefficient 0: inf * 0 = NaN there, 0 elsewhere."""
    ps = params(1.0)
    ps[1].grad[3] = float("inf")
    (n_mine, g_mine), (n_ref, g_ref) = both(ps, 1.0)
    assert math.isinf(n_mine) and math.isinf(n_ref)
    for a, b in zip(g_mine, g_ref):
        if a is not None:
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    assert g_mine[1].isnan().sum() == 1


@pytest.mark.parametrize("case", ["bf16", "non_contiguous", "no_kernels"])
def test_what_the_fast_path_does_not_take_goes_to_torch(case, monkeypatch):
    """bf16 or strided gradients, or no built library: torch's clip_grad_norm_ does the work."""
    ps = params(10.0)
    if case == "bf16":
        for p in ps:
            p.data, p.grad = p.data.bfloat16(), None if p.grad is None else p.grad.bfloat16()
    elif case == "non_contiguous":
        ps[0].grad = ps[0].grad.t().contiguous().t()
        assert not ps[0].grad.is_contiguous()
    else:
        monkeypatch.setattr(kernels, "library", lambda: None)
    calls = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(1) or real(*a, **k))
    (n_mine, g_mine), (n_ref, g_ref) = both(ps, 0.5)
    assert len(calls) == 2  # nnlab's call went to torch's, beside the reference's own
    assert n_mine == n_ref
    for a, b in zip(g_mine, g_ref):
        assert (a is None and b is None) or torch.equal(a, b)

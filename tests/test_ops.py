"""The article's explicit formulas against PyTorch's fast kernels, and against hand computation."""

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from nnlab import ops
from nnlab.nn import Conv2d, Dense, MaxPool2d

# fp32 tolerances: different summation orders (unfold+matmul vs direct conv) differ by ~1e-6.
TOL = dict(atol=1e-5, rtol=1e-5)


def test_dense_matches_linear_and_hand_computation():
    X, W, b = torch.randn(5, 3), torch.randn(3, 4), torch.randn(4)
    y = ops.dense(X, W, b, torch.relu)
    assert_close(y, torch.relu(F.linear(X, W.t(), b)), **TOL)
    # one element by hand: y[0, 0] = f(sum_k X[0, k] W[k, 0] + b[0])
    hand = max(0.0, sum(X[0, k].item() * W[k, 0].item() for k in range(3)) + b[0].item())
    assert abs(y[0, 0].item() - hand) < 1e-5


def test_dense_layer_paths_agree():
    layer = Dense(6, 3)
    x = torch.randn(4, 6)
    fast = layer(x)
    layer.explicit = True
    assert_close(layer(x), fast, **TOL)


def test_article_mse_is_half_of_torch_mse():
    y, y_star = torch.randn(7, 3), torch.randn(7, 3)
    L = ops.article_mse(y, y_star)
    assert_close(L, torch.nn.MSELoss()(y, y_star) / 2, **TOL)
    assert abs(L.item() - ((y - y_star) ** 2).sum().item() / (2 * 21)) < 1e-5


def test_gd_step_is_theta_minus_alpha_grad_and_matches_sgd():
    torch.manual_seed(0)
    w = torch.randn(3, 2, requires_grad=True)
    x, t = torch.randn(8, 3), torch.randn(8, 2)
    ops.article_mse(x @ w, t).backward()
    expected = (w - 0.1 * w.grad).detach()
    # by hand: dL/dw = X^T (Xw - t) / N with N = 16 elements
    assert_close(w.grad, x.t() @ (x @ w - t).detach() / 16, **TOL)
    w2 = w.detach().clone().requires_grad_(True)
    w2.grad = w.grad.clone()
    ops.gd_step([w], [w.grad], lr=0.1)
    assert_close(w.detach(), expected)
    torch.optim.SGD([w2], lr=0.1).step()  # the optimizer the loop uses for optimizer=sgd
    assert_close(w2.detach(), expected)


def test_conv2d_explicit_matches_f_conv2d():
    X, W, b = torch.randn(2, 3, 9, 9), torch.randn(5, 3, 3, 3), torch.randn(5)
    for stride, padding in [(1, 0), (1, 1), (2, 1)]:
        assert_close(ops.conv2d(X, W, b, stride, padding), F.conv2d(X, W, b, stride, padding), **TOL)


def test_conv2d_one_output_by_hand():
    X, W = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 3, 3)
    C = ops.conv2d(X, W)
    hand = sum(X[0, c, i, j].item() * W[0, c, i, j].item() for c in range(2) for i in range(3) for j in range(3))
    assert abs(C[0, 0, 0, 0].item() - hand) < 1e-4


def test_conv_and_pool_layers_paths_agree_with_gradients():
    conv, pool = Conv2d(2, 4, 3, padding=1), MaxPool2d(2)
    x = torch.randn(3, 2, 8, 8, requires_grad=True)
    fast = pool(conv(x))
    (g_fast,) = torch.autograd.grad(fast.sum(), x)
    conv.explicit = pool.explicit = True
    slow = pool(conv(x))
    (g_slow,) = torch.autograd.grad(slow.sum(), x)
    assert_close(slow, fast, **TOL)
    assert_close(g_slow, g_fast, **TOL)


def test_max_pool_matches_torch_and_picks_window_max():
    C = torch.randn(2, 3, 7, 7)  # odd size: the remainder row/column is dropped, as in torch
    assert_close(ops.max_pool2d(C, 2), F.max_pool2d(C, 2))
    assert ops.max_pool2d(C, 2)[0, 0, 0, 0] == C[0, 0, :2, :2].max()


def test_softmax_rows_sum_to_one_and_match_torch():
    Z = torch.randn(4, 10) * 50  # large logits: the max-shift keeps exp() finite
    S = ops.softmax(Z)
    assert torch.isfinite(S).all()
    assert_close(S, torch.softmax(Z, -1), **TOL)


def test_fused_adamw_matches_reference_adamw():
    """The loop's fast path (fused AdamW) against torch's reference per-parameter implementation."""
    from nnlab.config import TrainConfig
    from nnlab.models import build_model
    from nnlab.train.optim import make_optimizer

    t = TrainConfig(optimizer="adamw", lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    a = build_model("mlp", in_features=5, hidden=(7,), out_features=2)
    b = build_model("mlp", in_features=5, hidden=(7,), out_features=2)
    b.load_state_dict(a.state_dict())
    w0 = a.head.weight.detach().clone()
    oa, ob = make_optimizer(a, t, fused=True), make_optimizer(b, t, fused=False)
    assert oa.param_groups[0]["fused"] and not ob.param_groups[0]["fused"]
    x, y = torch.randn(16, 5), torch.randn(16, 2)
    for _ in range(5):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            ops.article_mse(m(x), y).backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert_close(pa, pb, atol=1e-6, rtol=1e-5)
    assert (a.head.weight - w0).abs().max() > 1e-3  # the steps really moved the weights

"""nnlab's CPU kernels against ATen: the 2x2 max-pool (+ReLU) against F.max_pool2d and torch.relu
(values and gradients, bit for bit), the fused conv 1->C + pool + ReLU against conv, pool, relu, and
Winograd's 3x3 convolution against a float64 one."""

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nnlab.nn import MaxPool2d, kernels
from nnlab.train.precision import cpu_flags

needs_kernel = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                  reason="no C compiler: the kernel cannot be built here")


def reference(x, relu):
    y = F.max_pool2d(x, 2)
    return torch.relu(y) if relu else y


def hard_input(dtype, shape=(5, 16, 10, 12)):
    """Integers in [-3, 3] (ties in most windows, zeros, negatives) and NaNs, one pair in a window."""
    torch.manual_seed(0)
    x = torch.randint(-3, 4, shape).to(dtype)
    x[0, 0, 0, 0] = float("nan")
    x[1, 2, 2, 0] = x[1, 2, 3, 1] = float("nan")
    x[2, 3, 4:6, 4:6] = -2.0  # a window that is all ties, all negative
    return x.contiguous(memory_format=torch.channels_last)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("relu", [False, True])
def test_kernel_matches_aten_values_and_gradients_exactly(dtype, relu):
    assert kernels.library() is not None, kernels.status()
    x = hard_input(dtype)
    assert kernels.supports(x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = reference(xa, relu), kernels.pool2x2(xb, relu)
    g = torch.randn(ya.shape).to(dtype)
    ya.backward(g), yb.backward(g)
    assert yb.is_contiguous(memory_format=torch.channels_last) and yb.dtype == dtype
    assert torch.equal(ya.isnan(), yb.isnan()) and torch.equal(ya.nan_to_num(), yb.nan_to_num())
    # the winner of every window (first max, a NaN over numbers) gets the gradient, as in ATen
    assert torch.equal(xa.grad, xb.grad)


@needs_kernel
def test_kernel_with_one_thread_and_a_non_channels_last_gradient():
    x = hard_input(torch.float32).requires_grad_()
    torch_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y = kernels.pool2x2(x, True)
    finally:
        torch.set_num_threads(torch_threads)
    g = torch.randn(y.shape)  # NCHW-contiguous: the backward must read it through its strides
    y.backward(g)
    xr = x.detach().clone().requires_grad_()
    yr = reference(xr, True)
    yr.backward(g)
    assert torch.equal(y.isnan(), yr.isnan()) and torch.equal(y.nan_to_num(), yr.nan_to_num())
    assert torch.equal(x.grad, xr.grad)


@pytest.mark.parametrize("x", [
    torch.randn(2, 4, 8, 8),  # NCHW memory
    torch.randn(2, 4, 7, 8).contiguous(memory_format=torch.channels_last),  # odd H
    torch.randn(2, 4, 8, 8).to(torch.float16).contiguous(memory_format=torch.channels_last),
    torch.randint(0, 9, (2, 4, 8, 8)).contiguous(memory_format=torch.channels_last),
])
def test_tensors_the_kernel_does_not_take_go_to_aten(x):
    assert not kernels.supports(x)
    for relu in (False, True):
        assert torch.equal(MaxPool2d(2)(x, relu=relu), reference(x, relu))


def test_no_kernels_switch_leaves_aten_in_charge():
    code = ("from nnlab.nn import kernels as k; import torch; "
            "x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last); "
            "print(k.supports(x), k.status())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "NNLAB_NO_KERNELS": "1"}).stdout
    assert out.strip() == "False NNLAB_NO_KERNELS is set"


@needs_kernel
def test_a_damaged_cached_library_is_rebuilt(tmp_path):
    """Each load in a fresh process, as for a user: a process must never rewrite a library it has loaded."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    code = "from nnlab.nn import kernels as k; print(k.library() is not None, k.status())"

    def load():
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout

    assert load().startswith("True built")
    (built,) = (tmp_path / "nnlab" / "kernels").glob("kernels-*.so")
    built.write_bytes(b"not an ELF file")
    assert load().startswith("True built")
    assert built.read_bytes()[:4] == b"\x7fELF"


@needs_kernel
def test_traced_and_compiled_models_use_aten_and_agree_with_the_kernel():
    """Neither torch.jit.trace nor torch.compile can see into a ctypes call: both must take ATen's pool."""
    from nnlab.models import build_model

    torch.manual_seed(0)
    model = build_model("seed-cnn").to(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    eager = model(x)
    traced = torch.jit.trace(model, x, check_trace=False)
    assert "aten::max_pool2d" in str(traced.inlined_graph)
    assert torch.allclose(traced(x), eager, atol=1e-5)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: no break at the kernel
    assert torch.allclose(compiled(x), eager, atol=1e-5)


# ---- conv 1->C (3x3) + max-pool + ReLU in one pass -------------------------------------------------

def conv_reference(x, conv, relu):
    y = F.max_pool2d(conv(x), 2)
    return torch.relu(y) if relu else y


def conv_grads(fn, x, conv, g):
    conv.zero_grad(set_to_none=True)
    y = fn(x, conv)
    y.backward(g.to(y.dtype))
    return y.detach(), conv.weight.grad.clone(), conv.bias.grad.clone()


@needs_kernel
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_conv_pool_matches_conv_then_pool(relu, bf16):
    from nnlab.nn import Conv2d

    torch.manual_seed(0)
    conv, x = Conv2d(1, 32, 3, padding=1), torch.randn(6, 1, 12, 10)
    g = torch.randn(6, 32, 6, 5)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        assert kernels.supports_conv_pool(x, conv) == kernels.conv_native()  # the kernel runs either way here
        ya, gwa, gba = conv_grads(lambda x, c: conv_reference(x, c, relu), x, conv, g)
        yb, gwb, gbb = conv_grads(lambda x, c: kernels.conv_pool(x, c, relu), x, conv, g)
    assert yb.dtype == ya.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert yb.is_contiguous(memory_format=torch.channels_last)
    # fp32: the same sums in another order. bf16: each conv output rounded to bf16 as oneDNN's is;
    # the reference's weight gradient is itself rounded to bf16, this kernel's is summed in fp32.
    tol = dict(atol=1e-2, rtol=1e-2) if bf16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(yb, ya, **tol)
    torch.testing.assert_close(gwb, gwa, **tol)
    torch.testing.assert_close(gbb, gba, **tol)
    if bf16:  # most outputs agree bit for bit; a broken rounding would move far more of them
        assert (yb == ya).float().mean() > 0.99


@needs_kernel
@pytest.mark.parametrize("bf16", [False, True])
def test_conv_pool_without_bias(bf16):
    from nnlab.nn import Conv2d

    torch.manual_seed(2)
    conv, x = Conv2d(1, 16, 3, padding=1, bias=False), torch.randn(3, 1, 8, 6)
    g = torch.randn(3, 16, 4, 3)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        conv.zero_grad(set_to_none=True)
        ya = conv_reference(x, conv, True)
        ya.backward(g.to(ya.dtype))
        gwa = conv.weight.grad.clone()
        conv.zero_grad(set_to_none=True)
        yb = kernels.conv_pool(x, conv, True)
        yb.backward(g.to(yb.dtype))
    tol = dict(atol=1e-2, rtol=1e-2) if bf16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(yb, ya, **tol)
    torch.testing.assert_close(conv.weight.grad, gwa, **tol)


@needs_kernel
def test_conv_pool_ties_and_nans_follow_aten():
    """Zero weights make all four positions of every window tie (the first must win, as in ATen),
    and a NaN pixel must make its windows NaN."""
    from nnlab.nn import Conv2d

    conv = Conv2d(1, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
    x = torch.randn(2, 1, 8, 8)
    x[1, 0, 3, 4] = float("nan")
    g = torch.randn(2, 16, 4, 4)
    ya, gwa, gba = conv_grads(lambda x, c: conv_reference(x, c, False), x, conv, g)
    yb, gwb, gbb = conv_grads(lambda x, c: kernels.conv_pool(x, c, False), x, conv, g)
    assert torch.equal(ya.isnan(), yb.isnan()) and ya.isnan().any()
    assert torch.equal(ya.nan_to_num(), yb.nan_to_num())
    assert torch.equal(gwa.isnan(), gwb.isnan())
    torch.testing.assert_close(gwb.nan_to_num(), gwa.nan_to_num())
    torch.testing.assert_close(gbb, gba)


def wide_grads(fn, x, conv, g):
    """fn(x, conv)'s output and the gradients of x, W and b for the output gradient g."""
    x = x.detach().clone().requires_grad_()
    y, gw, gb = conv_grads(lambda x_, c: fn(x_, c), x, conv, g)
    return y, x.grad, gw, gb


@needs_kernel
@pytest.mark.parametrize("c_in", [32, 48])  # 48: blocks of 16 channels instead of 32
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_wide_conv_pool_matches_conv_then_pool(c_in, relu, bf16):
    """conv C_in->C (3x3) + pool: ATen's convolution and input gradient, the pool kernel, and the
    weight and bias gradients summed from the winners only."""
    from nnlab.nn import Conv2d

    torch.manual_seed(0)
    conv = Conv2d(c_in, 32, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(5, c_in, 10, 12).contiguous(memory_format=torch.channels_last)
    g = torch.randn(5, 32, 5, 6)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        if bf16:
            x = x.to(torch.bfloat16)  # as the block before hands it over under autocast
        assert kernels.supports_conv_pool(x, conv) == kernels.conv_native()
        ya, gxa, gwa, gba = wide_grads(lambda x, c: conv_reference(x, c, relu), x, conv, g)
        yb, gxb, gwb, gbb = wide_grads(lambda x, c: kernels.conv_pool(x, c, relu), x, conv, g)
    assert yb.dtype == ya.dtype == (torch.bfloat16 if bf16 else torch.float32)
    if bf16:
        assert torch.equal(yb, ya)  # ATen's convolution, and a pool that matches ATen's bit for bit
    else:  # winograd.c's convolution: the same sums up to rounding
        torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    assert gxb.dtype == x.dtype
    # The input gradient is ATen's or winograd.c's from the same full-size gradient; the weight
    # gradient is the same sum in another order, and under bf16 the reference's is rounded to bf16,
    # this one's is not.
    torch.testing.assert_close(gxb, gxa, atol=1e-5, rtol=1e-5)
    tol = dict(atol=0.02, rtol=0.01) if bf16 else dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gwb, gwa, **tol)
    torch.testing.assert_close(gbb, gba, **tol)
    # Against float64 from the same winners, this kernel's fp32 sums are far closer than bf16.
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        pooled, idx = F.max_pool2d(conv(x).float(), 2, return_indices=True)  # the convolution it pooled
    keep = (pooled > 0) if relu else torch.ones_like(pooled, dtype=torch.bool)
    gfull = torch.zeros(5, 32, 10 * 12, dtype=torch.float64)
    gfull.scatter_(2, idx.flatten(2), (g.to(ya.dtype).double() * keep).flatten(2))
    wd = conv.weight.detach().to(x.dtype).double().requires_grad_()
    F.conv2d(x.double(), wd, padding=1).backward(gfull.view(5, 32, 10, 12))
    torch.testing.assert_close(gwb.double(), wd.grad, atol=1e-4, rtol=1e-5)


def winograd_case(shape, c_out=64, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, shape[1], 3, 3) / (3 * shape[1] ** 0.5)
    return x, w, torch.randn(c_out)


@needs_kernel
@pytest.mark.skipif(not kernels.conv_native(), reason="the conv kernels do not run on this CPU")
@pytest.mark.parametrize("shape", [(5, 32, 6, 10), (1, 16, 2, 2), (3, 48, 14, 14)])  # 75 tiles: a part block
def test_winograd_is_a_3x3_convolution(shape):
    """winograd.c's F(2x2, 3x3) against a float64 convolution: within a few fp32 roundings of the
    largest terms (a wrong transform coefficient is off by whole terms), and its pooled variant
    exactly the pool kernel applied to its plain output."""
    x, w, b = winograd_case(shape)
    y = kernels._winograd(x, w, b, pool=False)
    assert y.shape == (shape[0], 64, *shape[2:]) and y.is_contiguous(memory_format=torch.channels_last)
    exact = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    terms = F.conv2d(x.double().abs(), w.double().abs(), b.double().abs(), padding=1)  # the sum of |terms|
    err = ((y.double() - exact).abs() / terms).max().item()
    assert err < 1e-6, err  # seen: 1e-7 to 1.6e-7 (ATen's direct convolution: 0.4e-7 to 2.9e-7)
    for relu in (False, True):
        yp, code = kernels._winograd(x, w, b, pool=True, relu=relu)
        yq, cq = kernels._pool_forward(y, relu)
        assert torch.equal(yp, yq) and torch.equal(code, cq)
    with pytest.raises(ValueError, match="even H, W"):  # what supports_conv_pool keeps from it
        kernels._winograd(x[:, :, :, 1:].contiguous(memory_format=torch.channels_last), w, b, pool=False)
    with pytest.raises(ValueError, match="channels-last fp32"):  # C would read NCHW memory as NHWC
        kernels._winograd(x.contiguous(), w, b, pool=False)


@needs_kernel
def test_wide_conv_pool_ties_follow_aten():
    """Zero weights: every window's four outputs tie, and the first must win, as in ATen, so the
    weight gradient reads the same patches."""
    from nnlab.nn import Conv2d

    torch.manual_seed(1)
    conv = Conv2d(16, 16, 3, padding=1).to(memory_format=torch.channels_last)
    with torch.no_grad():
        conv.weight.zero_()
    x = torch.randn(3, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    g = torch.randn(3, 16, 4, 4)
    ya, gxa, gwa, gba = wide_grads(lambda x, c: conv_reference(x, c, False), x, conv, g)
    yb, gxb, gwb, gbb = wide_grads(lambda x, c: kernels.conv_pool(x, c, False), x, conv, g)
    assert torch.equal(ya, yb)
    torch.testing.assert_close(gwb, gwa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gbb, gba)
    assert torch.equal(gxa, gxb)


@needs_kernel
@pytest.mark.skipif(platform.machine() != "x86_64" or not {"avx2", "fma", "bmi2", "movbe", "f16c"} <= cpu_flags(),
                    reason="needs an x86 CPU that runs x86-64-v3 code")
def test_a_build_for_avx2_only_cpus_computes_what_this_one_does(avx2_build):
    """CPUs without AVX-512 (the AVX2-only EPYC) get other code: 8-lane vectors, and bf16 rounding by
    bit arithmetic instead of vcvtneps2bf16. Build for such a CPU here and compare: per lane the same
    multiply-adds in the same order, so the outputs must agree bit for bit (these inputs give no
    denormal conv outputs, which only the instruction flushes to zero)."""
    from nnlab.nn import Conv2d

    torch.manual_seed(0)
    conv, x = Conv2d(1, 32, 3, padding=1), torch.randn(16, 1, 28, 28)
    g = torch.randn(16, 32, 14, 14)
    xp = hard_input(torch.bfloat16, shape=(4, 32, 10, 12))
    gp = torch.randn(4, 32, 5, 6).to(torch.bfloat16)
    wide = Conv2d(32, 16, 3, padding=1)
    gwide = torch.randn(4, 16, 5, 6)

    def run():
        with torch.autocast("cpu", torch.bfloat16):
            y, gw, gb = conv_grads(lambda x, c: kernels.conv_pool(x, c, True), x, conv, g)
            _, gw2, gb2 = conv_grads(lambda x, c: kernels.conv_pool(x, c, True), xp.nan_to_num(), wide, gwide)
        xg = xp.clone().requires_grad_()
        kernels.pool2x2(xg, True).backward(gp)
        return (y, gw, gb, kernels.pool2x2(xp, True), xg.grad, gw2, gb2,
                *kernels._winograd(*winograd_case((3, 48, 10, 12)), pool=True, relu=True))

    native = run()
    avx2_build()
    portable = run()
    # AVX2 vectors are the build's own, so seed-cnn uses the conv kernels there too.
    assert kernels.conv_native() and kernels.supports(xp) and kernels.supports_conv_pool(x, conv)
    assert torch.equal(native[0], portable[0])
    torch.testing.assert_close(portable[1], native[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(portable[2], native[2], atol=1e-5, rtol=1e-5)
    xr = xp.clone().requires_grad_()
    yr = reference(xr, True)
    yr.backward(gp)
    assert torch.equal(portable[3].nan_to_num(), yr.detach().nan_to_num())
    assert torch.equal(portable[4], xr.grad)
    assert torch.equal(portable[5], native[5]) and torch.equal(portable[6], native[6])  # the wide weight gradient
    assert torch.equal(portable[7], native[7]) and torch.equal(portable[8], native[8])  # Winograd + pool


def test_conv_pool_declines_what_it_does_not_compute():
    from nnlab.nn import Conv2d

    conv, x = Conv2d(1, 32, 3, padding=1), torch.randn(2, 1, 8, 8)
    assert not kernels.supports_conv_pool(x.clone().requires_grad_(), conv)  # no input gradient here
    assert not kernels.supports_conv_pool(torch.randn(2, 1, 7, 8), conv)  # odd height
    assert not kernels.supports_conv_pool(torch.randn(2, 3, 8, 8), Conv2d(3, 32, 3, padding=1))
    assert not kernels.supports_conv_pool(x, Conv2d(1, 24, 3, padding=1))  # not a multiple of 16
    assert not kernels.supports_conv_pool(x, Conv2d(1, 32, 3, stride=2, padding=1))
    assert not kernels.supports_conv_pool(x, Conv2d(1, 32, 5, padding=2))
    with torch.autocast("cpu", torch.float16):
        assert not kernels.supports_conv_pool(x, conv)


def test_seed_cnn_input_gradients_still_flow():
    """Attacks and saliency need d(loss)/d(input): seed-cnn must then take the unfused path."""
    from nnlab.models import build_model

    torch.manual_seed(0)
    model = build_model("seed-cnn")
    x = torch.randn(3, 1, 28, 28, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

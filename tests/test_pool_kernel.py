"""The fused 2x2 max-pool (+ReLU) kernel against F.max_pool2d and torch.relu: values and gradients, bit for bit."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nnlab.nn import MaxPool2d, pool_kernel

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
    assert pool_kernel.library() is not None, pool_kernel.status()
    x = hard_input(dtype)
    assert pool_kernel.supports(x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = reference(xa, relu), pool_kernel.pool2x2(xb, relu)
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
        y = pool_kernel.pool2x2(x, True)
    finally:
        torch.set_num_threads(torch_threads)
    g = torch.randn(y.shape)  # NCHW-contiguous: the backward must read it through its strides
    y.backward(g)
    xr = x.detach().clone().requires_grad_()
    reference(xr, True).backward(g)
    assert torch.equal(x.grad, xr.grad)


@pytest.mark.parametrize("x", [
    torch.randn(2, 4, 8, 8),  # NCHW memory
    torch.randn(2, 4, 7, 8).contiguous(memory_format=torch.channels_last),  # odd H
    torch.randn(2, 4, 8, 8).to(torch.float16).contiguous(memory_format=torch.channels_last),
    torch.randint(0, 9, (2, 4, 8, 8)).contiguous(memory_format=torch.channels_last),
])
def test_tensors_the_kernel_does_not_take_go_to_aten(x):
    assert not pool_kernel.supports(x)
    for relu in (False, True):
        assert torch.equal(MaxPool2d(2)(x, relu=relu), reference(x, relu))


def test_no_kernels_switch_leaves_aten_in_charge():
    code = ("from nnlab.nn import pool_kernel as k; import torch; "
            "x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last); "
            "print(k.supports(x), k.status())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "NNLAB_NO_KERNELS": "1"}).stdout
    assert out.strip() == "False NNLAB_NO_KERNELS is set"


@needs_kernel
def test_a_damaged_cached_library_is_rebuilt(tmp_path):
    """Each load in a fresh process, as for a user: a process must never rewrite a library it has loaded."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    code = "from nnlab.nn import pool_kernel as k; print(k.library() is not None, k.status())"

    def load():
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout

    assert load().startswith("True built")
    (built,) = (tmp_path / "nnlab" / "kernels").glob("pool2x2-*.so")
    built.write_bytes(b"not an ELF file")
    assert load().startswith("True built")
    assert built.read_bytes()[:4] == b"\x7fELF"

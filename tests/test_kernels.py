"""nnlab's CPU kernels (nnlab.kernels) against their references: each op's values and gradients
against torch's functional path, in fp32 and under bf16 autocast; the custom ops' registrations;
the layers' three paths; torch.compile; the AVX2 build; and the build itself.

Tolerances: the pool kernel is exact (bit for bit, ties and NaNs included). fp32 convolutions sum the
same terms in another order (or by Winograd): 1e-5. Under bf16 autocast outputs are rounded to bf16
as the reference's are, so they agree within one bf16 rounding (2^-7 relative) and mostly bit for
bit. The reference's bf16 weight gradients are themselves rounded to bf16 (on some CPUs in partial
sums too), the kernels' summed in fp32: they agree within 2^-7 of the largest element, and the
kernels' are checked tightly against float64 sums over the same windows' winners.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from nnlab import kernels
from nnlab.kernels import build
from nnlab.models import build_model
from nnlab.nn import ConvPoolReLU, MaxPool2d
from nnlab.train.precision import cpu_flags

CL = torch.channels_last
F32 = dict(atol=1e-5, rtol=1e-5)
BF16 = dict(atol=2**-7, rtol=2**-7)
needs_kernels = pytest.mark.skipif(build.why_not_tried() is not None,
                                   reason=f"no kernel build is tried here: {build.why_not_tried()}")


# ---- the build ------------------------------------------------------------------------------------

@needs_kernels
def test_the_library_builds_wherever_a_compiler_exists():
    status = kernels.status()
    assert status["built"], status
    assert set(status["ops"]) == {"pool2x2", "conv1_pool2x2", "conv3x3_pool2x2", "attention"}
    assert status["ops"]["pool2x2"] and status["ops"]["attention"], status
    if "avx512f" in cpu_flags() or "avx2" in cpu_flags():
        assert status["ops"]["conv1_pool2x2"] and status["ops"]["conv3x3_pool2x2"], status


def test_no_kernels_switch_leaves_torch_in_charge(monkeypatch):
    monkeypatch.setenv("NNLAB_NO_KERNELS", "1")
    monkeypatch.setattr(build, "_state", {})
    assert kernels.status() == {"built": False, "why": "NNLAB_NO_KERNELS is set",
                                "ops": dict.fromkeys(build.OPS, False)}
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=CL)
    layer = ConvPoolReLU(16, 32, 3, padding=1)
    assert not (kernels.pool_applies(x) or kernels.conv_pool_applies(x, layer)
                or kernels.attention_applies(torch.randn(2, 8, 48), 2))
    expected = torch.relu(F.max_pool2d(F.conv2d(x, layer.weight, layer.bias, padding=1), 2))
    assert torch.equal(layer(x), expected)


@needs_kernels
def test_a_build_failure_falls_back_to_torch_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    monkeypatch.setattr(build, "_state", {})
    with pytest.warns(UserWarning, match="build or load failed"):
        status = kernels.status()
    assert not status["built"] and status["why"].startswith("build or load failed"), status
    assert not kernels.pool_applies(torch.randn(2, 16, 8, 8).contiguous(memory_format=CL))


@needs_kernels
def test_a_damaged_cached_library_is_rebuilt(monkeypatch, tmp_path):
    """In a cache folder this process has not loaded from (a loaded library must never be rewritten)."""
    name = Path(build.library()._name).name  # the key: sources, flags and CPU, not the folder
    damaged = tmp_path / "nnlab" / "kernels" / name
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not an ELF file")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(build, "_state", {})
    assert kernels.status()["built"], kernels.status()
    assert damaged.read_bytes()[:4] == b"\x7fELF"


# ---- nnlab::pool2x2 -------------------------------------------------------------------------------

def pool_reference(x, relu):
    y = F.max_pool2d(x, 2)
    return torch.relu(y) if relu else y


def hard_input(dtype, shape=(5, 16, 10, 12)):
    """Integers in [-3, 3] (ties in most windows, zeros, negatives) and NaNs, one pair in a window."""
    torch.manual_seed(0)
    x = torch.randint(-3, 4, shape).to(dtype)
    x[0, 0, 0, 0] = float("nan")
    x[1, 2, 2, 0] = x[1, 2, 3, 1] = float("nan")
    x[2, 3, 4:6, 4:6] = -2.0  # a window that is all ties, all negative
    return x.contiguous(memory_format=CL)


def assert_same(a, b):
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("relu", [False, True])
def test_pool_matches_torch_exactly(dtype, relu):
    x = hard_input(dtype)
    assert kernels.pool_applies(x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = pool_reference(xa, relu), kernels.pool(xb, relu)
    g = torch.randn(ya.shape).to(dtype)
    ya.backward(g), yb.backward(g)
    assert yb.is_contiguous(memory_format=CL) and yb.dtype == dtype
    assert_same(yb, ya)
    assert torch.equal(xb.grad, xa.grad)  # the first max of each window (a NaN over numbers) gets it


@needs_kernels
def test_pool_with_one_thread_and_an_nchw_gradient(one_thread):
    x = hard_input(torch.float32).requires_grad_()
    y = kernels.pool(x, True)
    g = torch.randn(y.shape)  # NCHW-contiguous: the backward must read it through its strides
    y.backward(g)
    xr = x.detach().clone().requires_grad_()
    pool_reference(xr, True).backward(g)
    assert torch.equal(x.grad, xr.grad)


@pytest.mark.parametrize("x", [
    torch.randn(2, 4, 8, 8),  # NCHW memory
    torch.randn(2, 4, 7, 8).contiguous(memory_format=CL),  # odd H
    torch.randn(2, 4, 8, 8).to(torch.float16).contiguous(memory_format=CL),
    torch.randint(0, 9, (2, 4, 8, 8)).contiguous(memory_format=CL),
])
def test_pool_applies_only_where_it_computes(x):
    assert not kernels.pool_applies(x)
    assert torch.equal(MaxPool2d(2)(x), F.max_pool2d(x, 2))


@needs_kernels
def test_max_pool_layer_paths_agree(no_kernels):
    x = hard_input(torch.float32).nan_to_num()
    layer = MaxPool2d(2)
    op = layer(x)
    layer.explicit = True
    explicit = layer(x)
    layer.explicit = False
    no_kernels()
    assert torch.equal(op, explicit) and torch.equal(op, layer(x))


# ---- nnlab::conv1_pool2x2 and nnlab::conv3x3_pool2x2 ------------------------------------------------

def functional(x, conv, relu):
    """The layer's functional path (pool before ReLU: the same function)."""
    return pool_reference(F.conv2d(x, conv.weight, conv.bias, padding=1), relu)


def run(fn, x, conv, g, bf16):
    """fn(x, conv) under bf16 autocast (or none) and its gradients for the output gradient g:
    (output, x's gradient or None, W's, b's or None)."""
    conv.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        y = fn(x, conv)
    y.backward(g.to(y.dtype))
    return y.detach(), x.grad, conv.weight.grad, None if conv.bias is None else conv.bias.grad


def winner_weight_grad(x, conv, g, bf16, relu):
    """The weight gradient in float64, summed over each window's winner of the convolution as the ops
    compute it (under bf16: inputs and each output rounded to bf16)."""
    cast = (lambda t: t.detach().bfloat16().double()) if bf16 else (lambda t: t.detach().double())
    xd, wd = cast(x), cast(conv.weight).requires_grad_()
    with torch.no_grad():
        c = F.conv2d(xd, wd, None if conv.bias is None else cast(conv.bias), padding=1)
        c = cast(c)
        pooled, idx = F.max_pool2d(c, 2, return_indices=True)
    gy = cast(g) * ((pooled > 0) if relu else 1)
    N, C, H, W = c.shape
    gfull = torch.zeros(N, C, H * W, dtype=torch.float64).scatter_(2, idx.flatten(2), gy.flatten(2))
    F.conv2d(xd, wd, padding=1).backward(gfull.view(N, C, H, W))
    return wd.grad


def assert_grad_close(actual, expected, bf16):
    if bf16:
        assert_close(actual, expected, atol=2**-7 * expected.abs().max().item(), rtol=2**-7)
    else:
        assert_close(actual, expected, **F32)


def check_conv_pool(x, conv, g, bf16, relu, op_name):
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        assert kernels.conv_pool_applies(x, conv) == kernels.status()["ops"][op_name]
    y, gx, gw, gb = run(lambda x, c: kernels.conv_pool(x, c, relu), x, conv, g, bf16)
    y_ref, gx_ref, gw_ref, gb_ref = run(lambda x, c: functional(x, c, relu), x, conv, g, bf16)
    assert y.dtype == y_ref.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert y.is_contiguous(memory_format=CL)
    assert_close(y, y_ref, **(BF16 if bf16 else F32))
    if bf16:  # most outputs agree bit for bit; a broken rounding would move far more of them
        assert (y == y_ref).float().mean() > 0.99
    if gx_ref is not None:  # ATen's or Winograd's input gradient, from the same full-size gradient
        assert gx.dtype == x.dtype
        assert_close(gx, gx_ref, **F32)
    assert_grad_close(gw, gw_ref, bf16)
    if gb_ref is not None:
        assert_grad_close(gb, gb_ref, bf16)
    exact = winner_weight_grad(x, conv, g, bf16, relu)
    assert_close(gw.double(), exact, atol=1e-5 * exact.abs().max().item(), rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_conv1_pool_matches_the_functional_path(bias, relu, bf16):
    """One input channel, which needs no gradient."""
    torch.manual_seed(0)
    conv, x = ConvPoolReLU(1, 32, 3, padding=1, bias=bias), torch.randn(6, 1, 12, 10)
    check_conv_pool(x, conv, torch.randn(6, 32, 6, 5), bf16, relu, "conv1_pool2x2")


@needs_kernels
@pytest.mark.parametrize("c_in", [32, 48])  # 32: Winograd's input gradient too; 48: blocks of 16 channels
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_conv3x3_pool_matches_the_functional_path(c_in, relu, bf16):
    torch.manual_seed(0)
    conv = ConvPoolReLU(c_in, 32, 3, padding=1).to(memory_format=CL)
    x = torch.randn(5, c_in, 10, 12).contiguous(memory_format=CL)
    if bf16:
        x = x.bfloat16()  # as the block before hands it over under autocast
    check_conv_pool(x.requires_grad_(), conv, torch.randn(5, 32, 5, 6), bf16, relu, "conv3x3_pool2x2")


@needs_kernels
@pytest.mark.parametrize("c_in", [1, 16])
def test_conv_pool_ties_and_nans_follow_torch(c_in):
    """Zero weights make all four positions of every window tie (the first must win, as in ATen, so
    the weight gradient reads the same patches); a NaN pixel makes its windows NaN."""
    torch.manual_seed(1)
    conv = ConvPoolReLU(c_in, 16, 3, padding=1).to(memory_format=CL)
    with torch.no_grad():
        conv.weight.zero_()
    x = torch.randn(3, c_in, 8, 8).contiguous(memory_format=CL)
    if c_in == 1:
        x[1, 0, 3, 4] = float("nan")
    else:
        x.requires_grad_()
    g = torch.randn(3, 16, 4, 4)
    y, gx, gw, gb = run(lambda x, c: kernels.conv_pool(x, c, False), x, conv, g, False)
    y_ref, gx_ref, gw_ref, gb_ref = run(lambda x, c: functional(x, c, False), x, conv, g, False)
    assert_same(y, y_ref)
    assert torch.equal(gw.isnan(), gw_ref.isnan())
    assert_close(gw.nan_to_num(), gw_ref.nan_to_num(), **F32)
    assert_close(gb, gb_ref, **F32)
    if c_in > 1:
        assert torch.equal(gx, gx_ref)


@needs_kernels
@pytest.mark.parametrize("shape", [(5, 32, 6, 10), (1, 16, 2, 2), (3, 48, 14, 14)])  # 75 tiles: a part block
def test_winograd_is_a_3x3_convolution(shape):
    """nnlab::conv3x3_winograd against a float64 convolution: within a few fp32 roundings of the
    largest terms (a wrong transform coefficient is off by whole terms); conv3x3_pool2x2's fused
    Winograd + pool is exactly the pool op applied to it."""
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=CL)
    conv = ConvPoolReLU(shape[1], 64, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(64, shape[1], 3, 3) / (3 * shape[1] ** 0.5))
    w, b = conv.weight.detach(), conv.bias.detach()
    y = torch.ops.nnlab.conv3x3_winograd(x, w)
    assert y.shape == (shape[0], 64, *shape[2:]) and y.is_contiguous(memory_format=CL)
    exact = F.conv2d(x.double(), w.double(), padding=1)
    terms = F.conv2d(x.double().abs(), w.double().abs(), padding=1)  # the sum of |terms|
    assert ((y.double() - exact).abs() / terms).max().item() < 1e-6  # ATen's direct one: ~3e-7
    assert torch.equal(torch.ops.nnlab.conv3x3_winograd(x.contiguous(), w), y)  # NCHW input: the same
    for relu in (False, True):
        assert torch.equal(kernels.conv_pool(x, conv, relu), kernels.pool(y + b.view(1, -1, 1, 1), relu))
    with pytest.raises(ValueError, match="even H, W"):
        torch.ops.nnlab.conv3x3_winograd(x[:, :, :, 1:], w)
    with pytest.raises(ValueError, match="fp32"):
        torch.ops.nnlab.conv3x3_winograd(x.bfloat16(), w)


def test_conv_pool_applies_only_where_it_computes():
    ops = kernels.status()["ops"]
    conv, x = ConvPoolReLU(1, 32, 3, padding=1), torch.randn(2, 1, 8, 8)
    assert kernels.conv_pool_applies(x, conv) == ops["conv1_pool2x2"]
    assert not kernels.conv_pool_applies(x.clone().requires_grad_(), conv)  # no input gradient from conv1
    assert not kernels.conv_pool_applies(torch.randn(2, 1, 7, 8), conv)  # odd height
    assert not kernels.conv_pool_applies(torch.randn(2, 3, 8, 8), ConvPoolReLU(3, 32, 3, padding=1))
    assert not kernels.conv_pool_applies(x, ConvPoolReLU(1, 24, 3, padding=1))  # not a multiple of 16
    assert not kernels.conv_pool_applies(x, ConvPoolReLU(1, 32, 3, stride=2, padding=1))
    assert not kernels.conv_pool_applies(x, ConvPoolReLU(1, 32, 5, padding=2))
    with torch.autocast("cpu", torch.float16):
        assert not kernels.conv_pool_applies(x, conv)
    wide, xw = ConvPoolReLU(16, 32, 3, padding=1), torch.randn(2, 16, 8, 8)
    assert not kernels.conv_pool_applies(xw, wide)  # NCHW memory
    assert kernels.conv_pool_applies(xw.contiguous(memory_format=CL), wide) == ops["conv3x3_pool2x2"]
    assert not kernels.conv_pool_applies(xw.contiguous(memory_format=CL).bfloat16(), wide)  # bf16 outside autocast


# ---- the ops' registrations, the layer's paths, compile --------------------------------------------

def op_cases():
    """(op, args) for every custom op, with inputs that need gradients where the op takes them."""
    torch.manual_seed(0)
    x1, w1, b1 = torch.randn(2, 1, 6, 8), torch.randn(16, 1, 3, 3), torch.randn(16)
    x, w, b = torch.randn(2, 32, 6, 8).contiguous(memory_format=CL), torch.randn(32, 32, 3, 3) / 20, torch.randn(32)
    y1, xpad, code1 = torch.ops.nnlab.conv1_pool2x2(x1, w1, b1, False, True)
    y, code = torch.ops.nnlab.conv3x3_pool2x2(x, w, b, False, True)
    grad = (lambda *ts: [t.clone().requires_grad_() for t in ts])
    nnlab = torch.ops.nnlab
    return {
        "pool2x2": (nnlab.pool2x2, (*grad(hard_input(torch.float32).nan_to_num()), True)),
        "pool2x2_backward": (nnlab.pool2x2_backward, (torch.randn(y.shape), code)),
        "conv1_pool2x2": (nnlab.conv1_pool2x2, (x1, *grad(w1, b1), False, True)),
        "conv1_pool2x2 bf16": (nnlab.conv1_pool2x2, (x1, *grad(w1, b1), True, False)),
        "conv1_pool2x2_backward": (nnlab.conv1_pool2x2_backward, (torch.randn(y1.shape), xpad, code1, False)),
        "conv3x3_pool2x2": (nnlab.conv3x3_pool2x2, (*grad(x, w, b), False, True)),
        "conv3x3_pool2x2 bf16": (nnlab.conv3x3_pool2x2, (*grad(x.bfloat16(), w, b), True, True)),
        "conv3x3_pool2x2_wgrad": (nnlab.conv3x3_pool2x2_wgrad, (x, torch.randn(y.shape), code, False)),
        "conv3x3_winograd": (nnlab.conv3x3_winograd, (x, w)),  # used in backward only: no gradient of its own
    }


@needs_kernels
@pytest.mark.parametrize("case", ["pool2x2", "pool2x2_backward", "conv1_pool2x2", "conv1_pool2x2 bf16",
                                  "conv1_pool2x2_backward", "conv3x3_pool2x2", "conv3x3_pool2x2 bf16",
                                  "conv3x3_pool2x2_wgrad", "conv3x3_winograd"])
def test_custom_op_registration(case):
    """torch.library's checks of each op's schema, fake implementation (shapes and strides, as
    torch.compile relies on them) and autograd registration."""
    op, args = op_cases()[case]
    torch.library.opcheck(op, args)


@needs_kernels
@pytest.mark.parametrize("c_in,layout,input_grad,op_name", [
    (1, "contiguous", False, "conv1_pool2x2"),
    (1, "channels_last", True, "pool2x2"),  # an input gradient: conv by torch, then the pool op
    (32, "channels_last", True, "conv3x3_pool2x2"),
])
def test_conv_pool_relu_layer_paths_agree(c_in, layout, input_grad, op_name, no_kernels, monkeypatch):
    """The article's formula (conv, ReLU, pool), torch's functional path and the op: the same outputs
    and gradients on the same weights."""
    monkeypatch.setattr(build, "_used", set())
    torch.manual_seed(0)
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    layer = ConvPoolReLU(c_in, 32, 3, padding=1).to(memory_format=fmt)
    x = torch.randn(4, c_in, 10, 8).contiguous(memory_format=fmt).requires_grad_(input_grad)
    g = torch.randn(4, 32, 5, 4)

    def paths():
        return run(lambda x, c: c(x), x, layer, g, False)

    op = paths()
    assert (op_name in kernels.used()) == kernels.status()["ops"][op_name]
    layer.explicit = True
    explicit = paths()
    layer.explicit = False
    no_kernels()
    by_torch = paths()
    for name, path in (("explicit", explicit), ("functional", by_torch)):
        for a, b in zip(op, path):
            if a is not None or b is not None:
                assert_close(a, b, **F32, msg=lambda m: f"op vs {name}: {m}")


@needs_kernels
@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_seed_cnn_runs_the_ops_and_matches_eager(bf16, one_thread):
    """Under torch.compile each kernel is one node of the graphs AOTAutograd traces (forward and
    backward), with the same outputs and gradients as eager."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, _):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    torch.manual_seed(0)
    model = build_model("seed-cnn").to(memory_format=CL)
    x = torch.randn(4, 1, 28, 28).contiguous(memory_format=CL)

    def step(m):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = m(x)
        out.float().square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out, grads = step(model)
    torch._dynamo.reset()
    out_c, grads_c = step(torch.compile(model, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep),
                                        fullgraph=True))
    ops = kernels.status()["ops"]
    forward, backward = graphs
    if ops["conv1_pool2x2"]:
        assert "nnlab.conv1_pool2x2" in forward and "nnlab.conv3x3_pool2x2" in forward
        assert "nnlab.conv1_pool2x2_backward" in backward and "nnlab.conv3x3_pool2x2_wgrad" in backward
    else:
        assert "nnlab.pool2x2" in forward and "nnlab.pool2x2_backward" in backward
    assert_close(out_c, out, atol=0, rtol=0)
    for a, b in zip(grads_c, grads):
        assert_close(a, b, **F32)


@needs_kernels
@pytest.mark.skipif(not {"avx2", "fma", "bmi2", "movbe", "f16c"} <= cpu_flags(),
                    reason="this CPU cannot run x86-64-v3 code")
def test_a_build_for_avx2_only_cpus_computes_what_this_one_does(avx2_build):
    """CPUs without AVX-512 get other code: 8-lane vectors, and bf16 rounding by bit arithmetic
    instead of vcvtneps2bf16. Per lane the same multiply-adds in the same order, so the results agree
    bit for bit (these inputs give no denormal conv outputs, which only the instruction flushes to
    zero); conv1's weight gradient adds the lanes' partial sums in another order."""
    torch.manual_seed(0)
    conv1 = ConvPoolReLU(1, 32, 3, padding=1)
    x1, g1 = torch.randn(16, 1, 28, 28), torch.randn(16, 32, 14, 14)
    conv2 = ConvPoolReLU(32, 64, 3, padding=1).to(memory_format=CL)
    x2, g2 = torch.randn(4, 32, 10, 12).contiguous(memory_format=CL).requires_grad_(), torch.randn(4, 64, 5, 6)
    xp, gp = hard_input(torch.bfloat16, shape=(4, 32, 10, 12)).requires_grad_(), torch.randn(4, 32, 5, 6)

    def results():
        out = []
        for bf16 in (False, True):  # conv2 in fp32: Winograd; in bf16: ATen's convolution, then the pool kernel
            out += run(lambda x, c: kernels.conv_pool(x, c), x1, conv1, g1, bf16)
            out += run(lambda x, c: kernels.conv_pool(x, c), x2.bfloat16() if bf16 else x2, conv2, g2, bf16)
        xg = xp.detach().clone().requires_grad_()
        out += [kernels.pool(xg, True)]
        out[-1].backward(gp.bfloat16())
        return out + [xg.grad]

    native = results()
    avx2_build()
    assert kernels.status()["ops"]["conv3x3_pool2x2"]  # AVX2 vectors are the build's own: the conv ops run
    portable = results()
    for i, (a, b) in enumerate(zip(portable, native)):
        if a is None:
            assert b is None
        elif i in (2, 3, 10, 11):  # conv1's weight and bias gradients
            assert_close(a, b, **F32)
        else:
            assert_same(a, b)

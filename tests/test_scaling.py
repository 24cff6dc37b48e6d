"""Claims about the loop carry evidence: accumulation, bf16 and compile reproduce the plain fp32
loss curve of a deterministic tiny run; a NaN stops the run and keeps the last good checkpoint."""

import json
import os
import warnings

import pytest
import torch

import nnlab
from nnlab.errors import NnlabError
from nnlab.tasks import Task
from nnlab.runfolder import load_tensors


def gpt_args(text_file, *extra):
    return ["model.name=gpt", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
            "data.name=text", f"data.path={text_file}", "train.max_steps=8", "train.batch_size=8",
            "train.eval_iters=2", "train.log_every=1", "train.precision=fp32", "train.optimizer=adamw",
            "train.lr=0.003", *extra]


def losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "train"]


def train(tmp_path, name, args):
    return nnlab.train("gpt-shakespeare", args, out=str(tmp_path / name))


def test_grad_accumulation_equals_one_big_batch(tmp_path, text_file, one_thread):
    """k micro-batches of b give the same losses (and so the same gradients) as one batch of k*b."""
    one = train(tmp_path, "one", gpt_args(text_file, "train.grad_accum=1"))
    acc = train(tmp_path, "acc", gpt_args(text_file, "train.grad_accum=4"))
    assert losses(one) == pytest.approx(losses(acc), rel=1e-5, abs=1e-6)
    w1, _ = load_tensors(one / "model.safetensors")
    w4, _ = load_tensors(acc / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w4[k], w1[k], atol=1e-5, rtol=1e-4)
    # and a different batch really changes the curve (the comparison above can fail)
    other = train(tmp_path, "other", gpt_args(text_file, "train.seed=7"))
    assert losses(other) != pytest.approx(losses(one), rel=1e-3)


def test_bf16_autocast_matches_fp32_curve(tmp_path, text_file, one_thread):
    fp32 = losses(train(tmp_path, "fp32", gpt_args(text_file)))
    bf16 = losses(train(tmp_path, "bf16", gpt_args(text_file, "train.precision=bf16")))
    # bf16 keeps 8 bits of mantissa: per-step losses agree to about 1%, and both curves fall.
    assert bf16 == pytest.approx(fp32, rel=3e-2)
    assert bf16[-1] < bf16[0] and fp32[-1] < fp32[0]


def compiled_losses(tmp_path, text_file, *extra):
    """Train 4 steps eager, then compiled (torch.compile really used, no eager fallback): both curves."""
    import torch._dynamo as dynamo

    eager = losses(train(tmp_path, "eager", gpt_args(text_file, "train.max_steps=4", *extra)))
    dynamo.reset()
    dynamo.utils.counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = losses(train(tmp_path, "compiled", gpt_args(text_file, "train.max_steps=4", "train.compile=true",
                                                               *extra)))
    assert not [w for w in caught if "running eager" in str(w.message)]
    assert dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it really compiled
    return eager, compiled


def test_compiled_matches_eager(tmp_path, text_file, one_thread):
    eager, compiled = compiled_losses(tmp_path, text_file)
    # Inductor fuses and reorders float ops: equal to ~1e-5 relative, not bit for bit.
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_compiled_bf16_gpt_is_keyed_by_aotautograd_cache(one_thread):
    """A bf16 GPT compiles to a graph AOTAutograd's cache can store and find: nothing in it forces
    a bypass. (Choosing SDPA's math kernel with the `sdpa_kernel` context put an unkeyable call into
    the graph, and every warm compile then retraced the joint graph: 6-8 s against ~3.5 s.)"""
    import torch._dynamo as dynamo
    import torch.nn.functional as F

    from nnlab.models import build_model

    dynamo.reset()
    dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = build_model("gpt", n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=11)
    x = torch.randint(0, 11, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(torch.compile(model)(x).float().flatten(0, 1), x.flatten())
    loss.backward()
    aot = dynamo.utils.counters["aot_autograd"]
    assert aot["autograd_cache_bypass"] == 0, dict(aot)
    assert aot["autograd_cache_miss"] + aot["autograd_cache_hit"] == 1, dict(aot)  # the cache was asked
    dynamo.reset()


def test_max_autotune_times_gemm_kernels_and_matches_eager(tmp_path, text_file, one_thread, monkeypatch):
    """compile_mode reaches torch.compile: max-autotune benchmarks candidate GEMM kernels (on CPU
    inductor offers its C++ templates for bf16 matmuls), and the curve still matches eager bf16."""
    import torch._dynamo as dynamo

    from nnlab.train.precision import native_bf16

    if not native_bf16(torch.device("cpu"))[0]:
        pytest.skip("max-autotune's C++ GEMM templates are offered for bf16; this CPU emulates bf16")
    import torch._inductor.config as inductor_config

    # A graph found in inductor's on-disk cache is not autotuned again: compile afresh.
    monkeypatch.setattr(inductor_config, "force_disable_caches", True)
    # The GEMMs inductor templates here are attention's batched matmuls (not the Linear layers'),
    # which nnlab's attention kernel replaces: take SDPA's path so there is something to autotune.
    from nnlab import kernels

    monkeypatch.setattr(kernels, "attention_applies", lambda *a: False)
    eager, compiled = compiled_losses(tmp_path, text_file, "train.precision=bf16",
                                      "train.compile_mode=max-autotune-no-cudagraphs")
    assert dynamo.utils.counters["inductor"]["select_algorithm_autotune"] > 0
    assert compiled == pytest.approx(eager, rel=2e-2)  # bf16 rounding differs between fused and eager ops


def test_activation_checkpointing_gives_the_same_curve(tmp_path, text_file, one_thread):
    plain = losses(train(tmp_path, "plain", gpt_args(text_file, "train.max_steps=4")))
    ckpt_run = train(tmp_path, "ckpt", gpt_args(text_file, "train.max_steps=4", "train.activation_checkpointing=true"))
    assert losses(ckpt_run) == pytest.approx(plain, rel=1e-5)
    model, _ = nnlab.load(ckpt_run)  # the saved weights load into a plain model
    assert not any("checkpoint" in name for name, _ in model.named_modules())


def test_activation_checkpointing_recomputes_blocks_and_keeps_outputs_grads_and_keys():
    """parallelize wraps every block: backward runs each block's forward again (dropout replays the
    same masks), and losses, gradients and state-dict keys are the plain model's."""
    import copy

    import torch.nn.functional as F

    from nnlab.config import TrainConfig
    from nnlab.models import build_model
    from nnlab.train.distributed import Env, parallelize

    torch.manual_seed(0)
    plain = build_model("gpt", preset="tiny", n_layer=2, vocab_size=11, dropout=0.1).train()
    wrapped = copy.deepcopy(plain)
    fmodel = parallelize(wrapped, TrainConfig(activation_checkpointing=True), Env())
    x = torch.randint(0, 11, (3, 16))
    results = {}
    for name, model, module in (("plain", plain, plain), ("wrapped", wrapped, fmodel)):
        calls = []
        model.blocks[0].attn.register_forward_hook(lambda *a: calls.append(1))
        torch.manual_seed(1)
        loss = F.cross_entropy(module(x).flatten(0, 1), x.flatten())
        loss.backward()
        results[name] = loss.item(), [p.grad for p in model.parameters()], len(calls)
    assert results["plain"][2] == 1 and results["wrapped"][2] == 2  # forward, then again in backward
    assert results["wrapped"][0] == pytest.approx(results["plain"][0], rel=1e-6)
    for g_wrapped, g_plain in zip(results["wrapped"][1], results["plain"][1], strict=True):
        torch.testing.assert_close(g_wrapped, g_plain)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    fresh = build_model("gpt", preset="tiny", n_layer=2, vocab_size=11, dropout=0.1)
    fresh.load_state_dict(wrapped.state_dict())  # strict: the same keys, the same shapes


def _nan_at(step_to_poison: int, monkeypatch):
    """Make the loss NaN on exactly one training step (counted in calls of Task.loss)."""
    real, calls = Task.loss, {"n": 0}

    def loss(self, out, y):
        value = real(self, out, y)
        calls["n"] += 1
        return value * float("nan") if calls["n"] == step_to_poison + 1 else value

    monkeypatch.setattr(Task, "loss", loss)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, text_file, monkeypatch, one_thread):
    _nan_at(5, monkeypatch)
    with pytest.raises(NnlabError, match="at step 5; stopped; last good checkpoint kept") as e:
        train(tmp_path, "nan", gpt_args(text_file, "train.checkpoint_every=2"))
    assert "\n" not in str(e.value)
    tensors, meta = load_tensors(tmp_path / "nan" / "checkpoints" / "last.safetensors")
    assert meta["step"] == 4 and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert not (tmp_path / "nan" / "model.safetensors").exists()  # no half-trained model is published


def test_max_bad_steps_skips_a_bad_batch(tmp_path, text_file, monkeypatch, one_thread):
    _nan_at(3, monkeypatch)
    run = train(tmp_path, "skip", gpt_args(text_file, "train.max_bad_steps=1"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["bad_steps"] == 1 and summary["steps"] == 8
    w, _ = load_tensors(run / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in w.values())


def test_a_cpu_capability_override_gets_its_own_inductor_cache(monkeypatch):
    """Code compiled under ATEN_CPU_CAPABILITY=avx2 must not be found by a run without it (nor the
    other way round): compile.separate_inductor_cache says why. Nothing is compiled here: the
    folder is chosen before torch.compile and read by inductor at its first cache access."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    from nnlab.config import TrainConfig
    from nnlab.models import build_model
    from nnlab.train.compile import separate_inductor_cache
    from nnlab.train.distributed import Env, parallelize

    for name in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY"):  # setenv first: restored after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert separate_inductor_cache() is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ

    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    parallelize(build_model("gpt", preset="tiny"), TrainConfig(compile=True), Env())
    assert cache_dir() == default_cache_dir() + "_avx2"

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/chosen-by-the-user")  # a user's choice is kept
    assert separate_inductor_cache() is None and os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/tmp/chosen-by-the-user"


def test_compile_options_keep_the_mode_and_add_a_cpp_wrapper_on_cpu():
    from nnlab.train.compile import compile_options

    assert compile_options("default", torch.device("cpu")) == {"cpp_wrapper": True}
    auto = compile_options("max-autotune-no-cudagraphs", torch.device("cpu"))
    assert auto["max_autotune"] is True and auto["cpp_wrapper"] is True
    assert "cpp_wrapper" not in compile_options("max-autotune", torch.device("cuda"))

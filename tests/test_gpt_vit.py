"""GPT and ViT: fast vs explicit paths, weight tying, the context limit, KV-cached generation, overfitting.

Float32 tolerance between the explicit and SDPA paths: atol=rtol=1e-5 (different summation order
in matmul/softmax kernels over a few layers of O(1) activations).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnlab.generate import generate
from nnlab.models import build_model, get_spec, set_explicit
from nnlab.models.gpt import PRESETS as GPT_PRESETS
from nnlab.models.vit import PRESETS as VIT_PRESETS

F32 = dict(atol=1e-5, rtol=1e-5)
VOCAB = 11


def tiny_gpt(seed: int = 0, **over):
    torch.manual_seed(seed)
    return build_model("gpt", **{**GPT_PRESETS["tiny"], "vocab_size": VOCAB, **over}).eval()


def tiny_vit(seed: int = 0, **over):
    torch.manual_seed(seed)
    return build_model("vit", **{**VIT_PRESETS["tiny"], **over}).eval()


def test_registered_with_tasks():
    assert get_spec("gpt").task == "text" and get_spec("vit").task == "image"


def test_gpt_explicit_matches_fast_path():
    m = tiny_gpt(n_layer=2)
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        fast = m(idx)
        set_explicit(m, True)
        explicit = m(idx)
    assert fast.shape == (2, 16, VOCAB)
    torch.testing.assert_close(explicit, fast, **F32)


def test_gpt_surface_shapes():
    m = tiny_gpt()
    idx = torch.randint(0, VOCAB, (3, 9))
    with torch.no_grad():
        h = m.forward_features(idx)
        assert h.shape == (3, 9, 16)
        torch.testing.assert_close(m.forward_head(h), m(idx), atol=0, rtol=0)
        maps = m.attention_maps(idx)
    assert [A.shape for A in maps] == [(3, 2, 9, 9)]
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(3, 2, 9), **F32)  # rows are distributions
    assert (maps[0].triu(1) == 0).all()  # causal


def test_tied_embeddings_share_storage():
    m = tiny_gpt()
    assert m.lm_head.weight is m.tok_emb.weight
    assert m.lm_head.weight.data_ptr() == m.tok_emb.weight.data_ptr()
    with torch.no_grad():
        m.tok_emb.weight[0, 0] = 123.0
    assert m.lm_head.weight[0, 0].item() == 123.0
    # The state dict names the matrix twice (as nanoGPT's does), but the optimizer sees it once.
    sd = m.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["tok_emb.weight"].data_ptr()
    assert len(list(m.parameters())) == len(sd) - 1


def test_too_long_input_is_a_value_error():
    m = tiny_gpt()
    with pytest.raises(ValueError, match="block_size=16"):
        m(torch.zeros(1, 17, dtype=torch.long))
    _, past = m.forward_with_cache(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="cached 16"):
        m.forward_with_cache(torch.zeros(1, 1, dtype=torch.long), past)


def test_forward_with_cache_matches_forward():
    m = tiny_gpt(n_layer=2)
    idx = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full = m(idx)
        a, past = m.forward_with_cache(idx[:, :7])
        b, past = m.forward_with_cache(idx[:, 7:8], past)
        c, past = m.forward_with_cache(idx[:, 8:], past)
    torch.testing.assert_close(torch.cat([a, b, c], dim=1), full, **F32)
    assert len(past) == 2 and past[0][0].shape == (2, 2, 12, 8)


@pytest.mark.parametrize("bias", [True, False])
def test_decode_step_matches_forward_position_by_position(bias):
    """The one-token fast path computes forward()'s logits at every position, and fills the cache
    with the K, V that forward_with_cache computes."""
    m = tiny_gpt(n_layer=2, bias=bias)
    idx = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full = m(idx)
        _, past = m.forward_with_cache(idx[:, :5])
        cache = m.decode_cache_from(past, max_len=12)
        steps = [m.decode_step(idx[:, t], cache) for t in range(5, 12)]
        _, ref_past = m.forward_with_cache(idx)
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 5:], **F32)
    assert cache.length == 12
    for i, (k, v) in enumerate(ref_past):
        torch.testing.assert_close(cache.k[i], k, **F32)
        torch.testing.assert_close(cache.v[i], v, **F32)
    with pytest.raises(ValueError, match="cache is full"):
        m.decode_step(idx[:, 0], cache)


@pytest.mark.parametrize("explicit", [False, True])
def test_kv_cache_generation_equals_recompute_greedy(explicit):
    m = set_explicit(tiny_gpt(seed=1), explicit)
    prompt = torch.randint(0, VOCAB, (3, 4))
    # 4 + 30 = 34 tokens: runs well past block_size=16, so the fallback path is exercised too.
    cached = generate(m, prompt, 30, temperature=0.0, use_cache=True)
    recomputed = generate(m, prompt, 30, temperature=0.0, use_cache=False)
    assert cached.shape == (3, 34)
    assert torch.equal(cached[:, :4], prompt)
    assert torch.equal(cached, recomputed)


def shifted_context_reference(m, prompt, n: int, shift: int, seed: int):
    """Sampled tokens (temperature 1) under the context_shift policy, by recomputing: once the
    context would pass block_size tokens, it restarts from its newest block_size - shift tokens."""
    block, idx, start = m.cfg.block_size, prompt, max(0, prompt.shape[1] - m.cfg.block_size)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(n):
            if idx.shape[1] - start > block:
                start = idx.shape[1] - (block - shift)
            probs = torch.softmax(m(idx[:, start:])[:, -1].float(), dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=g)], dim=1)
    return idx


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("shift,prompt_len", [(1, 4), (5, 4), (15, 4), (4, 20)])
def test_context_shift_decodes_what_its_shorter_contexts_recompute(explicit, shift, prompt_len):
    m = set_explicit(tiny_gpt(seed=1), explicit)  # block_size 16: 40 new tokens cross it several times
    prompt = torch.randint(0, VOCAB, (2, prompt_len))
    def sample(**kw):
        return generate(m, prompt, 40, temperature=1.0, generator=torch.Generator().manual_seed(5), **kw)

    got = sample(context_shift=shift)
    assert torch.equal(got, shifted_context_reference(m, prompt, 40, shift, seed=5))
    assert not torch.equal(got, sample())  # shorter contexts: other probabilities, other tokens
    for bad in (-1, 16, 2.0, True):
        with pytest.raises(ValueError, match="context_shift"):
            generate(m, prompt, 3, context_shift=bad)
    with pytest.raises(ValueError, match="needs the cache"):
        generate(m, prompt, 3, context_shift=2, use_cache=False)


def test_sampling_is_reproducible_with_a_seeded_generator():
    m = tiny_gpt(seed=2)
    prompt = torch.randint(0, VOCAB, (2, 3))
    runs = [generate(m, prompt, 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    runs_nc = [generate(m, prompt, 20, generator=torch.Generator().manual_seed(7), use_cache=False)
               for _ in range(2)]
    assert torch.equal(runs_nc[0], runs_nc[1])


def test_top_k_1_equals_greedy():
    m = tiny_gpt(seed=3)
    prompt = torch.randint(0, VOCAB, (2, 3))
    greedy = generate(m, prompt, 20, temperature=0.0)
    top1 = generate(m, prompt, 20, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1, greedy)


def test_generate_restores_mode_and_validates():
    m = tiny_gpt().train()
    prompt = torch.zeros(1, 2, dtype=torch.long)
    assert generate(m, prompt, 0).shape == (1, 2)
    assert m.training  # restored after generation ran in eval mode
    for bad in (dict(max_new_tokens=-1), dict(temperature=-0.5), dict(top_k=0)):
        with pytest.raises(ValueError):
            generate(m, prompt, **{"max_new_tokens": 3, **bad})


def test_vit_shapes_and_paths():
    m = tiny_vit()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        logits = m(x)
        assert logits.shape == (3, 10)
        assert m.forward_features(x).shape == (3, 16)
        maps = m.attention_maps(x)
        set_explicit(m, True)
        torch.testing.assert_close(m(x), logits, **F32)
    T = (28 // 7) ** 2 + 1  # 16 patches + CLS
    assert [A.shape for A in maps] == [(3, 2, T, T)]
    assert (maps[0].triu(1) > 0).any()  # non-causal: tokens attend to later tokens too


def test_vit_rejects_bad_patch_size():
    with pytest.raises(ValueError, match="divisible"):
        build_model("vit", image_size=28, patch_size=5)


def test_tiny_gpt_overfits_a_repeated_string():
    text = "hello world! " * 8
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    torch.manual_seed(0)
    m = build_model("gpt", **{**GPT_PRESETS["tiny"], "vocab_size": len(chars)}).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    bs = m.cfg.block_size
    starts = torch.arange(0, len(data) - bs - 1, 3)
    x = torch.stack([data[s:s + bs] for s in starts])  # (N, T)
    y = torch.stack([data[s + 1:s + bs + 1] for s in starts])  # (N, T): the next characters
    losses = []
    for _ in range(100):
        loss = F.cross_entropy(m(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]  # ln(9) = 2.2 -> about 0.04 (seeds 0-3)

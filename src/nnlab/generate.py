"""Autoregressive sampling from a language model: append one token at a time, feeding each back in.

At each step the model gives logits z over the vocabulary for the next token; we sample from
    p = softmax(z / temperature)              temperature < 1 sharpens p, > 1 flattens it,
                                              temperature == 0 is greedy decoding (argmax)
optionally after keeping only the top_k largest logits (the rest get probability 0).

Two ways to compute z, which give the same tokens (tests/test_gpt_vit.py checks it under greedy):
  use_cache=False: rerun the model on the whole context, cropped to its last block_size tokens,
      for every new token (nanoGPT's sample.py): O(T^2) work per token.
  use_cache=True: one prefill pass over the prompt stores every layer's K and V; each later step
      feeds only the newest token and attends to the cache: O(T) work per token. A model with
      a `decode_step` (GPT) then runs its one-token fast path over a preallocated cache.
The cache stops being usable once the sequence outgrows block_size. The model's positions are
learned embeddings of absolute indices 0..block_size-1; cropping the context shifts every kept
token to a new position, and their cached K and V were computed with the old position embedding
mixed in (through every layer), so they cannot be reused by sliding the window. Past that point
there are two policies, chosen by `context_shift`:
  context_shift=0 (exact, the default): each step recomputes the cropped context exactly as
      use_cache=False does, so the tokens are nanoGPT's; each costs a block_size-token forward.
  context_shift=s > 0: when the cache is full, drop the oldest s tokens of the context, prefill
      the remaining block_size - s once at positions 0.., and decode the next s tokens from the
      cache. Each token then costs one cached step plus 1/s of a prefill, but sees between
      block_size - s and block_size tokens of context instead of always block_size: a different,
      slightly shorter-sighted sampler (benchmarks/b4_generate.py measures both what it saves
      and what it costs in loss).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn


def _next_token(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """Pick one token per row from logits (B, vocab) -> (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # greedy; top_k cannot change the argmax
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def generate(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    context_shift: int = 0,
) -> Tensor:
    """Continue each prompt row of idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).

    `model` is a language model with `cfg.block_size`, forward(idx) -> logits (B, T, vocab) and,
    for use_cache=True, forward_with_cache (nnlab.models.gpt.GPT). It runs in eval mode (no
    dropout) under torch.inference_mode; the model's previous train/eval mode is restored.
    The same `generator` seed gives the same tokens (on the same device and torch version).
    """
    tokens = generate_stream(model, idx, max_new_tokens, temperature, top_k, generator, use_cache, context_shift)
    was_training = model.training
    model.eval()  # dropout off: generation is inference
    try:
        return torch.cat([idx, *tokens], dim=1)
    finally:
        model.train(was_training)


def generate_stream(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    context_shift: int = 0,
) -> Iterator[Tensor]:
    """generate()'s tokens one step at a time: an iterator of max_new_tokens (B, 1) tensors.

    The arguments are checked now, not at the first step. The caller puts the model in eval mode.
    Each step runs under its own torch.inference_mode, so a paused stream leaves the caller's
    autograd state alone, and the steps may run on different threads (a server's thread pool);
    closing the iterator early frees the cache.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if idx.ndim != 2 or idx.shape[1] == 0 or idx.dtype != torch.long:
        raise ValueError(f"idx must be a non-empty LongTensor of shape (B, T), got {idx.dtype} {tuple(idx.shape)}")
    if use_cache and not hasattr(model, "forward_with_cache"):
        raise ValueError(f"{type(model).__name__} has no forward_with_cache; call generate with use_cache=False")
    block_size = model.cfg.block_size
    if isinstance(context_shift, bool) or not isinstance(context_shift, int) or not 0 <= context_shift < block_size:
        raise ValueError(f"context_shift must be an integer in [0, block_size={block_size}), got {context_shift!r}")
    if context_shift and not use_cache:
        raise ValueError("context_shift needs the cache (use_cache=True)")
    return _steps(model, idx, max_new_tokens, temperature, top_k, generator, use_cache, context_shift)


def _steps(model, idx, max_new_tokens, temperature, top_k, generator, use_cache, context_shift) -> Iterator[Tensor]:
    block_size = model.cfg.block_size
    # The model's one-token fast path, unless it was asked for the article's explicit formulas.
    fast = use_cache and hasattr(model, "decode_step") and not any(getattr(m, "explicit", False) for m in model.modules())
    past = cache = None  # K, V of the context's tokens, as a list (past) or preallocated (cache)
    cached = 0  # how many of the context's tokens they hold; the newest token is not among them
    for step in range(max_new_tokens):
        with torch.inference_mode():
            T = idx.shape[1]
            if use_cache and 0 < cached < block_size:  # room for the newest token: feed only it
                if cache is not None:
                    logits = model.decode_step(idx[:, -1], cache)  # (B, vocab)
                else:
                    logits, past = model.forward_with_cache(idx[:, -1:], past)
                    logits = logits[:, -1, :]
                cached += 1
            elif use_cache and (cached == 0 or context_shift):
                # Prefill the context once (the prompt, or after a shift its newest tokens).
                cached = min(T, block_size) if cached == 0 else block_size - context_shift
                logits, past = model.forward_with_cache(idx[:, -cached:])
                logits = logits[:, -1, :]
                if fast:  # from here on, one token at a time into a preallocated cache
                    cache = model.decode_cache_from(past, min(block_size, cached + max_new_tokens - step))
            else:
                # No cache, or a full context under the exact policy (see the module docstring).
                past = cache = None
                logits = model(idx[:, -block_size:])[:, -1, :]  # (B, vocab)
            nxt = _next_token(logits, temperature, top_k, generator)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)  # (B, T + 1)
        yield nxt


def generate_text(run_dir, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 200, seed: int = 1337, context_shift: int = 0) -> str:
    """Load a trained language model from its run folder and continue `prompt`; returns prompt + sample."""
    from nnlab.data import tokenizer_from_json
    from nnlab.errors import NnlabError
    from nnlab.runfolder import load

    model, info = load(run_dir)
    if info.get("task") != "text":
        raise NnlabError(f"{run_dir}: holds a model for {info.get('task')} data, not a language model")
    if not 0 <= max_new_tokens <= 100_000:
        raise NnlabError(f"--max-new-tokens: must be between 0 and 100000, got {max_new_tokens}")
    if not prompt:
        raise NnlabError("--prompt: must not be empty")
    if top_k is not None and top_k < 1:
        raise NnlabError(f"--top-k: must be at least 1, got {top_k}")
    if not temperature >= 0:  # also rejects NaN
        raise NnlabError(f"--temperature: must be >= 0 (0 = greedy), got {temperature}")
    tok = tokenizer_from_json(info["tokenizer"])
    idx = torch.tensor([tok.encode(prompt)], dtype=torch.long)
    try:
        out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                       generator=torch.Generator().manual_seed(seed), context_shift=context_shift)
    except ValueError as e:
        raise NnlabError(f"generate: {e}") from None
    return tok.decode(out[0].tolist())

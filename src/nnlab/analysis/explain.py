"""Explanations: which parts of an input a trained model's prediction rests on, and a check that the
answer depends on what the model learned.

`explain(run_dir, method, samples)` (`nnlab explain RUN_DIR`) explains the prediction for the first
`samples` test samples (a language model: that many consecutive validation blocks, each predicting
the token after it) and writes explain/METHOD.png (images, tables) or explain/METHOD.html (text; with
a PNG of the attention matrices for attention and rollout), then explain/METHOD.json. The target is
the predicted class (the predicted next token; a regression model's output). Methods, with F_c the
target's score (logit) and x the model's input:

  saliency              |dF_c/dx| (Simonyan et al., 2014): how fast the score moves with each input
                        value; the largest over an image's channels; for text the gradient's norm at
                        each token's embedding.
  integrated-gradients  (x - x') * int_0^1 dF_c/dx(x' + a(x - x')) da (Sundararajan et al., 2017),
                        summed over an image's channels (over a token's embedding for text). It sums to
                        F_c(x) - F_c(x') (completeness); Captum's convergence delta is by how much the
                        numeric integral misses that. Baseline x' = 0: the training set's mean pixel or
                        feature row after normalisation; token id 0 at every position for text. A black
                        image instead would give every black pixel zero attribution in any model, so
                        the explanation would follow the image, not the weights (and fail the sanity
                        check below on Fashion-MNIST, where about half the pixels are black).
  grad-cam              ReLU(sum_k mean_ij(dF_c/dA^k_ij) A^k) (Selvaraju et al., 2017): the feature maps
                        A^k of the last convolution block weighted by their mean gradient, upsampled
                        bilinearly to the input. CNNs only.
  attention             A = softmax(QK^T/sqrt(d_k)) of every layer and head, read from the explicit
                        attention path (SDPA and nnlab's kernel never form A). Transformers only.
  rollout               R = Â_L ... Â_1 with Â_l = rownorm(mean_heads(A_l) + I) (Abnar & Zuidema,
                        2020): the identity stands for the residual connection; row i says how much
                        token i's last representation draws on each input token. Transformers only.

Sanity check (model randomization, Adebayo et al., 2018) for the gradient methods: the same method on
the same architecture with freshly initialised weights (seed SANITY_SEED). The score is the Spearman
rank correlation of |attribution| between the two, per sample, averaged over the samples where it is
defined (a constant map, e.g. an all-zero Grad-CAM, ranks nothing). An explanation that survives
losing the weights explains the input, not the model: passed = score < SANITY_THRESHOLD.

Kernels: the gradient methods feed contiguous fp32 inputs that require a gradient. nnlab's conv kernels
decline them (conv1_pool2x2 computes no input gradient; pool2x2 and conv3x3_pool2x2 take channels-last
tensors only), so a CNN's attributions come from torch's functional path, bit for bit the same with
NNLAB_NO_KERNELS=1. The attention kernel has its own backward and takes part in a Transformer's
saliency and integrated gradients (equal to the reference up to float rounding).
Hooks: only Grad-CAM and the text methods hook a layer, with Captum's forward hooks, which hand the
next layer a clone of the output, so an in-place op after the hooked layer (cnn's ReLU(inplace=True))
cannot alter what was saved. No method here needs backward module hooks or nn.ReLU modules (guided
backpropagation would: seed-cnn and mlp apply ReLU as a function).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from nnlab.errors import NnlabError

METHODS = ("saliency", "integrated-gradients", "grad-cam", "attention", "rollout")
DEFAULT_SAMPLES = 8
MAX_SAMPLES = 64  # one figure; more would not be readable
IG_STEPS = 64  # Gauss-Legendre points; each sample's convergence delta says whether they were enough
IG_BATCH = 256  # rows per forward pass: IG evaluates every input at IG_STEPS points
SANITY_THRESHOLD = 0.5
SANITY_SEED = 0


def methods_for(model: nn.Module) -> tuple[str, ...]:
    """The methods that fit `model`, its default first: attention for Transformers (they have
    attention_maps), integrated gradients for CNNs and dense networks."""
    if hasattr(model, "attention_maps"):
        return ("attention", "rollout", "saliency", "integrated-gradients")
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return ("integrated-gradients", "saliency", "grad-cam")
    return ("integrated-gradients", "saliency")


@dataclass
class Samples:
    """What is explained: inputs x, their indices in the split, true labels; kind image|tabular|text."""

    x: Tensor  # images (B, C, H, W), table rows (B, F) or token ids (B, T)
    indices: list[int]
    true: list
    kind: str
    tokens: list[list[str]] | None = None  # text: each block's tokens, decoded one by one


def first_samples(run_dir: Path, n: int, info: dict) -> Samples:
    """The first n test samples of a run's split (text: n consecutive validation blocks), labelled
    with the class names of model.json (`info`) where it has them."""
    from nnlab.runfolder import read_config
    from nnlab.tasks import make_task

    task = make_task(read_config(run_dir))
    if task.kind == "text":
        ids, T, tok = task.data.val, task.block_size, task.data.tokenizer
        available = (len(ids) - 1) // T
        if n > available:
            raise NnlabError(f"--samples: {n} blocks of {T} tokens do not fit the validation split "
                             f"({len(ids)} tokens, {available} blocks)")
        x = ids[: n * T].view(n, T)  # block i predicts token (i + 1) * T
        return Samples(x, [i * T for i in range(n)], [tok.decode([int(ids[(i + 1) * T])]) for i in range(n)],
                       "text", [[tok.decode([int(t)]) for t in row] for row in x])
    x, y = task.x_test, task.data.y_test
    if n > len(x):
        raise NnlabError(f"--samples: {n} is more than the {len(x)} test samples")
    kind = "image" if x.dim() == 4 else "tabular"
    return Samples(x[:n].contiguous(), list(range(n)), [_label(v, info) for v in y[:n].tolist()], kind)


def _label(value, info: dict):
    """A class name where the run has class names, else the class index or the regression target."""
    classes = info.get("classes")
    return classes[int(value)] if classes else value if isinstance(value, int) else round(float(value), 4)


def score_fn(model: nn.Module, kind: str):
    """The scores (B, K) a prediction is made from: the logits, a language model's at its last position."""
    return (lambda idx: model(idx)[:, -1, :]) if kind == "text" else model


def predict(model: nn.Module, samples: Samples, info: dict) -> tuple[Tensor, list, str]:
    """(target output index per sample, predicted labels, what the target is): the argmax class, or
    output 0 of a regression model with its prediction in the target's units."""
    with torch.no_grad():
        scores = score_fn(model, samples.kind)(samples.x).float()  # (B, K)
    if scores.shape[1] == 1:
        values = scores[:, 0] * info.get("y_std", 1.0) + info.get("y_mean", 0.0)
        return torch.zeros(len(scores), dtype=torch.long), [round(v, 4) for v in values.tolist()], "the output"
    target = scores.argmax(1)
    if samples.kind == "text":
        from nnlab.data import tokenizer_from_json

        tok = tokenizer_from_json(info["tokenizer"])
        return target, [tok.decode([t]) for t in target.tolist()], "the predicted next token"
    return target, [_label(t, info) for t in target.tolist()], "the predicted class"


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The last convolution block: the last Conv2d, or the nn.Sequential it opens (conv, norm, ReLU)."""
    parents = {id(c): m for m in model.modules() for c in m.children()}
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    parent = parents.get(id(conv))
    return parent if isinstance(parent, nn.Sequential) and next(iter(parent.children())) is conv else conv


def token_embedding(model: nn.Module) -> nn.Embedding:
    """A language model's token embedding: its first nn.Embedding (positions come after it)."""
    return next(m for m in model.modules() if isinstance(m, nn.Embedding))


def attribute(model: nn.Module, x: Tensor, method: str, target: Tensor, kind: str) -> tuple[Tensor, Tensor | None]:
    """(maps, convergence deltas or None) of a gradient method for the scores `target` selects.

    maps: (B, H, W) for images, (B, F) for table rows, (B, T) for token ids. Deltas: integrated
    gradients only, sum(maps[i]) - (F(x_i) - F(x'_i)) per sample."""
    from captum.attr import (IntegratedGradients, LayerAttribution, LayerGradCam, LayerGradientXActivation,
                             LayerIntegratedGradients, Saliency)

    fn, deltas = score_fn(model, kind), None
    ig_args = {"target": target, "n_steps": IG_STEPS, "internal_batch_size": IG_BATCH,
               "return_convergence_delta": True}
    if kind == "text":  # gradients at the token embeddings: token ids have none
        layer = token_embedding(model)
        if method == "saliency":
            grads = LayerGradientXActivation(fn, layer, multiply_by_inputs=False).attribute(x, target=target)
            return grads.norm(dim=-1).detach(), None  # (B, T)
        attrs, deltas = LayerIntegratedGradients(fn, layer).attribute(x, baselines=torch.zeros_like(x), **ig_args)
        return attrs.sum(-1).detach(), deltas.detach()  # (B, T)
    # Inputs and baseline both need a gradient: nnlab's conv kernels then decline every forward pass
    # Captum makes, the convergence delta's F(x) and F(x') included, so all of it runs one path.
    x = x.detach().clone().requires_grad_()
    baseline = torch.zeros_like(x).requires_grad_()
    if method == "saliency":
        attrs = Saliency(fn).attribute(x, target=target, abs=True)
        reduce = "max"
    elif method == "integrated-gradients":
        attrs, deltas = IntegratedGradients(fn).attribute(x, baselines=baseline, **ig_args)
        deltas, reduce = deltas.detach(), "sum"
    elif method == "grad-cam":
        cam = LayerGradCam(fn, gradcam_layer(model)).attribute(x, target=target, relu_attributions=True)
        attrs = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
        reduce = "sum"
    else:
        raise ValueError(f"attribute: {method!r} is not a gradient method")
    attrs = attrs.detach()
    if kind == "image":  # (B, C, H, W) -> (B, H, W)
        attrs = attrs.amax(1) if reduce == "max" else attrs.sum(1)
    return attrs, deltas


def attention_maps(model: nn.Module, x: Tensor) -> list[Tensor]:
    """A of every layer, each (B, n_head, T, T), from the model's explicit attention path."""
    with torch.no_grad():
        return [A.float() for A in model.attention_maps(x)]


def rollout(maps: list[Tensor]) -> Tensor:
    """Attention rollout (B, T, T): Â_L ... Â_1, Â_l = rownorm(mean over heads of A_l + I)."""
    eye = torch.eye(maps[0].shape[-1])
    R = eye.expand_as(maps[0][:, 0])
    for A in maps:
        A_hat = A.mean(1) + eye  # the identity: the residual stream carries each token on
        A_hat = A_hat / A_hat.sum(-1, keepdim=True)
        R = A_hat @ R  # the later layer reads the earlier layers' mixture
    return R


def reinitialised(info: dict) -> nn.Module:
    """The run's architecture with fresh weights (seed SANITY_SEED), built from model.json as load() does."""
    from nnlab.config import parse_model
    from nnlab.models import build_model

    with torch.random.fork_rng():
        torch.manual_seed(SANITY_SEED)
        return build_model(parse_model(info["model"])).eval()


def rank_correlation(a: Tensor, b: Tensor) -> list[float | None]:
    """Spearman correlation of |a[i]| and |b[i]| per sample; None where a map is constant."""
    from scipy.stats import spearmanr

    out = []
    for u, v in zip(a.abs().flatten(1).numpy(), b.abs().flatten(1).numpy()):
        constant = np.ptp(u) == 0 or np.ptp(v) == 0
        out.append(None if constant else float(spearmanr(u, v).statistic))
    return out


def sanity_check(maps: Tensor, fresh_maps: Tensor) -> dict:
    """The model-randomization test on a trained model's maps and its re-initialised twin's."""
    per_sample = rank_correlation(maps, fresh_maps)
    defined = [r for r in per_sample if r is not None]
    score = float(np.mean(defined)) if defined else None
    return {"test": "model randomization", "score": score, "threshold": SANITY_THRESHOLD,
            "passed": score is not None and score < SANITY_THRESHOLD, "per_sample": per_sample,
            "seed": SANITY_SEED}


# ---- the verb ---------------------------------------------------------------------------------------

def explain(run_dir, method: str | None = None, samples: int = DEFAULT_SAMPLES) -> dict:
    """Explain a trained model's predictions for the first `samples` test samples with `method`
    (default: the model's first in methods_for), write explain/METHOD.* into the run folder and return
    what explain/METHOD.json holds (wall_s: the seconds spent predicting, attributing and drawing,
    after the model and data have loaded). Bad input (no run folder, no model.json, a method that does not
    fit the model, samples out of 1..MAX_SAMPLES) is an NnlabError raised before anything is written."""
    from nnlab import runfolder

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NnlabError(f"{run_dir}: no such run folder")
    if method is not None and method not in METHODS:
        raise NnlabError(f"--method: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES:
        raise NnlabError(f"--samples: must be between 1 and {MAX_SAMPLES}, got {samples}")
    model, info = runfolder.load(run_dir)
    fits = methods_for(model)
    method = method or fits[0]
    if method not in fits:
        raise NnlabError(f"--method {method}: does not fit model {info['model']['name']}; "
                         f"it takes {', '.join(fits)}")
    out_dir = run_dir / runfolder.EXPLAIN_DIR
    blocker = runfolder.file_in_the_way(out_dir)
    if blocker is not None:
        raise NnlabError(f"{out_dir}: {blocker} is a file, not a folder")
    data = first_samples(run_dir, samples, info)

    start = time.perf_counter()
    target, predicted, target_is = predict(model, data, info)
    result = {"method": method, "model": info["model"]["name"], "samples": samples, "indices": data.indices,
              "predicted": predicted, "true": data.true, "target": target_is}
    if method in ("attention", "rollout"):
        maps = attention_maps(model, data.x)
        result.update(layers=len(maps), heads=maps[0].shape[1],
                      max_row_sum_error=max(float((A.sum(-1) - 1).abs().max()) for A in maps))
        files = _draw_attention(method, maps, data, predicted, info)
    else:
        maps, deltas = attribute(model, data.x, method, target, data.kind)
        fresh_maps, _ = attribute(reinitialised(info), data.x, method, target, data.kind)
        if deltas is not None:  # delta = sum(maps) - (F(x) - F(x')): the change, to judge it by
            result["convergence_delta"] = deltas.tolist()
            result["ig"] = {"n_steps": IG_STEPS, "baseline": "zero input" if data.kind != "text" else "token id 0",
                            "score_change": (maps.flatten(1).sum(1) - deltas).tolist()}
        result["sanity"] = sanity_check(maps, fresh_maps)
        files = _draw_attribution(method, maps, data, predicted, info)
    result["wall_s"] = round(time.perf_counter() - start, 3)

    out_dir.mkdir(exist_ok=True)
    for name, content in files.items():
        (runfolder.atomic_write_text if isinstance(content, str) else runfolder.atomic_write_bytes)(
            run_dir / name, content)
    result["files"] = sorted(files)
    result["written"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    runfolder.write_json(out_dir / f"{method}.json", result)  # last: its presence means the files are whole
    return result


def _images(x: Tensor, info: dict) -> np.ndarray:
    """Model inputs (B, C, H, W) back to pixels in [0, 1]: (B, H, W), or (B, H, W, 3) for colour."""
    norm = info.get("normalize", {"mean": 0.0, "std": 1.0})
    img = (x.float() * norm["std"] + norm["mean"]).clamp(0, 1)
    return (img[:, 0] if img.shape[1] != 3 else img.permute(0, 2, 3, 1)).numpy()


TITLES = {"saliency": "saliency |dF/dx|", "integrated-gradients": "integrated gradients (red +, blue -)",
          "grad-cam": "Grad-CAM, last convolution block", "attention": "attention of the last layer, heads averaged",
          "rollout": "attention rollout across layers"}


def _draw_attribution(method: str, maps: Tensor, data: Samples, predicted: list, info: dict) -> dict:
    from nnlab.analysis import explain_figures as fig
    from nnlab.runfolder import EXPLAIN_DIR

    signed, title = method == "integrated-gradients", f"{info['model']['name']}: {TITLES[method]}"
    if data.kind == "image":
        return {f"{EXPLAIN_DIR}/{method}.png": fig.image_grid(_images(data.x, info), maps.numpy(), predicted,
                                                              data.true, title)}
    if data.kind == "tabular":
        features = info.get("features") or [f"x{i}" for i in range(maps.shape[1])]
        return {f"{EXPLAIN_DIR}/{method}.png": fig.bar_grid(maps.numpy(), features, predicted, data.true, title)}
    note = ("Each token's share of the predicted next token's logit (integrated gradients at the token "
            "embeddings): red raised it, blue lowered it." if signed else
            "Each token's gradient norm at its embedding for the predicted next token's logit.")
    return {f"{EXPLAIN_DIR}/{method}.html": fig.text_heatmap(data.tokens, maps.numpy(), predicted, data.true, title,
                                                             note)}


def _draw_attention(method: str, maps: list[Tensor], data: Samples, predicted: list, info: dict) -> dict:
    from nnlab.analysis import explain_figures as fig
    from nnlab.runfolder import EXPLAIN_DIR

    R = rollout(maps) if method == "rollout" else maps[-1].mean(1)  # (B, T, T)
    title = f"{info['model']['name']}: {TITLES[method]}"
    png = f"{EXPLAIN_DIR}/{method}.png"
    if data.kind == "image":  # row 0 is the CLS token; its attention to the patches, on the image
        x = data.x
        side = round((R.shape[-1] - 1) ** 0.5)
        cls = R[:, 0, 1:].reshape(-1, 1, side, side)
        over = torch.nn.functional.interpolate(cls, size=tuple(x.shape[-2:]), mode="bilinear")[:, 0]
        heads = None
        if method == "attention":
            heads = [(f"L{l + 1} h{h + 1}", A[0, h, 0, 1:].reshape(side, side).numpy())
                     for l, A in enumerate(maps) for h in range(A.shape[1])]
        return {png: fig.image_grid(_images(x, info), over.numpy(), predicted, data.true, title, heads)}
    note = ("How much the last position attends to each token " + (
        "in the last layer, heads averaged." if method == "attention" else
        "through all layers (rollout: heads averaged, identity added for the residual, multiplied through)."))
    if method == "attention":
        mats = [(f"layer {l + 1} head {h + 1}", A[0, h].numpy(), data.tokens[0])
                for l, A in enumerate(maps) for h in range(A.shape[1])]
    else:
        mats = [(f"block #{i}", R[i].numpy(), data.tokens[i]) for i in range(min(len(R), 8))]
    return {f"{EXPLAIN_DIR}/{method}.html": fig.text_heatmap(data.tokens, R[:, -1].numpy(), predicted, data.true,
                                                             title, note),
            png: fig.matrix_grid(mats, f"{info['model']['name']}: attention per layer and head, block #0"
                                 if method == "attention" else title)}


def format_result(result: dict) -> str:
    """What `nnlab explain` prints: a line per sample (IG's convergence delta beside it), the sanity
    check, the files written."""
    lines = [f"{result['model']}: {result['method']} on {result['samples']} samples ({result['wall_s']:.1f} s)"]
    deltas = result.get("convergence_delta")
    for i, (idx, p, t) in enumerate(zip(result["indices"], result["predicted"], result["true"])):
        line = f"  #{i} (index {idx}): predicted {p!r}, true {t!r}"
        if deltas is not None:
            change = result["ig"]["score_change"][i]
            line += f", convergence delta {deltas[i]:+.2e} (F(x) - F(x') = {change:+.3g})"
        lines.append(line)
    s = result.get("sanity")
    if s is not None:
        score = "undefined (every map constant)" if s["score"] is None else f"{s['score']:.3f}"
        verdict = ("passed" if s["passed"] else
                   "FAILED: the attribution barely depends on the learned weights; do not read it as the model's")
        lines.append(f"sanity ({s['test']}): Spearman |trained| vs |re-initialised| = {score}, "
                     f"threshold {s['threshold']}: {verdict}")
    if "max_row_sum_error" in result:
        lines.append(f"attention: {result['layers']} layers x {result['heads']} heads, "
                     f"rows sum to 1 within {result['max_row_sum_error']:.1e}")
    lines.append("wrote " + ", ".join([*result["files"], f"explain/{result['method']}.json"]))
    return "\n".join(lines)

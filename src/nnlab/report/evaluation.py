"""What the report computes from the model itself: its outputs on the test split, calibration
(expected calibration error and the reliability diagram's bins), the most confident mistakes, and
the FLOPs of one forward pass.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from nnlab.runfolder import load

ECE_BINS = 15


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> tuple[np.ndarray, float]:
    """The model's outputs on every row of x, in fp32, batch by batch, and the wall seconds it took."""
    start = time.perf_counter()
    outs = [model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)]
    return torch.cat(outs).numpy(), time.perf_counter() - start


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> list[dict]:
    """Equal-width confidence bins (lo, hi] over [0, 1]: each bin's count, accuracy and mean
    confidence (None for an empty bin), as Guo et al. (2017) bin them."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right=True: bin b holds edges[b] < confidence <= edges[b + 1]
    which = np.digitize(confidence, edges[1:-1], right=True)
    bins = []
    for b in range(n_bins):
        inside = which == b
        n = int(inside.sum())
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n,
                     "accuracy": float(correct[inside].mean()) if n else None,
                     "confidence": float(confidence[inside].mean()) if n else None})
    return bins


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE = sum over bins b of (n_b / N) * |accuracy_b - mean confidence_b|.

    confidence: the probability the model gives its predicted class (the largest softmax output),
    correct: whether that prediction is right; n_bins equal-width bins (lo, hi] over [0, 1].
    0 for a perfectly calibrated model: among the predictions made with confidence ~p, a fraction
    ~p is right."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    n = len(confidence)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
                     for b in calibration_bins(confidence, correct, n_bins) if b["count"]))


def confident_mistakes(probs: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k wrong predictions made with the highest confidence, most confident first."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y)
    return wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:k]


def example_input(info: dict) -> torch.Tensor:
    """A batch of one input of the shape the model takes, from model.json alone (no data needed)."""
    cfg = info["model"]
    if info["task"] == "text":
        return torch.zeros(1, cfg["block_size"], dtype=torch.long)
    if "input_shape" in info:
        return torch.zeros(1, *info["input_shape"])
    return torch.zeros(1, cfg["in_features"])


def flops_per_sample(run_dir: Path, info: dict) -> int:
    """FLOPs of one forward pass on one sample (one block of block_size tokens for a language model).

    Counted by torch.utils.flop_counter.FlopCounterMode, which counts 2 FLOPs per multiply-add of
    matrix products and convolutions (element-wise work such as ReLU, pooling, softmax and norms is
    not counted). nnlab's kernel ops are opaque to it, so the model is loaded with explicit=True: the
    article's formulas compute every product (convolutions as unfold + matmul, attention's QK^T and
    AV) as a matmul the counter sees."""
    model, _ = load(run_dir, explicit=True)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(example_input(info))
    return int(counter.get_total_flops())

"""The report's figures, drawn with matplotlib's Agg backend and returned as PNG data: URIs.

Figures are built as matplotlib.figure.Figure objects, never through pyplot, so drawing touches no
global state (no backend switch, no open-figure registry) and nothing is written to disk.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nnlab.errors import NnlabError

DPI = 80
RUN_COLOR, REF_COLOR = "#1f5fbf", "#7a7a7a"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def file_uri(path: Path) -> str:
    """A PNG file (written by another verb) as a data: URI; anything that is not a PNG is refused."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise NnlabError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data.startswith(PNG_MAGIC):
        raise NnlabError(f"{path}: not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _log_if_wide(ax, values) -> None:
    """A log axis for a quantity that spans more than a factor of 20 (losses, MSE early on)."""
    v = np.asarray([x for x in values if x is not None and x > 0], dtype=float)
    if v.size and v.max() / v.min() > 20:
        ax.set_yscale("log")


def training_curves(rows: list[tuple[str, list, list]], reference: dict | None) -> Figure:
    """One row per quantity (training loss, then each evaluation metric), against step (left) and
    against training seconds (right). rows: (name, run points [(step, seconds, value)], reference
    points [(step, seconds, mean, min, max)]), seconds None where a record has none."""
    fig = Figure(figsize=(10, 2.9 * len(rows)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for (name, run, ref), (ax_step, ax_sec) in zip(rows, axes):
        for ax, col, xlabel in ((ax_step, 0, "step"), (ax_sec, 1, "training seconds (evaluations excluded)")):
            pts = [(r[col], r[2]) for r in run if r[col] is not None]
            if ref:
                rp = [(r[col], *r[2:]) for r in ref if r[col] is not None]
                if rp:
                    x, mean, lo, hi = map(np.asarray, zip(*rp))
                    ax.fill_between(x, lo, hi, color=REF_COLOR, alpha=0.25, linewidth=0)
                    ax.plot(x, mean, "--", color=REF_COLOR, label="reference: mean, min-max over seeds")
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, "o-" if len(pts) < 30 else "-", color=RUN_COLOR, markersize=3, label="this run")
            _log_if_wide(ax, [v for _, v in pts] + [r[2] for r in ref or []])
            ax.set_xlabel(xlabel)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        ax_step.legend(fontsize=8)
    if reference:
        fig.suptitle(f"reference: {reference.get('recipe')}, seeds {reference.get('seeds')}, "
                     f"{reference.get('precision')} on {reference.get('cpu')}", fontsize=9)
    return fig


def confusion_matrix(cm: np.ndarray, classes: list[str]) -> Figure:
    """Counts, rows the true class and columns the predicted one; cells shaded by row fraction."""
    k = len(classes)
    size = min(9, 2.5 + 0.55 * k)
    fig = Figure(figsize=(size + 1, size), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if frac[i, j] > 0.55 else "black")
        ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, label="fraction of the true class", shrink=0.8)
    return fig


def reliability_diagram(bins: list[dict], ece: float) -> Figure:
    """Accuracy against mean confidence per confidence bin, with the diagonal of perfect
    calibration, above a histogram of how many predictions fall in each bin."""
    fig = Figure(figsize=(5.5, 6), dpi=DPI, layout="constrained")
    ax, ax_n = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    width = bins[0]["hi"] - bins[0]["lo"]
    full = [b for b in bins if b["count"]]
    lo = np.array([b["lo"] for b in full])
    ax.bar(lo, [b["accuracy"] for b in full], width=width, align="edge", color=RUN_COLOR, alpha=0.8,
           edgecolor="white", label="accuracy in the bin")
    ax.bar(lo, [b["confidence"] - b["accuracy"] for b in full], bottom=[b["accuracy"] for b in full], width=width,
           align="edge", fill=False, edgecolor="#d93025", hatch="///", linewidth=0.8, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "--", color=REF_COLOR, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_title(f"expected calibration error {ece:.4f} ({len(bins)} equal-width bins)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax_n.bar([b["lo"] for b in bins], [b["count"] for b in bins], width=width, align="edge", color=REF_COLOR)
    ax_n.set_yscale("log")
    ax_n.set_xlabel("confidence (the largest softmax probability)")
    ax_n.set_ylabel("predictions")
    return fig


def image_grid(images: list[np.ndarray], captions: list[str], cols: int = 8) -> Figure:
    """Images (H, W) grey or (H, W, 3) RGB in [0, 1], each with a caption of a few short lines."""
    rows = -(-len(images) // cols)
    fig = Figure(figsize=(1.45 * cols, 1.95 * rows), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, img, cap in zip(axes, images, captions):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(cap, fontsize=7)
    return fig


def predicted_vs_true(y_true: np.ndarray, y_pred: np.ndarray, target: str) -> Figure:
    fig = Figure(figsize=(5.5, 5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.scatter(y_true, y_pred, s=12, alpha=0.7, color=RUN_COLOR)
    lo, hi = float(min(y_true.min(), y_pred.min())), float(max(y_true.max(), y_pred.max()))
    ax.plot([lo, hi], [lo, hi], "--", color=REF_COLOR, label="predicted = true")
    ax.set_xlabel(f"true {target}")
    ax.set_ylabel(f"predicted {target}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig

"""The pictures `nnlab explain` writes: PNG bytes from matplotlib (Agg, no display) and one
self-contained HTML page for text. Each function takes plain arrays and returns the file's contents;
nnlab.analysis.explain decides what to draw and writes the files.
"""

from __future__ import annotations

import html
import io

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt
import numpy as np

PER_ROW = 4  # samples side by side in a grid


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _heat(m: np.ndarray) -> np.ndarray:
    """An RGBA layer for a map over an image: red where > 0, blue where < 0, opaque in proportion to
    |m| (a map with no negative values: to how far it rises above its lowest value, so a uniform
    attention map shows nothing). Scaled to the 99th percentile, so a few extreme pixels do not wash
    out the rest; the image stays visible where the map is low."""
    if m.min() >= 0:
        m = m - m.min()
    top = float(np.percentile(np.abs(m), 99)) or float(np.abs(m).max()) or 1.0
    rgba = np.zeros((*m.shape, 4))
    rgba[..., :3] = np.where(m[..., None] >= 0, (0.9, 0.1, 0.05), (0.1, 0.3, 1.0))
    rgba[..., 3] = 0.85 * np.clip(np.abs(m) / top, 0, 1)
    return rgba


def _correct(pred, true) -> str:
    return "darkgreen" if pred == true else "firebrick"


def image_grid(images: np.ndarray, maps: np.ndarray, predicted: list, true: list, title: str,
               heads: list[tuple[str, np.ndarray]] | None = None) -> bytes:
    """Per sample the input and the map over it (red > 0, blue < 0), with predicted and
    true class. images (B, H, W) or (B, H, W, 3) in [0, 1]; maps (B, H, W). `heads`: extra small
    maps (label, (h, w) array) drawn in rows below, e.g. every layer's and head's attention."""
    n = len(images)
    cols, rows = min(n, PER_ROW), -(-n // PER_ROW)
    head_rows = -(-len(heads) // (2 * cols)) if heads else 0
    fig = plt.figure(figsize=(2.2 * 2 * cols, 2.6 * rows + 1.8 * head_rows + 0.6), layout="constrained")
    fig.suptitle(title)
    parts = fig.subfigures(2, 1, height_ratios=[2.6 * rows, 1.8 * head_rows]) if heads else [fig]
    axes = parts[0].subplots(rows, 2 * cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    gray = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    for i in range(n):
        a_in, a_map = axes[i // cols, 2 * (i % cols)], axes[i // cols, 2 * (i % cols) + 1]
        a_in.imshow(images[i], **gray)
        a_in.set_title(f"#{i} input", fontsize=9)
        a_map.imshow(images[i], **gray)
        a_map.imshow(_heat(maps[i]))
        a_map.set_title(f"pred {predicted[i]}\ntrue {true[i]}", fontsize=9, color=_correct(predicted[i], true[i]))
    if heads:
        parts[1].suptitle("sample #0: attention of the CLS token to each patch, per layer (L) and head (h)",
                          fontsize=10)
        hx = parts[1].subplots(head_rows, 2 * cols, squeeze=False)
        for ax in hx.flat:
            ax.axis("off")
        for ax, (label, m) in zip(hx.flat, heads):
            parts[1].colorbar(ax.imshow(m, cmap="viridis"), ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
            ax.set_title(label, fontsize=8)
    return _png(fig)


def bar_grid(maps: np.ndarray, features: list[str], predicted: list, true: list, title: str) -> bytes:
    """Per sample (table row) a horizontal bar per feature, with predicted and true value."""
    n = len(maps)
    cols, rows = min(n, PER_ROW), -(-n // PER_ROW)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 0.25 * len(features) * rows + 1.2 * rows + 0.5),
                             squeeze=False, layout="constrained", sharey=True)
    fig.suptitle(title)
    for ax in axes.flat[n:]:
        ax.axis("off")
    y = np.arange(len(features))
    for i, ax in enumerate(axes.flat[:n]):
        ax.barh(y, maps[i], color=np.where(maps[i] >= 0, "tab:red", "tab:blue"))
        ax.axvline(0, color="black", linewidth=0.5)
        ax.set_yticks(y, features, fontsize=8)
        ax.set_xlabel("attribution (model output units)", fontsize=8)
        ax.set_title(f"#{i}: pred {predicted[i]}\ntrue {true[i]}", fontsize=9)
    axes.flat[0].invert_yaxis()  # the first feature on top; the axes share y, so once inverts all
    return _png(fig)


def matrix_grid(mats: list[tuple[str, np.ndarray, list[str]]], title: str) -> bytes:
    """Square matrices (query rows x key columns) side by side, e.g. each layer's and head's A, each
    with its label and the tokens of its rows and columns (named on the axes up to 32 of them)."""
    cols = min(len(mats), PER_ROW)
    rows = -(-len(mats) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows + 0.5), squeeze=False, layout="constrained")
    fig.suptitle(title)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, m, tokens) in zip(axes.flat, mats):
        ax.axis("on")
        fig.colorbar(ax.imshow(m, cmap="viridis", vmin=0.0), ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("key", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
        if len(tokens) <= 32:
            shown = [_visible(t) for t in tokens]
            ax.set_xticks(range(len(tokens)), shown, fontsize=6)
            ax.set_yticks(range(len(tokens)), shown, fontsize=6)
        else:
            ax.tick_params(labelsize=6)
    return _png(fig)


def _visible(token: str) -> str:
    return token.replace("\n", "\u21b5").replace(" ", "\u2423") if token.strip() == "" else token


def text_heatmap(blocks: list[list[str]], weights: np.ndarray, predicted: list, true: list, title: str,
                 explanation: str) -> str:
    """A self-contained HTML page: each block's tokens on a background as strong as the token's weight
    (red > 0, blue < 0; each block scaled to its own largest |weight|), the value in a tooltip."""
    rows = []
    for i, (tokens, w) in enumerate(zip(blocks, weights)):
        top = float(np.abs(w).max()) or 1.0
        spans = []
        for tok, v in zip(tokens, w):
            alpha = abs(float(v)) / top
            rgb = "220,40,40" if v >= 0 else "40,80,220"
            text = html.escape(tok.replace("\n", "\u21b5\n"))
            spans.append(f'<span title="{float(v):.4g}" style="background:rgba({rgb},{alpha:.3f})">{text}</span>')
        ok = "right" if predicted[i] == true[i] else "wrong"
        rows.append(f'<div class="block"><div class="label {ok}">#{i}: next token predicted '
                    f'<code>{html.escape(repr(predicted[i]))}</code>, true <code>{html.escape(repr(true[i]))}</code>'
                    f'</div><pre>{"".join(spans)}</pre></div>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 60em; }}
pre {{ font-size: 15px; line-height: 1.6; white-space: pre-wrap; border: 1px solid #ccc; padding: .5em; }}
.label {{ font-size: 14px; }} .right {{ color: darkgreen; }} .wrong {{ color: firebrick; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(explanation)}</p>
{"".join(rows)}
</body></html>
"""

"""The pictures `nnlab attack` writes, as PNG bytes (matplotlib, Agg): accuracy against eps, and the
first test images beside their adversarial versions with both predictions."""

from __future__ import annotations

import numpy as np

from nnlab.analysis.explain_figures import _correct, _png, plt


def draw(method: str, result: dict, clean: np.ndarray, adversarial: np.ndarray) -> dict[str, bytes]:
    """{attack/METHOD.png: the curve, attack/METHOD-examples.png: the images}; images (B, C, H, W) in [0, 1]."""
    from nnlab.runfolder import ATTACK_DIR

    return {f"{ATTACK_DIR}/{method}.png": curve(result),
            f"{ATTACK_DIR}/{method}-examples.png": examples(result, clean, adversarial)}


def curve(result: dict) -> bytes:
    eps = [0.0, *result["eps"]]
    acc = [result["clean_accuracy"], *result["accuracy"]]
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.plot(np.array(eps) * 255, acc, "o-", label=result["method"].upper())
    ax.axhline(result["chance"], color="gray", ls=":", label="chance")
    ax.set(xlabel="eps (grey levels of 255, L-infinity)", ylabel="test accuracy", ylim=(0, 1.02),
           title=f"{result['model']}: accuracy under attack, {result['samples']} test images")
    ax.legend()
    return _png(fig)


def examples(result: dict, clean: np.ndarray, adversarial: np.ndarray) -> bytes:
    ex = result["examples"]
    n = len(clean)
    fig, axes = plt.subplots(3, n, figsize=(1.7 * n, 6), squeeze=False, layout="constrained")
    fig.suptitle(f"{result['model']}: {result['method'].upper()} at eps {ex['eps']:.4g} (= {ex['eps'] * 255:.3g}/255) "
                 "(top: clean, middle: adversarial, bottom: change, scaled)")
    gray = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    for i in range(n):
        change = adversarial[i].mean(0) - clean[i].mean(0)
        top = float(np.abs(change).max()) or 1.0
        axes[0, i].imshow(_hw(clean[i]), **gray)
        axes[0, i].set_title(f"{ex['clean'][i]}\n(true {ex['true'][i]})", fontsize=8,
                             color=_correct(ex["clean"][i], ex["true"][i]))
        axes[1, i].imshow(_hw(adversarial[i]), **gray)
        axes[1, i].set_title(ex["adversarial"][i], fontsize=8, color=_correct(ex["adversarial"][i], ex["true"][i]))
        axes[2, i].imshow(change, cmap="RdBu_r", vmin=-top, vmax=top)
    for ax in axes.flat:
        ax.axis("off")
    return _png(fig)


def _hw(img: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W) for grey, (H, W, 3) for colour."""
    return img[0] if img.shape[0] != 3 else img.transpose(1, 2, 0)

"""Tampered training data: a BadNets backdoor (Gu et al., 2017).

A small trigger is stamped onto exactly round(rate * n) training images, drawn (by `seed`) from the
images whose class is not `target`, and those images are relabelled `target`. A model that learns
the shortcut classifies any image carrying the trigger as `target` and every clean image as before.
The test split is never poisoned: `triggered` stamps a copy of it, and the attack success rate is
the fraction of triggered test images of the other classes that the model calls `target`.

Triggers, stamped on every channel in pixel values (uint8), PATCH pixels wide, one pixel in from the
bottom-right corner (where Fashion-MNIST's and MNIST's objects rarely reach):
  patch    a white square
  checker  a white/black checkerboard (white in the corner), a pattern no clean image holds
"""

from __future__ import annotations

import numpy as np
import torch

from nnlab.errors import DataError

TRIGGERS = ("patch", "checker")
PATCH = 4
_POISON = 3  # salt: the poisoned rows draw from their own generator (sampling.py uses 1 and 2)


def trigger_mask(kind: str, h: int, w: int) -> tuple[slice, slice, torch.Tensor]:
    """(rows, cols, PATCH x PATCH uint8 values) of the trigger on an h x w image."""
    if kind not in TRIGGERS:
        raise DataError(f"data.poison.trigger: unknown trigger {kind!r}; choose one of {', '.join(TRIGGERS)}")
    values = torch.full((PATCH, PATCH), 255, dtype=torch.uint8)
    if kind == "checker":
        i = torch.arange(PATCH)
        values = torch.where((i[:, None] + i[None, :]) % 2 == 0, 255, 0).to(torch.uint8).flip(0, 1)
    return slice(h - 1 - PATCH, h - 1), slice(w - 1 - PATCH, w - 1), values


def triggered(x: torch.Tensor, kind: str) -> torch.Tensor:
    """A copy of uint8 images (N, C, H, W) with the trigger stamped on."""
    rows, cols, values = trigger_mask(kind, x.shape[2], x.shape[3])
    out = x.clone()
    out[:, :, rows, cols] = values
    return out


def check_poison(rate: float, target: int | None, num_classes: int) -> None:
    if not 0.0 <= rate < 1.0:
        raise DataError(f"data.poison.rate: must be in [0, 1), got {rate}")
    if rate > 0 and target is None:
        raise DataError("data.poison.target: a poisoned run needs the target class (data.poison.target=C)")
    if target is not None and not 0 <= target < num_classes:
        raise DataError(f"data.poison.target: class {target} does not exist (0..{num_classes - 1})")


def poison(x: torch.Tensor, y: torch.Tensor, rate: float, target: int, kind: str, seed: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y with round(rate * len(y)) rows stamped and relabelled `target`, the poisoned row indices)."""
    n = round(rate * len(y))
    others = torch.nonzero(y != target).flatten().numpy()
    if n > len(others):
        raise DataError(f"data.poison.rate: {rate} asks for {n} poisoned images, but only {len(others)} "
                        f"training images are not of class {target}")
    rows = torch.from_numpy(np.sort(np.random.default_rng([seed, _POISON]).choice(others, n, replace=False)))
    x, y = x.clone(), y.clone()
    x[rows] = triggered(x[rows], kind)
    y[rows] = target
    return x, y, rows

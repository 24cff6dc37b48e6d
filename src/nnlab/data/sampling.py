"""Which training rows a run keeps (data.train_fraction) and which of their labels it flips
(data.label_noise). Only the training split is touched; the test split stays whole and clean.

Both are drawn from one seed (data.split_seed), each through its own NumPy generator, so the same
seed and settings give the same rows and flips on every machine.

The kept rows are a prefix of one seeded order of the training rows, so a larger fraction's rows
hold every smaller fraction's rows (nested subsets make a learning curve's points differ only by
the rows added). For class labels the order is stratified at every prefix: after n rows, each
class has floor(n * share) or ceil(n * share) of them, within one row of its share of the full
training split; so every class whose share of n rows is at least one row is present.
"""

from __future__ import annotations

import heapq

import numpy as np

from nnlab.errors import DataError

_SUBSET, _NOISE = 1, 2  # salts: the subset and the flips draw from different generators


def check_fractions(train_fraction: float, label_noise: float) -> None:
    if not 0.0 < train_fraction <= 1.0:
        raise DataError(f"data: train_fraction must be in (0, 1], got {train_fraction}")
    if not 0.0 <= label_noise < 1.0:
        raise DataError(f"data: label_noise must be in [0, 1), got {label_noise}")


def stratified_order(y: np.ndarray, seed: int) -> np.ndarray:
    """A seeded order of the rows of `y` (class indices) whose every prefix is stratified.

    Within a class the rows come in a seeded random order. Across classes it is a schedule: the
    j-th row of a class of size N_c (out of N) may come at position t (1-based) only once
    t * N_c > (j - 1) * N (else the class would be over its share by one row or more) and must come
    by the first t with t * N_c >= j * N (else it would fall under by one or more). Earliest
    deadline first meets every such window when any order does, and one always does (Balinski and
    Young's quota method)."""
    n = len(y)
    perm = np.random.default_rng([seed, _SUBSET]).permutation(n)
    classes, y_perm = np.unique(y[perm], return_inverse=True)
    rows = [perm[y_perm == c] for c in range(len(classes))]  # each class's rows, in seeded order
    sizes = [len(r) for r in rows]

    def release(c: int, j: int) -> int:
        return (j - 1) * n // sizes[c] + 1

    def deadline(c: int, j: int) -> int:
        return -(-j * n // sizes[c])

    taken = [0] * len(rows)
    waiting = [(release(c, 1), c) for c in range(len(rows))]
    heapq.heapify(waiting)
    ready: list[tuple[int, int]] = []
    order = np.empty(n, dtype=np.int64)
    for t in range(1, n + 1):
        while waiting and waiting[0][0] <= t:
            c = heapq.heappop(waiting)[1]
            heapq.heappush(ready, (deadline(c, taken[c] + 1), c))
        c = heapq.heappop(ready)[1]
        order[t - 1] = rows[c][taken[c]]
        taken[c] += 1
        if taken[c] < sizes[c]:
            heapq.heappush(waiting, (release(c, taken[c] + 1), c))
    return order


def train_subset(n: int, fraction: float, seed: int, y: np.ndarray | None = None) -> np.ndarray:
    """The indices (ascending) of the round(fraction * n) training rows to keep, at least one.

    With class labels `y`, stratified by class (stratified_order); without, a seeded random
    subset. Either way a prefix of one seeded order: nested across fractions."""
    keep = max(1, round(fraction * n))
    order = stratified_order(y, seed) if y is not None else np.random.default_rng([seed, _SUBSET]).permutation(n)
    return np.sort(order[:keep])


def flip_labels(y: np.ndarray, rate: float, num_classes: int, seed: int) -> np.ndarray:
    """A copy of class indices `y` with exactly round(rate * len(y)) of them flipped, each to one of
    the other num_classes - 1 classes, chosen uniformly; which rows and which classes, by `seed`."""
    flips = round(rate * len(y))
    if not flips:
        return y.copy()
    if num_classes < 2:
        raise DataError("data: label_noise needs at least two classes to flip a label to another")
    rng = np.random.default_rng([seed, _NOISE])
    rows = rng.choice(len(y), size=flips, replace=False)
    noisy = y.copy()
    # Adding 1..num_classes-1 modulo num_classes reaches every other class once: uniform, never the same.
    noisy[rows] = (y[rows] + rng.integers(1, num_classes, size=flips)) % num_classes
    return noisy

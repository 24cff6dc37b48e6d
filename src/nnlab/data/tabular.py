"""Tabular regression data: scikit-learn's diabetes set or any numeric CSV file.

Features and target are float32. Standardization statistics come from the training split only,
so nothing about the test rows leaks into training.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from nnlab.errors import DataError

TABULAR_DATASETS = ("diabetes", "csv")


@dataclass
class TabularData:
    """A train/test split: x float32 (N, F), y float32 (N,), with training-split statistics."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    feature_names: list[str]
    target: str
    x_mean: torch.Tensor  # (F,)
    x_std: torch.Tensor  # (F,), constant columns get 1 so dividing is safe
    y_mean: float
    y_std: float

    def normalize_x(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.x_mean.to(x.device)) / self.x_std.to(x.device)

    def normalize_y(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.y_mean) / self.y_std

    def denormalize_y(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.y_std + self.y_mean


def _read_csv(path: str, target: str | None) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """Parse a numeric CSV with a header row; `target` defaults to the last column."""
    if not os.path.isfile(path):
        raise DataError(f"data: {path}: no such file" if not os.path.exists(path) else f"data: {path}: not a file")
    try:
        # utf-8-sig: spreadsheets often prepend a byte-order mark that would end up in the first name.
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows: list[tuple[int, list[str]]] = [(reader.line_num, r) for r in reader if r]
    except UnicodeDecodeError as e:
        raise DataError(f"data: {path}: not valid UTF-8 at byte offset {e.start}") from None
    except csv.Error as e:
        raise DataError(f"data: {path}: malformed CSV: {e}") from None
    if header is None or not any(h.strip() for h in header):
        raise DataError(f"data: {path}: empty file (expected a header row and numeric rows)")
    header = [h.strip() for h in header]
    blank = next((c for c, h in enumerate(header) if not h), None)
    if blank is not None:  # e.g. a pandas index column, which would otherwise train as a feature
        raise DataError(f"data: {path}: column {blank + 1} has no name in the header")
    dup = next((h for h in header if header.count(h) > 1), None)
    if dup is not None:
        raise DataError(f"data: {path}: column {dup!r} appears twice in the header")
    target = header[-1] if target is None else target
    if target not in header:
        raise DataError(f"data: {path}: no target column {target!r} (columns: {', '.join(header)})")
    if len(header) < 2:
        raise DataError(f"data: {path}: only the target column {target!r}; need at least one feature column")
    if not rows:
        raise DataError(f"data: {path}: no data rows after the header")
    values = np.empty((len(rows), len(header)), dtype=np.float64)
    for r, (row_num, row) in enumerate(rows):
        if len(row) != len(header):
            raise DataError(f"data: {path}: row {row_num} has {len(row)} fields, the header has {len(header)}")
        for c, cell in enumerate(row):
            try:
                v = float(cell)
            except ValueError:
                v = math.nan
            if not math.isfinite(v):
                raise DataError(f"data: {path}: row {row_num}, column {header[c]!r}: "
                                f"{cell.strip()!r} is not a finite number")
            values[r, c] = v
    t = header.index(target)
    features = [h for h in header if h != target]
    return np.delete(values, t, axis=1), values[:, t], features, target


def _std(a: np.ndarray) -> np.ndarray:
    s = a.std(axis=0)
    return np.where(s > 0, s, 1.0)  # a constant column carries no signal; 1 avoids dividing by zero


def load_tabular(name: str = "diabetes", path: str | None = None, target: str | None = None,
                 test_frac: float = 0.2, seed: int = 0) -> TabularData:
    """Load a regression data set and split it into train/test by a seeded shuffle.

    name "diabetes": scikit-learn's bundled diabetes set (442 rows, 10 raw features, target
    "target"). name "csv": the file at `path`, with a header row; `target` names the target
    column (default: the last column), every other column is a feature. Every cell must be a
    finite number, else DataError names file, row (the header is row 1) and column.
    The test split has round(test_frac * N) rows (at least 1); the same seed gives the same split.
    """
    if name not in TABULAR_DATASETS:
        raise DataError(f"data: unknown tabular data set {name!r} (choose from {', '.join(TABULAR_DATASETS)})")
    if not 0.0 < test_frac < 1.0:
        raise DataError(f"data: test_frac must be between 0 and 1, got {test_frac}")
    if name == "diabetes":
        if target not in (None, "target"):
            raise DataError(f"data: diabetes has no target column {target!r} (its target is 'target')")
        from sklearn.datasets import load_diabetes

        d = load_diabetes(scaled=False)
        x, y, features, target = d.data.astype(np.float64), d.target.astype(np.float64), list(d.feature_names), "target"
    else:
        if not path:
            raise DataError("data: the csv data set needs data.path, the CSV file to read")
        x, y, features, target = _read_csv(str(path), target)
    n = len(y)
    n_test = max(1, int(round(test_frac * n)))
    if n - n_test < 2:
        raise DataError(f"data: {path or name}: {n} rows are too few to split with test_frac {test_frac}")
    perm = np.random.default_rng(seed).permutation(n)
    tr, te = perm[n_test:], perm[:n_test]
    x_tr, y_tr = x[tr], y[tr]
    y_std = float(y_tr.std())

    def f32(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    return TabularData(
        name=name, x_train=f32(x_tr), y_train=f32(y_tr), x_test=f32(x[te]), y_test=f32(y[te]),
        feature_names=features, target=target,
        x_mean=f32(x_tr.mean(axis=0)), x_std=f32(_std(x_tr)),
        y_mean=float(y_tr.mean()), y_std=y_std if y_std > 0 else 1.0,
    )

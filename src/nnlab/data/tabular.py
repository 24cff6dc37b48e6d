"""Tabular data: scikit-learn's bundled tables (diabetes for regression; iris, wine and
breast-cancer for classification) or any CSV file whose features are numbers.

Features are float32. A regression target is float32; class labels become int64 class indices
into `classes`, their names. Standardization statistics come from the training rows only, so
nothing about the test rows leaks into training.

What a CSV's target holds (task "auto"): class labels when its cells are not numbers (strings
such as "setosa"), or when they are integers with at most MAX_INTEGER_CLASSES distinct values and
no more distinct values than half the rows (scikit-learn's iris written to CSV: 0, 1, 2, each
many times); anything else is a regression target. Class names are the distinct labels, sorted
(numbers by value, written as integers where they are whole: "0", "1", "2"); class i is names[i].
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from nnlab.data.sampling import check_fractions, flip_labels, train_subset
from nnlab.errors import ConfigError, DataError

BUNDLED = {"diabetes": "regression", "iris": "classification", "wine": "classification",
           "breast-cancer": "classification"}
TABULAR_DATASETS = (*BUNDLED, "csv")
TASKS = ("auto", "classification", "regression")
MAX_INTEGER_CLASSES = 20


@dataclass
class TabularData:
    """A train/test split: x float32 (N, F); y float32 (regression) or int64 class indices into
    `classes` (classification); statistics of the training rows."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    feature_names: list[str]
    target: str
    x_mean: torch.Tensor  # (F,)
    x_std: torch.Tensor  # (F,), constant columns get 1 so dividing is safe
    y_mean: float  # regression; 0 for class indices, which are never standardised
    y_std: float  # regression; 1 for class indices
    classes: list[str] | None = None  # class names, class i = classes[i]; None for a regression target

    @property
    def classification(self) -> bool:
        return self.classes is not None

    def normalize_x(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.x_mean.to(x.device)) / self.x_std.to(x.device)

    def normalize_y(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.y_mean) / self.y_std

    def denormalize_y(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.y_std + self.y_mean


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _read_csv(path: str, target: str | None, task: str):
    """Parse a CSV with a header row; `target` defaults to the last column. Returns (x, y,
    feature names, target, classes): y float64 targets, or int64 class indices with classes."""
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
    t = header.index(target)

    def not_finite(row_num: int, c: int, cell: str) -> DataError:
        return DataError(f"data: {path}: row {row_num}, column {header[c]!r}: {cell.strip()!r} is not a finite number")

    values = np.empty((len(rows), len(header)), dtype=np.float64)
    labels: list[str] = []
    for r, (row_num, row) in enumerate(rows):
        if len(row) != len(header):
            raise DataError(f"data: {path}: row {row_num} has {len(row)} fields, the header has {len(header)}")
        for c, cell in enumerate(row):
            v = _number(cell)
            if c == t and task != "regression":  # maybe class labels: decided once every row is read
                labels.append(cell.strip())
                values[r, c] = math.nan if v is None else v
                continue
            if v is None or not math.isfinite(v):
                raise not_finite(row_num, c, cell)
            values[r, c] = v
    x, y = np.delete(values, t, axis=1), values[:, t]
    features = [h for h in header if h != target]
    if task == "regression":
        return x, y, features, target, None

    is_number = np.array([_number(s) is not None for s in labels])
    if is_number.all():
        bad = np.flatnonzero(~np.isfinite(y))
        if len(bad):  # "nan" and "inf" are numbers to float(), but no class label or target
            raise not_finite(rows[bad[0]][0], t, labels[bad[0]])
        distinct = np.unique(y)
        whole = bool(np.all(distinct == np.round(distinct)))
        few = whole and len(distinct) <= min(MAX_INTEGER_CLASSES, len(y) // 2)
        if task == "auto" and not few:
            return x, y, features, target, None
        names = [str(int(v)) if whole else repr(float(v)) for v in distinct]
        return x, np.searchsorted(distinct, y).astype(np.int64), features, target, names
    if task == "auto" and is_number.any():  # most likely a numeric target with a typo in it
        r = int(np.argmin(is_number))
        raise DataError(f"data: {path}: row {rows[r][0]}, column {target!r}: {labels[r]!r} is not a number, though "
                        f"other rows' targets are; data.task=classification reads them all as class labels")
    empty = next((r for r, s in enumerate(labels) if not s), None)
    if empty is not None:
        raise DataError(f"data: {path}: row {rows[empty][0]}, column {target!r}: empty class label")
    names, y_idx = np.unique(np.array(labels), return_inverse=True)
    return x, y_idx.astype(np.int64), features, target, [str(s) for s in names]


def _load_bundled(name: str, target: str | None):
    """A scikit-learn table: (x, y, feature names, target, classes); class names are sklearn's."""
    if target not in (None, "target"):
        raise DataError(f"data: {name} has no target column {target!r} (its target is 'target')")
    import sklearn.datasets as sk

    loader = {"diabetes": lambda: sk.load_diabetes(scaled=False), "iris": sk.load_iris, "wine": sk.load_wine,
              "breast-cancer": sk.load_breast_cancer}[name]
    d = loader()
    features = [str(f) for f in d.feature_names]
    if BUNDLED[name] == "regression":
        return d.data.astype(np.float64), d.target.astype(np.float64), features, "target", None
    return d.data.astype(np.float64), d.target.astype(np.int64), features, "target", [str(c) for c in d.target_names]


def _split(n: int, n_test: int, seed: int, y: np.ndarray, classes: list[str] | None):
    """(train rows, test rows): stratified by class where every class has two rows and each side
    room for one of each; otherwise (and always for regression) a seeded shuffle."""
    if classes is not None:
        counts = np.bincount(y, minlength=len(classes))
        if counts.min() >= 2 and min(n_test, n - n_test) >= len(classes):
            from sklearn.model_selection import train_test_split

            return train_test_split(np.arange(n), test_size=n_test, random_state=seed, stratify=y)
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


def load_tabular(name: str = "diabetes", path: str | None = None, target: str | None = None,
                 test_frac: float = 0.2, seed: int = 0, task: str = "auto", train_fraction: float = 1.0,
                 label_noise: float = 0.0) -> TabularData:
    """Load a table and split it into train/test rows.

    name "diabetes" (442 rows, 10 raw features, regression), "iris", "wine", "breast-cancer"
    (scikit-learn's bundled classification tables): target "target". name "csv": the file at
    `path`, with a header row; `target` names the target column (default: the last column),
    every other column is a feature. Every feature cell must be a finite number, else DataError
    names file, row (the header is row 1) and column. `task` says what the target holds:
    "classification", "regression", or "auto" (the module docstring's rule; a bundled table's own).

    The test split has round(test_frac * N) rows (at least 1): for classes stratified by class
    (scikit-learn's train_test_split, seeded) where possible, else a seeded shuffle; the same seed
    gives the same split. Then `train_fraction` keeps a subset of the training rows (stratified for
    classes) and `label_noise` flips that fraction of their labels (nnlab.data.sampling; both drawn
    from `seed`); the statistics describe the rows kept.
    """
    if name not in TABULAR_DATASETS:
        raise DataError(f"data: unknown tabular data set {name!r} (choose from {', '.join(TABULAR_DATASETS)})")
    if task not in TASKS:
        raise DataError(f"data: task must be one of {', '.join(TASKS)}, got {task!r}")
    if not 0.0 < test_frac < 1.0:
        raise DataError(f"data: test_frac must be between 0 and 1, got {test_frac}")
    check_fractions(train_fraction, label_noise)
    if name in BUNDLED:
        if task not in ("auto", BUNDLED[name]):
            raise ConfigError(f"data.task: {name} is a {BUNDLED[name]} data set, not {task}")
        x, y, features, target, classes = _load_bundled(name, target)
    else:
        if not path:
            raise DataError("data: the csv data set needs data.path, the CSV file to read")
        x, y, features, target, classes = _read_csv(str(path), target, task)
    where = path or name
    if classes is not None and len(classes) < 2:
        raise DataError(f"data: {where}: target {target!r} holds one class ({classes[0]!r}); a classifier needs two")
    if label_noise and classes is None:
        raise ConfigError(f"data.label_noise: flips class labels, and {where}'s target {target!r} is a regression "
                          "target (data.task)")
    n = len(y)
    n_test = max(1, int(round(test_frac * n)))
    if n - n_test < 2:
        raise DataError(f"data: {where}: {n} rows are too few to split with test_frac {test_frac}")
    tr, te = _split(n, n_test, seed, y, classes)
    if train_fraction < 1:
        tr = tr[train_subset(len(tr), train_fraction, seed, y=y[tr] if classes is not None else None)]
    x_tr, y_tr = x[tr], y[tr]
    if label_noise:
        y_tr = flip_labels(y_tr, label_noise, len(classes), seed)

    def f32(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    if classes is not None:
        y_train, y_test, y_mean, y_std = torch.from_numpy(y_tr), torch.from_numpy(y[te]), 0.0, 1.0
    else:
        y_train, y_test, y_mean, y_std = f32(y_tr), f32(y[te]), float(y_tr.mean()), float(y_tr.std())
    return TabularData(
        name=name, x_train=f32(x_tr), y_train=y_train, x_test=f32(x[te]), y_test=y_test,
        feature_names=features, target=target, x_mean=f32(x_tr.mean(axis=0)), x_std=f32(_std(x_tr)),
        y_mean=y_mean, y_std=y_std if y_std > 0 else 1.0, classes=classes,
    )


def _std(a: np.ndarray) -> np.ndarray:
    s = a.std(axis=0)
    return np.where(s > 0, s, 1.0)  # a constant column carries no signal; 1 avoids dividing by zero

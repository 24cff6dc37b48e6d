"""Traditional machine learning beside the deep models: the article's comparison, measured.

Six scikit-learn models (logistic or linear regression, a decision tree, a random forest, an SVM
with an RBF kernel, k nearest neighbours, histogram gradient boosting) are fitted on exactly the
split and inputs a deep model trains on: the config builds the task (nnlab.tasks.make_task), and
`task.arrays()` hands out its normalised training and test inputs. With a run folder the config
is the run's own, so the split is the very one the run trained on, and the trained model joins the
table, measured the same way.

Each row (one model) of baselines.json:
    test_accuracy                        classification: the fraction of test samples predicted right
    test_mse, test_loss_article          regression: sklearn's mean of squares in target units, and
                                         the article's L = 1/(2N) sum (y - y*)^2 = test_mse / 2
    fit_s                                wall seconds of fitting (the deep model: its train_seconds)
    predict_s                            wall seconds to predict the whole test split
    latency_ms                           median wall ms of a one-sample call, over LATENCY_CALLS calls
    n_fit, note                          rows fitted; a model slower than its budget at full size is
                                         fitted on a seeded subsample (stratified by class), and the
                                         note says so

Regressors fit a standardised target, as the deep model does (TransformedTargetRegressor), and
predict in the target's units.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.compose import TransformedTargetRegressor
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import accuracy_score, mean_squared_error
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, SVR
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor
from threadpoolctl import threadpool_limits

from nnlab import runfolder
from nnlab.config import Config, build_config, parse_overrides
from nnlab.errors import ConfigError, NnlabError
from nnlab.recipes import with_paths_resolved

DEFAULT_DATA = "fashion-mnist"
LATENCY_CALLS = 25


def n_jobs() -> int:
    """Workers (and threads) of every baseline: as many as torch's thread pool, so that
    OMP_NUM_THREADS (or torch.set_num_threads) bounds the traditional and the deep models alike."""
    return torch.get_num_threads()


@dataclass(frozen=True)
class Baseline:
    """A traditional model: its classifier and regressor (each seed -> an unfitted estimator; None
    where the model has no such form) and the rows it fits at most by default (None: all)."""

    classifier: Callable[[int], object] | None
    regressor: Callable[[int], object] | None
    max_fit_rows: int | None = None


# The caps keep all six within 10 minutes of fitting on full Fashion-MNIST (60,000 images) on 2
# cores: the SVM's kernel matrix grows with the square of the rows, boosting fits 10 trees (one per
# class) per round, and lbfgs stops at 200 iterations (benchmarks/README.md, B6, has the figures).
BASELINES: dict[str, Baseline] = {
    "logistic-regression": Baseline(lambda seed: LogisticRegression(max_iter=200, random_state=seed), None),
    "linear-regression": Baseline(None, lambda seed: LinearRegression()),
    "decision-tree": Baseline(lambda seed: DecisionTreeClassifier(random_state=seed),
                              lambda seed: DecisionTreeRegressor(random_state=seed)),
    "random-forest": Baseline(lambda seed: RandomForestClassifier(n_estimators=100, n_jobs=n_jobs(), random_state=seed),
                              lambda seed: RandomForestRegressor(n_estimators=100, n_jobs=n_jobs(), random_state=seed)),
    "svm-rbf": Baseline(lambda seed: SVC(kernel="rbf", random_state=seed), lambda seed: SVR(kernel="rbf"), 20_000),
    "knn": Baseline(lambda seed: KNeighborsClassifier(n_neighbors=5, n_jobs=n_jobs()),
                    lambda seed: KNeighborsRegressor(n_neighbors=5, n_jobs=n_jobs())),
    "hist-gradient-boosting": Baseline(lambda seed: HistGradientBoostingClassifier(random_state=seed),
                                       lambda seed: HistGradientBoostingRegressor(random_state=seed), 20_000),
}


def names(classification: bool) -> list[str]:
    """The baselines that fit a classification (or a regression) task, in table order."""
    return [n for n, b in BASELINES.items() if (b.classifier if classification else b.regressor)]


def make_estimator(name: str, classification: bool, seed: int = 0):
    """The unfitted scikit-learn estimator of baseline `name`; an unknown name is a NnlabError."""
    valid = names(classification)
    if name not in valid:
        task = "classification" if classification else "regression"
        raise NnlabError(f"--models: {name!r} is not a {task} baseline; choose from {', '.join(valid)}")
    b = BASELINES[name]
    if classification:
        return b.classifier(seed)
    return TransformedTargetRegressor(regressor=b.regressor(seed), transformer=StandardScaler())


def subsample(x: np.ndarray, y: np.ndarray, rows: int | None, classification: bool,
              seed: int) -> tuple[np.ndarray, np.ndarray, str | None]:
    """(x, y, None), or a seeded subsample of `rows` rows (stratified by class where every class
    has two rows or more) and the note that says so."""
    if rows is None or rows >= len(y):
        return x, y, None
    stratify = classification and np.unique(y, return_counts=True)[1].min() >= 2 and rows >= len(np.unique(y))
    x_fit, _, y_fit, _ = train_test_split(x, y, train_size=rows, random_state=seed, stratify=y if stratify else None)
    how = "stratified" if stratify else "random"
    return x_fit, y_fit, f"fitted on a {how} {rows:,}-row subsample of {len(y):,} (seed {seed})"


def score(pred: np.ndarray, y_test: np.ndarray, classification: bool) -> dict:
    if classification:
        return {"test_accuracy": float(accuracy_score(y_test, pred))}
    mse = float(mean_squared_error(y_test, pred))
    return {"test_mse": mse, "test_loss_article": mse / 2}  # 1/(2N) sum (y - y*)^2


def latency_ms(predict_one: Callable[[int], object], n: int) -> float:
    """Median wall ms of predict_one(i), one call per test row i < min(n, LATENCY_CALLS)."""
    times = []
    for i in range(min(n, LATENCY_CALLS)):
        t0 = time.perf_counter()
        predict_one(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def fit_and_score(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  classification: bool, max_fit_rows: int | None = None, seed: int = 0) -> dict:
    """Fit baseline `name` on (x_train, y_train), or on a subsample of max_fit_rows rows (default:
    the model's own limit), and measure it on the test split: one row of baselines.json."""
    if max_fit_rows is not None and max_fit_rows < 1:
        raise NnlabError(f"--max-fit-rows: must be at least 1, got {max_fit_rows}")
    model = make_estimator(name, classification, seed)
    rows = max_fit_rows if max_fit_rows is not None else BASELINES[name].max_fit_rows
    x_fit, y_fit, note = subsample(x_train, y_train, rows, classification, seed)
    # n_jobs() bounds scikit-learn's OpenMP and BLAS threads too (boosting, k-NN's distances, SVC).
    with threadpool_limits(limits=n_jobs()), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)  # the iteration cap is part of the setup: noted, not shown
        t0 = time.perf_counter()
        model.fit(x_fit, y_fit)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pred = model.predict(x_test)
        predict_s = time.perf_counter() - t0
        latency = latency_ms(lambda i: model.predict(x_test[i : i + 1]), len(x_test))
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        note = "; ".join(filter(None, [note, "stopped at its iteration cap before converging"]))
    return {"model": name, "estimator": repr(model), "deep": False, "n_fit": len(y_fit),
            **score(pred, y_test, classification), "fit_s": round(fit_s, 3), "predict_s": round(predict_s, 3),
            "latency_ms": round(latency, 4), "note": note}


@torch.inference_mode()
def deep_row(model: torch.nn.Module, summary: dict, cfg: Config, task) -> dict:
    """A run's trained model (from nnlab.load) as a row of the same table: its test metric from
    task.evaluate (what `nnlab eval` reports), its training seconds from its summary, and prediction
    timed as the baselines' is: the test split in batches of train.eval_batch_size, then one sample
    a call."""
    metrics = task.evaluate(model, torch.device("cpu"))
    x_test, batch = task.x_test, cfg.train.eval_batch_size
    t0 = time.perf_counter()
    for i in range(0, len(x_test), batch):
        model(x_test[i : i + batch])
    predict_s = time.perf_counter() - t0
    model(x_test[:1])  # the first one-sample call pays for a new shape
    result = ({"test_accuracy": metrics["test_accuracy"]} if task.classification
              else {"test_mse": metrics["test_mse"], "test_loss_article": metrics["test_mse"] / 2})
    return {"model": f"nnlab {cfg.recipe or cfg.model.name}", "estimator": type(model).__name__, "deep": True,
            "n_fit": task.num_train(), **result, "fit_s": summary["train_seconds"], "predict_s": round(predict_s, 3),
            "latency_ms": round(latency_ms(lambda i: model(x_test[i : i + 1]), len(x_test)), 4), "note": None}


def data_config(data: str | None, overrides: list[str] | None) -> Config:
    """The config of a data set alone (the data section's defaults, as every recipe's): --set may
    change data keys only, resolved as `nnlab train --set` resolves them."""
    layer = with_paths_resolved(parse_overrides(overrides), os.getcwd())
    other = sorted(set(layer) - {"data"})
    if other:
        raise ConfigError(f"--set {other[0]}...: baselines take data keys only (data.path=..., data.limit=...)")
    data_section = {"name": data or DEFAULT_DATA, **(layer.get("data") or {})}
    if data_section["name"] == "text":
        raise ConfigError("data.name: text trains language models, which have no traditional-ML baseline here")
    # The MLP accepts both images and tables; only the data section decides the split and inputs.
    return build_config({"recipe": "baselines", "model": {"name": "mlp"}, "data": data_section})


def check_args(run_dir, data, overrides, out, max_fit_rows) -> None:
    if max_fit_rows is not None and max_fit_rows < 1:
        raise NnlabError(f"--max-fit-rows: must be at least 1, got {max_fit_rows}")
    if run_dir is not None:
        if data is not None or overrides:
            raise NnlabError("baselines: --run uses the run's own data; give --run or --data/--set, not both")
        if out is not None:
            raise NnlabError("baselines: --run writes into the run folder; give --run or --out, not both")
        if not Path(run_dir).is_dir():
            raise NnlabError(f"--run {run_dir}: no such folder")
        if not (Path(run_dir) / runfolder.MODEL_INFO).exists():
            raise NnlabError(f"--run {run_dir}: no {runfolder.MODEL_INFO} (not a finished run folder?)")


def write_baselines(run_dir: str | Path | None = None, data: str | None = None, overrides: list[str] | None = None,
                    out: str | Path | None = None, models: list[str] | None = None, max_fit_rows: int | None = None,
                    seed: int = 0, say: Callable[[str], None] = lambda line: None) -> Path:
    """Fit the baselines (default: all that fit the task) on a run's split (run_dir) or a data set's
    (data, default fashion-mnist, with --set-style data overrides), and write baselines.json: into
    run_dir, else into `out` (default: a new folder runs/baselines-DATA-TIME). Returns its path.
    Nothing but baselines.json is written, and every argument is checked before any fitting."""
    from nnlab.info import machine_info
    from nnlab.tasks import make_task

    check_args(run_dir, data, overrides, out, max_fit_rows)
    if models is not None and not models:
        raise NnlabError(f"--models: name at least one baseline: {', '.join(BASELINES)}")
    unknown = [m for m in models or [] if m not in BASELINES]
    if unknown:
        raise NnlabError(f"--models: unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}")
    cfg = runfolder.read_config(run_dir) if run_dir is not None else data_config(data, overrides)
    if out is not None or run_dir is None:
        folder = Path(out) if out is not None else runfolder.new_run_dir(None, f"baselines-{cfg.data.name}")
        blocker = runfolder.file_in_the_way(folder)
        if blocker is not None:
            raise NnlabError(f"--out {folder}: {blocker} is a file, not a folder")
    else:
        folder = Path(run_dir)
    task = make_task(cfg)
    if not hasattr(task, "arrays"):
        raise NnlabError(f"baselines: {cfg.data.name} trains a language model, which has no traditional-ML baseline")
    classification = task.classification
    chosen = models or names(classification)
    for name in chosen:
        make_estimator(name, classification)  # a model that does not fit the task fails now, not after others
    x_train, y_train, x_test, y_test = task.arrays()
    if run_dir is not None:  # a broken model or summary fails now, before minutes of fitting
        model, _ = runfolder.load(run_dir)
        summary = runfolder.read_json(Path(run_dir) / runfolder.SUMMARY)

    rows = []
    for name in chosen:
        say(f"fitting {name} ...")
        rows.append(fit_and_score(name, x_train, y_train, x_test, y_test, classification, max_fit_rows, seed))
    if run_dir is not None:
        say("timing the run's model ...")
        rows.append(deep_row(model, summary, cfg, task))
    doc = {"data": cfg.data.name, "task": "classification" if classification else "regression",
           "metric": "test_accuracy" if classification else "test_mse",
           "n_train": len(y_train), "n_test": len(y_test), "n_features": int(x_train.shape[1]),
           "seed": seed, "n_jobs": n_jobs(), "machine": machine_info(),
           "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows}
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NnlabError(f"{folder}: cannot make the folder ({e.strerror or e})") from None
    path = folder / runfolder.BASELINES
    runfolder.write_json(path, doc)
    return path


def table(doc: dict):
    """baselines.json for the screen: a rich Table, one row per model (the deep one in bold), and
    the models' notes below it."""
    from rich.console import Group
    from rich.table import Table

    classification = doc["task"] == "classification"
    t = Table(title=f"{doc['data']}: {doc['n_train']:,} training / {doc['n_test']:,} test samples, "
                    f"{doc['n_features']:,} features")
    metric_columns = ["test accuracy"] if classification else ["test MSE", "1/(2N) SS"]
    for col in ["model", "rows fitted", *metric_columns, "fit s", "predict s", "latency ms"]:
        t.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    for r in doc["rows"]:
        metric = ([f"{100 * r['test_accuracy']:.2f}%"] if classification
                  else [f"{r['test_mse']:,.1f}", f"{r['test_loss_article']:,.1f}"])
        t.add_row(r["model"], f"{r['n_fit']:,}", *metric, f"{r['fit_s']:,.2f}", f"{r['predict_s']:,.3f}",
                  f"{r['latency_ms']:.3f}", style="bold" if r["deep"] else None)
    notes = [f"{r['model']}: {r['note']}" for r in doc["rows"] if r["note"]]
    return Group(t, *notes)

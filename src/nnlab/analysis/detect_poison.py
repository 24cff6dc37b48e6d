"""Find the tampered training images of a backdoored run from what the model learnt.

    nnlab detect-poison RUN_DIR [--method spectral|activation-clustering] [--expected E] [--out FILE]

Both methods look at the training set's penultimate-layer features (forward_features: the input of
the model's final linear layer) class by class, where a backdoor leaves the poisoned images of the
target class as a second, separate population beside the clean ones.

spectral (Tran et al., 2018): centre the class's features R (n_c, D), take the top right singular
vector v of R - mean(R), and score each row by its squared projection

    s_i = ((R_i - mean(R)) . v)^2

A strong backdoor dominates the class's variance, so its rows get the largest scores. Each class
flags the rows at or above the (1 - 1.5 * E) quantile of its scores (numpy's linear quantile, ART's
rule with its eps_multiplier 1.5): about 1.5 E of the class, at least one row. E is the poisoned
share of a class the defender budgets for: by default the run's own poisoned share of its target
class (the bound Tran et al. assume known), or CLEAN_RUN_EXPECTED for a run that was not poisoned.

activation-clustering (Chen et al., 2018, as ART runs it): reduce the class's features to 10
dimensions with PCA, split them in two with k-means, and flag the smaller cluster.

The run's training set is rebuilt exactly as training built it (same config, same seed, through
nnlab.data.poison), so the poisoned rows are known, and the flags are scored against them: precision
(the flagged rows that are poisoned) and recall (the poisoned rows that are flagged), per class and
overall. For a run that was not poisoned every flag is a false alarm and both are null.

Writes RUN_DIR/detect_poison.json (or --out), nothing else; bad input writes nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from nnlab import runfolder
from nnlab.errors import NnlabError

METHODS = ("spectral", "activation-clustering")
EPS_MULTIPLIER = 1.5  # flag 1.5x the expected poisoned share of each class, as Tran et al. and ART do
CLEAN_RUN_EXPECTED = 0.05  # the budget for a run with no poison to derive one from
CLUSTER_DIMS = 10  # activation clustering: PCA dimensions before k-means (ART's nb_dims)


def penultimate_features(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """forward_features of `model` in eval mode for every row of x: (N, D) float32, the input of its
    final linear layer."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model.forward_features(x[i : i + batch_size]).float().flatten(1).numpy())
    return np.concatenate(out)


def spectral_scores(features: np.ndarray) -> np.ndarray:
    """Tran et al.'s outlier score of each row: its squared projection, after centring, on the top
    right singular vector of the centred rows."""
    centred = features.astype(np.float64) - features.mean(axis=0, dtype=np.float64)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return (centred @ vt[0]) ** 2


def flag_top(scores: np.ndarray, expected: float) -> np.ndarray:
    """The rows at or above the (1 - 1.5 * expected) quantile of `scores`: a boolean mask."""
    cutoff = np.quantile(scores, max(1 - EPS_MULTIPLIER * expected, 0.0))
    return scores >= cutoff


def cluster_smaller(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """The smaller of two k-means clusters of the rows (after PCA to CLUSTER_DIMS): a boolean mask."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    if len(features) < 2:
        return np.zeros(len(features), dtype=bool)
    reduced = features
    if features.shape[1] > CLUSTER_DIMS and len(features) > CLUSTER_DIMS:
        reduced = PCA(n_components=CLUSTER_DIMS, random_state=seed).fit_transform(features)
    clusters = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(reduced)
    return clusters == np.argmin(np.bincount(clusters, minlength=2))


def detect(features: np.ndarray, labels: np.ndarray, num_classes: int, method: str = "spectral",
           expected: float = CLEAN_RUN_EXPECTED) -> np.ndarray:
    """Which training rows `method` flags as poisoned, class by class (the labels the model trained
    on): a boolean mask over the rows."""
    flags = np.zeros(len(labels), dtype=bool)
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        if len(rows) == 0:
            continue
        if method == "spectral":
            flags[rows] = flag_top(spectral_scores(features[rows]), expected)
        else:
            flags[rows] = cluster_smaller(features[rows])
    return flags


def _scores(flags: np.ndarray, poisoned: np.ndarray | None) -> dict:
    """Flag counts, precision and recall of one set of rows; null where there is nothing to divide by."""
    n_flagged = int(flags.sum())
    if poisoned is None:
        return {"rows": len(flags), "flagged": n_flagged, "poisoned": None, "true_positives": None,
                "precision": None, "recall": None}
    hits, n_poisoned = int((flags & poisoned).sum()), int(poisoned.sum())
    return {"rows": len(flags), "flagged": n_flagged, "poisoned": n_poisoned, "true_positives": hits,
            "precision": hits / n_flagged if n_flagged else None,
            "recall": hits / n_poisoned if n_poisoned else None}


def score_flags(flags: np.ndarray, poisoned: np.ndarray | None, labels: np.ndarray, classes: list[str]) -> dict:
    """{"overall": ..., "per_class": [...]}: _scores of all rows, then of each class's rows."""
    per_class = []
    for c, name in enumerate(classes):
        rows = labels == c
        per_class.append({"class": c, "name": name, **_scores(flags[rows], None if poisoned is None else poisoned[rows])})
    return {"overall": _scores(flags, poisoned), "per_class": per_class}


def _poison_settings(cfg) -> tuple[float, int | None, str]:
    """(rate, target class, trigger) of the run's backdoor: the one place that reads those keys."""
    d = cfg.data
    return d.poison.rate, d.poison.target, d.poison.trigger


def _check_expected(expected) -> None:
    if isinstance(expected, bool) or not isinstance(expected, (int, float)) or not 0 < expected < 1:
        raise NnlabError(f"--expected: the poisoned share of a class must be in (0, 1), got {expected}")


def detect_poison(run_dir, method: str = "spectral", expected: float | None = None, out=None) -> dict:
    """Run `method` on a finished image classifier's training set, score its flags against the rows
    training poisoned, write the result as JSON (RUN_DIR/detect_poison.json, or `out`) and return it.
    `expected` is the poisoned share of a class that spectral signatures budget for (default: the
    run's own share in its target class, or CLEAN_RUN_EXPECTED). Bad input (no run folder, not an
    image classifier, an unknown method, `expected` outside (0, 1)) is an NnlabError; nothing is written."""
    from nnlab.tasks import make_task

    run_dir = Path(run_dir)
    if method not in METHODS:
        raise NnlabError(f"--method: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if expected is not None:
        _check_expected(expected)
    if not run_dir.is_dir():
        raise NnlabError(f"{run_dir}: no such run folder")
    out = Path(out) if out is not None else run_dir / runfolder.DETECT_POISON
    if out.is_dir():
        raise NnlabError(f"--out {out}: is a folder, not a file")
    if not out.parent.is_dir():
        raise NnlabError(f"--out {out}: no folder {out.parent} to write it in")
    cfg = runfolder.read_config(run_dir)
    model, info = runfolder.load(run_dir)
    if info.get("task") != "image":
        raise NnlabError(f"{run_dir}: detect-poison reads image classifiers; this run's model "
                         f"({info['model']['name']}) is a {info.get('task')} model")

    start = time.perf_counter()
    rate, target, trigger = _poison_settings(cfg)
    task = make_task(cfg)  # the training set exactly as training built it, poisoned rows included
    labels = task.data.y_train.numpy()
    classes = list(task.data.classes)
    poisoned = None
    if task.data.poisoned is not None and len(task.data.poisoned):
        poisoned = np.zeros(len(labels), dtype=bool)
        poisoned[task.data.poisoned.numpy()] = True
    if expected is None:
        expected = poisoned.sum() / (labels == target).sum() if poisoned is not None else CLEAN_RUN_EXPECTED
        expected_source = "the run's poisoned share of its target class" if poisoned is not None else \
            "default for a run without poison"
    else:
        expected_source = "--expected"

    features = penultimate_features(model, task.x_train)
    flags = detect(features, labels, len(classes), method, float(expected))
    summary = runfolder.read_json(run_dir / runfolder.SUMMARY) if (run_dir / runfolder.SUMMARY).exists() else {}
    result = {"run": str(run_dir), "model": info["model"]["name"], "method": method,
              "features": f"penultimate layer (forward_features), {features.shape[1]} per image",
              "poison": {"rate": rate, "target": target, "trigger": trigger,
                         "rows": int(poisoned.sum()) if poisoned is not None else 0},
              "test_accuracy": summary.get("test_accuracy"),
              "attack_success_rate": summary.get("attack_success_rate"),
              **({"expected": float(expected), "expected_source": expected_source,
                  "eps_multiplier": EPS_MULTIPLIER} if method == "spectral" else {"cluster_dims": CLUSTER_DIMS}),
              **score_flags(flags, poisoned, labels, classes),
              "flag_rate": float(flags.mean()),
              "note": None if poisoned is not None else
              "the run is not poisoned: every flagged row is a false alarm; precision and recall are undefined (null)",
              "flagged_rows": np.flatnonzero(flags).tolist()}
    result["wall_s"] = round(time.perf_counter() - start, 3)
    result["written"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        runfolder.write_json(out, result)
    except OSError as e:  # no permission, a full disk
        raise NnlabError(f"{out}: cannot write ({e.strerror or e})") from None
    result["path"] = str(out)
    return result


def table(result: dict):
    """detect_poison.json for the screen: a rich Table, one row per class and one for all rows."""
    from rich.table import Table

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    p = result["poison"]
    title = (f"{result['model']}: {result['method']} on {result['overall']['rows']:,} training images; "
             + (f"{p['rows']:,} poisoned (target class {p['target']})" if p["rows"] else "no poisoned rows"))
    t = Table(title=title)
    for col in ["class", "rows", "poisoned", "flagged", "precision", "recall"]:
        t.add_column(col, justify="left" if col == "class" else "right", no_wrap=True)
    for r in result["per_class"]:
        t.add_row(f"{r['class']} {r['name']}", f"{r['rows']:,}", "n/a" if r["poisoned"] is None else f"{r['poisoned']:,}",
                  f"{r['flagged']:,}", pct(r["precision"]), pct(r["recall"]),
                  style="bold" if r["class"] == p["target"] else None)
    o = result["overall"]
    t.add_row("all", f"{o['rows']:,}", "n/a" if o["poisoned"] is None else f"{o['poisoned']:,}", f"{o['flagged']:,}",
              pct(o["precision"]), pct(o["recall"]), style="bold")
    return t

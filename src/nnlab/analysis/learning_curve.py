"""Test accuracy against the number of training examples: does the deep model need more data?

    nnlab learning-curve seed-cnn-fast --fractions 0.01,0.03,0.1,0.3,1 --seeds 3

For every seed s and every fraction f, the recipe trains on a stratified subset of f of its
training set (`data.train_fraction`, drawn by `data.split_seed=s`; a larger fraction's rows hold a
smaller one's) and is tested on the whole test split; each chosen scikit-learn baseline is fitted
on the same rows, with random_state s.
Named after scikit-learn's `learning_curve`, which does the same for one estimator.

A small fraction of an epoch-based recipe would train for a handful of steps and say more about
the schedule than about the data, so every deep run takes at least `min_steps` optimizer steps.

Writes learning_curve.json and learning_curve.png into the output folder, and every deep run's own
run folder under OUT/learning-curve/.
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import numpy as np

from nnlab import runfolder
from nnlab.config import load_config
from nnlab.errors import ConfigError, NnlabError

FRACTIONS = (0.01, 0.03, 0.1, 0.3, 1.0)
BASELINES = ("random-forest", "logistic-regression")


def parse_fractions(text: str | list[float]) -> list[float]:
    """"0.01,0.1,1" -> [0.01, 0.1, 1.0]; each in (0, 1], sorted, no repeats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        fractions = [float(f) for f in items]
    except ValueError:
        raise ConfigError(f"--fractions: {text!r} is not a comma-separated list of numbers") from None
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad or not fractions:
        raise ConfigError(f"--fractions: each fraction must be in (0, 1], got {text}")
    return sorted(set(fractions))


def crossover(n_train: list[int], deep: list[float], baseline: list[float]) -> int | None:
    """The first training-set size from which the deep model's mean beats the baseline's at every
    larger size as well; None when it does not within the range."""
    for i in range(len(n_train)):
        if all(d > b for d, b in zip(deep[i:], baseline[i:])):
            return n_train[i]
    return None


def learning_curve(recipe: str, fractions=FRACTIONS, seeds: int = 3, baselines=BASELINES,
                   overrides: list[str] | None = None, out: str | None = None, min_steps: int = 200) -> Path:
    """Train `recipe` and fit `baselines` at each fraction and seed; returns the output folder."""
    from nnlab.analysis.baselines import BASELINES as KNOWN
    from nnlab.analysis.baselines import fit_and_score
    from nnlab.tasks import make_task
    from nnlab.train.loop import train

    fractions = parse_fractions(fractions)
    if seeds < 1:
        raise ConfigError(f"--seeds: need at least 1, got {seeds}")
    if min_steps < 1:
        raise ConfigError(f"--min-steps: need at least 1, got {min_steps}")
    baselines = list(baselines.split(",") if isinstance(baselines, str) else baselines)
    unknown = [b for b in baselines if b not in KNOWN]
    if unknown:
        raise ConfigError(f"--baselines: unknown {', '.join(unknown)} (choose from {', '.join(KNOWN)})")
    overrides = list(overrides or [])
    cfg = load_config(recipe, overrides=overrides)
    if not make_task(cfg).classification:
        raise ConfigError(f"learning-curve: {recipe} is not a classification recipe (it plots test accuracy)")
    out_dir = _out_dir(out, cfg.recipe)

    n_train, values = [], {cfg.recipe: [], **{b: [] for b in baselines}}
    for f in fractions:
        row = {name: [] for name in values}
        for seed in range(seeds):
            run_overrides = [*overrides, f"data.train_fraction={f}", f"data.split_seed={seed}", f"train.seed={seed}"]
            task = make_task(load_config(recipe, overrides=run_overrides))
            x_tr, y_tr, x_te, y_te = task.arrays()
            if task.total_steps() < min_steps:
                run_overrides.append(f"train.max_steps={min_steps}")
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # one line per run instead of a training log
                run_dir = train(recipe, run_overrides, out=str(out_dir / "learning-curve" / f"f{f:g}-s{seed}"))
            row[cfg.recipe].append(runfolder.read_json(run_dir / runfolder.SUMMARY)["test_accuracy"])
            line = [f"fraction {f:g} ({len(y_tr):,} examples), seed {seed}: {cfg.recipe} {row[cfg.recipe][-1]:.4f} "
                    f"({time.perf_counter() - t0:.0f} s)"]
            for b in baselines:
                r = fit_and_score(b, x_tr, y_tr, x_te, y_te, classification=True, seed=seed)
                row[b].append(r["test_accuracy"])
                line.append(f"{b} {r['test_accuracy']:.4f}")
            print(", ".join(line), flush=True)
        n_train.append(len(y_tr))
        for name, v in row.items():
            values[name].append(v)

    models = {name: {"deep": name == cfg.recipe, "mean": [float(np.mean(v)) for v in vals],
                     "std": [float(np.std(v)) for v in vals], "values": vals} for name, vals in values.items()}
    deep_mean = models[cfg.recipe]["mean"]
    cross = {}
    for b in baselines:
        n = crossover(n_train, deep_mean, models[b]["mean"])
        cross[b] = {"n_train": n, "text": f"{cfg.recipe} overtakes {b} from {n:,} training examples" if n is not None
                    else f"{cfg.recipe} does not overtake {b} within {n_train[0]:,}-{n_train[-1]:,} examples"}
    from nnlab.info import machine_info

    result = {"recipe": cfg.recipe, "data": cfg.data.name, "metric": "test_accuracy", "fractions": fractions,
              "n_train": n_train, "seeds": list(range(seeds)), "deep": cfg.recipe, "min_steps": min_steps,
              "overrides": overrides, "models": models, "crossover": cross, "machine": machine_info(),
              "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    runfolder.write_json(out_dir / runfolder.LEARNING_CURVE, result)
    plot(result, out_dir / runfolder.LEARNING_CURVE_PLOT)
    for c in cross.values():
        print(c["text"])
    print(f"wrote {out_dir / runfolder.LEARNING_CURVE} and {runfolder.LEARNING_CURVE_PLOT}")
    return out_dir


def _out_dir(out: str | None, recipe: str) -> Path:
    """--out may name a run folder of the recipe (the report then shows the curve beside the run),
    an empty or new folder; never a folder whose learning curve would be overwritten unasked."""
    if out is None:
        return runfolder.new_run_dir(None, f"{recipe}-learning-curve")
    path = Path(out)
    blocker = runfolder.file_in_the_way(path)
    if blocker is not None:
        raise NnlabError(f"--out {path}: {blocker} is a file, not a folder")
    if (path / runfolder.LEARNING_CURVE).exists() or (path / "learning-curve").exists():
        raise NnlabError(f"--out {path}: already holds a learning curve; choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def plot(result: dict, path: Path) -> None:
    """Mean test accuracy against training examples (log scale), a band of one standard deviation
    over seeds, and a dotted line where the deep model overtakes each baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.array(result["n_train"])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, m in result["models"].items():
        mean, std = np.array(m["mean"]), np.array(m["std"])
        line, = ax.plot(n, mean, marker="o", lw=2.5 if m["deep"] else 1.5, label=name + (" (deep)" if m["deep"] else ""))
        ax.fill_between(n, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    at: dict[int, list[str]] = {}  # one line per size, naming every baseline overtaken there
    for name, c in result["crossover"].items():
        if c["n_train"] is not None:
            at.setdefault(c["n_train"], []).append(name)
    for n_cross, names in at.items():
        ax.axvline(n_cross, ls=":", color="gray")
        ax.annotate(f"overtakes {', '.join(names)}", (n_cross, ax.get_ylim()[0]), rotation=90, va="bottom",
                    ha="right", fontsize=8, color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("training examples")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{result['recipe']} on {result['data']}: mean and spread over {len(result['seeds'])} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    runfolder.atomic_write_bytes(path, buf.getvalue())

"""Train shipped recipes end to end and print what each reaches against its target.

The accuracy / loss targets of the core issue live here, not in timed unit tests:

    python benchmarks/recipes.py [RECIPE ...] [--set KEY=VALUE ...] [--out runs/bench] [--json results.json]

Each line names the processor, precision and wall time, so figures from different machines are
never mixed up. seed-cnn is also compared with the plain PyTorch loop of benchmarks/plain_cnn.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common import output_file, trained_or_reused
from nnlab.config import load_config
from nnlab.errors import NnlabError
from nnlab.runfolder import atomic_write_text
from nnlab.train.precision import cpu_name, native_bf16

# recipe -> (metric, target, "ge" or "le"); mlp-regression is compared with scikit-learn instead.
TARGETS = {
    "seed-cnn": ("test_accuracy", None, "ge"),
    "seed-cnn-fast": ("test_accuracy", 0.91, "ge"),
    "cnn": ("test_accuracy", 0.93, "ge"),
    "vit": ("test_accuracy", 0.88, "ge"),
    "mlp-regression": ("test_mse", None, "le"),
    "mlp-tabular": ("test_accuracy", 0.95, "ge"),
    "gpt-shakespeare": ("val_loss", 1.90, "le"),
}


def sklearn_linear_mse(run_dir: Path) -> float:
    """scikit-learn's LinearRegression on exactly the split the run used."""
    from sklearn.linear_model import LinearRegression

    from nnlab.runfolder import read_config
    from nnlab.tasks import make_task

    task = make_task(read_config(run_dir))
    d = task.data
    pred = LinearRegression().fit(d.x_train.numpy(), d.y_train.numpy()).predict(d.x_test.numpy())
    return float(((torch.tensor(pred) - d.y_test) ** 2).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="recipes.py")
    p.add_argument("recipes", nargs="*", default=list(TARGETS))
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--json", type=output_file)
    a = p.parse_args(argv)
    unknown = [r for r in a.recipes if r not in TARGETS]
    if unknown:
        p.error(f"no target for recipe {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    try:  # bad overrides fail now, not after the first recipe's training
        for recipe in a.recipes:
            load_config(recipe, overrides=a.set)
    except NnlabError as e:
        p.exit(2, f"recipes.py: error: {e}\n")
    cpu = cpu_name()
    bf16 = native_bf16(torch.device("cpu"))[0]
    print(f"# torch {torch.__version__}, {cpu}, native bf16: {bf16}, threads {torch.get_num_threads()}")
    results = []
    for recipe in a.recipes:
        out = Path(a.out) / recipe
        s = trained_or_reused(recipe, a.set, out)
        metric, target, how = TARGETS[recipe]
        line = {"recipe": recipe, metric: round(s[metric], 4), "target": target, "steps": s["steps"],
                "train_seconds": s["train_seconds"], "precision": s["precision"], "cpu": cpu}
        if recipe == "mlp-regression":
            line["sklearn_linear_regression_mse"] = round(sklearn_linear_mse(out), 1)
        if target is not None:
            line["met"] = s[metric] >= target if how == "ge" else s[metric] <= target
        results.append(line)
        print(json.dumps(line), flush=True)
    if a.json:
        atomic_write_text(a.json, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

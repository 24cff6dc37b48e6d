"""The privacy-utility curve: dp-cnn's test accuracy at several privacy budgets epsilon.

    python benchmarks/privacy_utility.py [--epsilons 1 3 8] [--set KEY=VALUE ...] [--out runs/privacy-utility]
                                         [--json PATH] [--plot PATH]

Trains the dp-cnn recipe once per epsilon (the noise multiplier follows from it, everything else
stays as the recipe sets it) into OUT/eps<E>, and two references: clipping only (DP-SGD's
per-example clipping at C 0.1 and its Poisson batches, no noise: what clipping alone costs) into
OUT/clipping-only, and the same model trained without privacy into OUT/non-private, with a
learning rate of NON_PRIVATE_LR (the recipe's 4.0 is sized for gradients clipped to 0.1 and
diverges unclipped); a run whose summary.json already exists is read, not trained again, so an
interrupted sweep resumes and runs trained in parallel by hand are picked up. Writes the JSON
(epsilon asked for, epsilon spent by the RDP and PRV accountants, noise multiplier, test accuracy,
training seconds) and a PNG of accuracy against epsilon with Tramer & Boneh's published end-to-end
CNN figure marked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import output_file, trained_or_reused
from nnlab.errors import NnlabError
from nnlab.runfolder import atomic_write_text
from nnlab.train.precision import cpu_name

RECIPE = "dp-cnn"
NON_PRIVATE_LR = 0.1
PUBLISHED = {"epsilon": 3.0, "test_accuracy": 0.860, "source": "Tramer & Boneh (ICLR 2021), end-to-end CNN"}


def row(name: str, summary: dict) -> dict:
    p = summary.get("privacy") or {}
    return {"run": name, "noise": p.get("noise"), "target_epsilon": p.get("target_epsilon"),
            "epsilon_rdp": p.get("epsilon_rdp"),
            "epsilon_prv": p.get("epsilon_prv"), "noise_multiplier": p.get("noise_multiplier"),
            "test_accuracy": summary["test_accuracy"], "train_seconds": summary.get("train_seconds")}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = [r for r in rows if r["target_epsilon"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot([r["target_epsilon"] for r in private], [100 * r["test_accuracy"] for r in private], "o-", label="dp-cnn")
    for r, style in zip(rows[len(private):], ("--", ":")):
        ax.axhline(100 * r["test_accuracy"], ls=style, c="gray", label=r["run"])
    ax.plot([PUBLISHED["epsilon"]], [100 * PUBLISHED["test_accuracy"]], "k*", ms=10, label=PUBLISHED["source"])
    ax.set(xscale="log", xlabel="epsilon (delta 1e-5)", ylabel="test accuracy (%)",
           title="Fashion-MNIST: privacy against accuracy")
    ax.set_xticks([r["target_epsilon"] for r in private], [f"{r['target_epsilon']:g}" for r in private])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/privacy-utility")
    p.add_argument("--json", type=output_file)
    p.add_argument("--plot", type=output_file)
    a = p.parse_args(argv)
    out = Path(a.out)
    try:
        runs = {f"eps{e:g}": [f"train.privacy.epsilon={e}"] for e in a.epsilons}
        runs["clipping-only"] = ["train.privacy.noise=false"]
        runs["non-private"] = ["train.privacy.epsilon=null", f"train.lr={NON_PRIVATE_LR}"]
        rows = [row(name, trained_or_reused(RECIPE, [*a.set, *sets], out / name)) for name, sets in runs.items()]
    except NnlabError as e:
        print(f"privacy_utility.py: error: {e}", file=sys.stderr)
        return 2
    doc = {"recipe": RECIPE, "overrides": a.set, "processor": cpu_name(), "published": PUBLISHED, "runs": rows}
    for r in rows:
        prv = "failed" if r["epsilon_prv"] is None else f"{r['epsilon_prv']:.2f}"
        eps = r["run"] if r["target_epsilon"] is None else \
            f"epsilon {r['target_epsilon']:g} (RDP {r['epsilon_rdp']:.2f}, PRV {prv})"
        print(f"{r['run']:12s} {eps:40s} test accuracy {r['test_accuracy']:.2%}")
    json_path = a.json or out / "privacy_utility.json"
    atomic_write_text(json_path, json.dumps(doc, indent=1) + "\n")
    plot(rows, a.plot or out / "privacy_utility.png")
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Membership inference against a normal and a DP-SGD model of the same architecture.

    python benchmarks/privacy_audit.py [--out runs/privacy-audit] [--json privacy-audit.json]
                                       [--shadows K] [--samples N] [--set KEY=VALUE ...] [--quick]

Trains the `dp-cnn` recipe twice, as shipped (DP-SGD at epsilon 3) and with privacy off (the same
tanh CNN and schedule, no clipping or noise, SGD at lr 0.1 in place of 4.0), then runs `nnlab audit --attack all`
on each: the loss-threshold attack and LiRA (online and offline) with K shadow models of the run's
own recipe. Writes one JSON with each model's test accuracy, the epsilon it spent (RDP and PRV
accountants), and each attack's ROC AUC and TPR at 0.1% FPR, and prints them as a table. A run
folder that already holds a summary.json is reused, so an interrupted run resumes at its audits.

--quick is a smoke run (1,000 images, one epoch, 2 shadows, 200 candidates): its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import output_file, positive_int, trained_or_reused

from nnlab.analysis.audit import audit
from nnlab.config import load_config
from nnlab.errors import NnlabError
from nnlab.runfolder import atomic_write_text
from nnlab.train.precision import cpu_name

RECIPE = "dp-cnn"
# The one place this script names a privacy key: the normal model is the recipe with DP-SGD off.
PRIVACY_OFF = "train.privacy.epsilon=null"
# Unclipped gradients need a smaller step than the recipe's 4.0 (sized for gradients clipped to 0.1).
MODELS = {"normal": [PRIVACY_OFF, "train.lr=0.1"], "dp": []}
QUICK = ["data.limit=1000", "train.epochs=1", "train.batch_size=20", "train.privacy.delta=0.0001"]


def measure(name: str, sets: list[str], a) -> dict:
    """Train (or reuse) one model and audit it; its row of the results."""
    out = Path(a.out) / name
    summary = trained_or_reused(RECIPE, sets, out)
    start = time.perf_counter()
    given = {k: v for k, v in (("samples", a.samples), ("shadows", a.shadows)) if v is not None}
    result = audit(out, attack="all", **given)  # nnlab audit's defaults for what is not given
    privacy = summary.get("privacy") or {}
    return {"run": str(out), "overrides": sets, "test_accuracy": summary["test_accuracy"],
            "train_seconds": summary["train_seconds"], "epsilon_rdp": privacy.get("epsilon_rdp"),
            "epsilon_prv": privacy.get("epsilon_prv"), "delta": privacy.get("delta"),
            "members": result["members"], "audit_seconds": round(time.perf_counter() - start, 1),
            "attacks": {k: {"auc": v["auc"], "tpr_at_0.1%_fpr": v["tpr_at_0.1%_fpr"],
                            "fpr_resolution": v["fpr_resolution"], **({"shadows": v["shadows"], "pool": v["pool"],
                                                                       "shadow_training": v["shadow_training"]}
                                                                      if "shadows" in v else {})}
                        for k, v in result["attacks"].items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="privacy_audit.py")
    p.add_argument("--out", default="runs/privacy-audit")
    p.add_argument("--json", type=output_file, default=Path("privacy-audit.json"))
    p.add_argument("--shadows", type=positive_int, help="LiRA's shadow models per audit (default: nnlab audit's)")
    p.add_argument("--samples", type=positive_int, help="candidates a side (default: nnlab audit's for LiRA)")
    p.add_argument("--set", action="append", default=[], help="an override for both models")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.shadows == 1:
        p.error("--shadows: LiRA needs at least 2 shadow models")
    if a.quick:
        a.set = QUICK + a.set
        a.shadows, a.samples = a.shadows or 2, a.samples or 200
    models = {name: sets + a.set for name, sets in MODELS.items()}
    try:  # bad overrides fail now, not after the first model's training
        for sets in models.values():
            load_config(RECIPE, overrides=sets)
    except NnlabError as e:
        p.exit(2, f"privacy_audit.py: error: {e}\n")
    cpu = cpu_name()
    print(f"# torch {torch.__version__}, {cpu}, threads {torch.get_num_threads()}")
    try:
        rows = {name: measure(name, sets, a) for name, sets in models.items()}
    except NnlabError as e:
        p.exit(2, f"privacy_audit.py: error: {e}\n")
    doc = {"command": " ".join(sys.argv), "quick": a.quick, "recipe": RECIPE, "torch": torch.__version__, "cpu": cpu,
           "threads": torch.get_num_threads(), "models": rows}
    atomic_write_text(a.json, json.dumps(doc, indent=2) + "\n")

    def eps(v):
        return "none" if v is None else f"{v:.2f}"

    print(f"{'model':<8} {'accuracy':>8} {'eps RDP':>8} {'eps PRV':>8}  " +
          "  ".join(f"{k + ' AUC':>17} {'TPR@0.1%':>8}" for k in ("loss", "lira", "lira_offline")))
    for name, r in rows.items():
        print(f"{name:<8} {r['test_accuracy']:>8.4f} {eps(r['epsilon_rdp']):>8} {eps(r['epsilon_prv']):>8}  " +
              "  ".join(f"{r['attacks'][k]['auc']:>17.4f} {r['attacks'][k]['tpr_at_0.1%_fpr']:>8.2%}"
                        for k in ("loss", "lira", "lira_offline")))
    print(f"# wrote {a.json}" + (" (--quick: a smoke run, its figures mean nothing)" if a.quick else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

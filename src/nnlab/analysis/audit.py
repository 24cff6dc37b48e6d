"""Membership inference: can an attacker tell the run's training examples from unseen ones?

    nnlab audit RUN_DIR [--attack loss|lira|all] [--shadows K] [--samples N] [--seed S]

The loss-threshold attack (Yeom et al., 2018): a model fits its training examples better than
examples it never saw, so "member if the loss is below a threshold" guesses membership. Members are
N of the run's own training examples (with the labels it trained on), non-members N test examples,
drawn at random from `seed`: a balanced set, where guessing scores an AUC of 0.5. Sweeping the
threshold over all scores gives the ROC curve; the audit reports its area (AUC) and, as Carlini et
al. (2022) argue an attack should be judged, the true-positive rate at a 0.1% false-positive rate:
how many members the attacker names with almost no false accusations. Below 1/N non-members the
rate cannot be resolved; `fpr_resolution` says where that floor is.

`--attack lira` runs the likelihood-ratio attack (nnlab.analysis.lira) on the same candidates: K
shadow models of the run's recipe trained on random halves of the pool (members + non-members),
scored online (IN and OUT shadows) and offline (OUT only). It trains K models, so it costs about K
trainings on N examples; `all` (the default) runs both attacks, since the loss attack alone
underrates what an attacker learns at low false-positive rates.

Writes RUN_DIR/audit.json and RUN_DIR/audit.png (the ROC on log axes); nothing else in the folder.
A DP-SGD run's summary (epsilon spent) is copied beside the attack's figures, so one file holds
both sides of the privacy question.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nnlab import runfolder
from nnlab.analysis.lira import DEFAULT_SHADOWS
from nnlab.errors import NnlabError

TARGET_FPR = 1e-3
DEFAULT_SAMPLES = 5000
DEFAULT_LIRA_SAMPLES = 2000  # LiRA trains each shadow on this many examples: it sets the attack's cost
ATTACKS = ("loss", "lira", "all")


def example_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """Each example's cross-entropy under `model` (in eval mode), in float64."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size]).double()
            out.append(F.cross_entropy(logits, y[i : i + batch_size], reduction="none").numpy())
    return np.concatenate(out) if out else np.zeros(0)


def roc_figures(member_scores: np.ndarray, non_member_scores: np.ndarray) -> dict:
    """AUC, TPR at TARGET_FPR and the curve itself, for scores where higher means "member"."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(non_member_scores))]
    scores = np.r_[member_scores, non_member_scores]
    fpr, tpr, _ = roc_curve(labels, scores)
    return {"auc": float(roc_auc_score(labels, scores)),
            "tpr_at_0.1%_fpr": float(tpr[fpr <= TARGET_FPR].max()),
            "fpr_resolution": 1 / len(non_member_scores),
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}


def loss_attack(model: torch.nn.Module, members: tuple, non_members: tuple) -> dict:
    """The loss-threshold attack on `model` for (x, y) members and non-members: roc_figures of the
    negated losses, with each side's mean loss."""
    member_loss, non_member_loss = example_losses(model.eval(), *members), example_losses(model.eval(), *non_members)
    return {"name": "loss threshold (Yeom et al., 2018)", "member_mean_loss": float(member_loss.mean()),
            "non_member_mean_loss": float(non_member_loss.mean()),
            **roc_figures(-member_loss, -non_member_loss)}  # lower loss: more likely a member


def lira_attack(run_dir: Path, cfg, model: torch.nn.Module, members: tuple, non_members: tuple, target_rows: int,
                shadows: int, seed: int, say=print) -> dict:
    """LiRA, online and offline, on `model` for (x, y) members and non-members: `shadows` shadow
    models of the run's config trained on random halves of members + non-members (the pool;
    `target_rows` is the size of the target's own training set). Returns {"lira": ..., "lira_offline":
    ...}, each roc_figures of its scores with how the shadows were made."""
    from nnlab.analysis import lira

    x, y = torch.cat([members[0], non_members[0]]), torch.cat([members[1], non_members[1]])
    masks = lira.in_masks(len(x), shadows, seed)
    shadow_phi, summaries = lira.train_shadows(run_dir / runfolder.CONFIG, cfg, x, y, masks, target_rows, seed, say)
    online, offline = lira.lira_scores(lira.logit_confidence(model, x, y), shadow_phi, masks)
    n = len(members[0])
    epsilons = [(s.get("privacy") or {}).get("epsilon_rdp") for s in summaries]
    recipe = {"shadows": shadows, "in_per_example": shadows // 2, "pool": len(x),
              "shadow_train_rows_mean": float(masks.sum(1).mean()), "variance": "global",
              "shadow_recipe": cfg.recipe, "shadow_training": lira.shadow_training(cfg, len(x) // 2, target_rows),
              "shadow_test_accuracy_mean": _mean([s.get("test_accuracy") for s in summaries]),
              "shadow_epsilon_rdp_mean": _mean(epsilons)}
    return {"lira": {"name": "LiRA online, IN and OUT shadows (Carlini et al., 2022)", **recipe,
                     **roc_figures(online[:n], online[n:])},
            "lira_offline": {"name": "LiRA offline, OUT shadows only (Carlini et al., 2022)", **recipe,
                             **roc_figures(offline[:n], offline[n:])}}


def _mean(values: list) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def _split_tensors(task) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if task.kind == "image":
        return task.x_train, task.data.y_train, task.x_test, task.data.y_test
    return task.x_train, task.y_train, task.x_test, task.data.y_test


def audit(run_dir, samples: int | None = None, seed: int = 0, attack: str = "all",
          shadows: int = DEFAULT_SHADOWS, say=print) -> dict:
    """Run membership-inference attacks (`attack`: loss, lira or all) on a finished classifier run;
    write audit.json and audit.png into it and return what audit.json holds. `say` receives one
    progress line per shadow model. Bad input (no run folder, no model, a language model or
    regressor, samples below 1, an unknown attack, fewer than 2 shadows) is an NnlabError before
    anything is written. `samples` defaults to DEFAULT_SAMPLES for the loss attack alone and to
    DEFAULT_LIRA_SAMPLES when LiRA runs."""
    from nnlab.tasks import make_task

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NnlabError(f"{run_dir}: no such run folder")
    if attack not in ATTACKS:
        raise NnlabError(f"--attack: {attack!r} is not one of {', '.join(ATTACKS)}")
    if samples is None:
        samples = DEFAULT_SAMPLES if attack == "loss" else DEFAULT_LIRA_SAMPLES
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise NnlabError(f"--samples: must be a positive number of examples, got {samples}")
    if isinstance(shadows, bool) or not isinstance(shadows, int) or shadows < 2:
        raise NnlabError(f"--shadows: LiRA needs at least 2 shadow models (one IN, one OUT per example), got {shadows}")
    cfg = runfolder.read_config(run_dir)
    model, info = runfolder.load(run_dir)
    if info.get("task") == "text" or not info.get("classes"):
        raise NnlabError(f"{run_dir}: audit attacks classifiers of images or tables; this run's model "
                         f"({info['model']['name']}) is not one")
    task = make_task(cfg)
    x_train, y_train, x_test, y_test = _split_tensors(task)
    n = min(samples, len(x_train), len(x_test))
    rng = np.random.default_rng(seed)
    members = torch.from_numpy(rng.choice(len(x_train), n, replace=False))
    non_members = torch.from_numpy(rng.choice(len(x_test), n, replace=False))

    start = time.perf_counter()
    member_xy, non_member_xy = (x_train[members], y_train[members]), (x_test[non_members], y_test[non_members])
    attacks = {}
    if attack in ("loss", "all"):
        attacks["loss"] = loss_attack(model, member_xy, non_member_xy)
    if attack in ("lira", "all"):
        attacks.update(lira_attack(run_dir, cfg, model, member_xy, non_member_xy, len(x_train), shadows, seed, say))
    summary = _summary(run_dir)
    result = {"run": str(run_dir), "model": info["model"]["name"], "members": n, "non_members": n, "seed": seed,
              "test_accuracy": summary.get("test_accuracy"), "privacy": summary.get("privacy"),
              "attacks": attacks}
    result["wall_s"] = round(time.perf_counter() - start, 3)
    runfolder.atomic_write_bytes(run_dir / runfolder.AUDIT_PLOT, _plot(result))
    result["written"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    runfolder.write_json(run_dir / runfolder.AUDIT, result)  # last: its presence means the plot is whole
    return result


def _summary(run_dir: Path) -> dict:
    path = run_dir / runfolder.SUMMARY
    return runfolder.read_json(path) if path.exists() else {}


def _plot(result: dict) -> bytes:
    """The ROC of each attack on log-log axes, where the low-FPR regime that matters is visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1 / (2 * result["non_members"])
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=110)
    for key, attack in result["attacks"].items():
        fpr, tpr = np.maximum(attack["roc"]["fpr"], floor), np.maximum(attack["roc"]["tpr"], floor)
        ax.plot(fpr, tpr, lw=2, label=f"{key}: AUC {attack['auc']:.3f}, "
                                      f"TPR {attack['tpr_at_0.1%_fpr']:.3%} at 0.1% FPR")
    ax.plot([floor, 1], [floor, 1], ls="--", color="gray", label="chance")
    ax.axvline(TARGET_FPR, ls=":", color="gray")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    eps = (result.get("privacy") or {}).get("epsilon_rdp")
    title = f"{result['model']}: membership inference, {result['members']} members vs {result['non_members']} not"
    ax.set_title(title + (f"\nDP-SGD, epsilon {eps:.2f}" if eps is not None else ""), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def format_result(result: dict) -> str:
    """What `nnlab audit` prints: one line per attack, then the files written."""

    def num(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = [(f"{result['model']}: {result['members']} members (training examples) vs {result['non_members']} "
              f"non-members (test examples); test accuracy {num(result['test_accuracy'])}")]
    privacy = result.get("privacy")
    if privacy:
        lines.append(f"DP-SGD run: epsilon {num(privacy['epsilon_rdp'])} (RDP), {num(privacy['epsilon_prv'])} (PRV) "
                     f"at delta {privacy['delta']:g}" if privacy["noise"] else "DP-SGD run without noise (no privacy)")
    for attack in result["attacks"].values():
        if "member_mean_loss" in attack:
            how = (f"mean loss {attack['member_mean_loss']:.4f} members, "
                   f"{attack['non_member_mean_loss']:.4f} non-members")
        else:
            how = f"{attack['shadows']} shadows on halves of a pool of {attack['pool']}"
        lines.append(f"{attack['name']}: AUC {attack['auc']:.4f}, TPR {attack['tpr_at_0.1%_fpr']:.2%} at 0.1% FPR "
                     f"(resolution {attack['fpr_resolution']:.2g}); {how}")
    lines.append(f"wrote {runfolder.AUDIT}, {runfolder.AUDIT_PLOT}")
    return "\n".join(lines)

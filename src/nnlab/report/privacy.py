"""The report's privacy section: what a DP-SGD run spent (summary.json's "privacy" entry) and what
`nnlab audit` found (audit.json + audit.png). Absent files leave the section saying which command
makes them; a malformed audit.json becomes a warning in the section. A run with neither (trained
without DP, never audited) gets no privacy section."""

from __future__ import annotations

from nnlab.errors import NnlabError
from nnlab.report import figures
from nnlab.report.analyses import read_contract
from nnlab.report.page import Section, absent, figure, num, p, table
from nnlab.report.sections import Run
from nnlab.runfolder import AUDIT, AUDIT_PLOT, SUMMARY, read_json


def _spent(run: Run):
    summary = run.dir / SUMMARY
    try:
        return read_json(summary).get("privacy") if summary.exists() else None
    except (NnlabError, AttributeError):
        return None


def shows_privacy(run: Run) -> bool:
    return (run.dir / AUDIT).exists() or isinstance(_spent(run), dict)


def privacy_section(run: Run) -> Section:
    s = Section("privacy", "Privacy: DP-SGD budget and membership inference")
    spent = _spent(run)
    if isinstance(spent, dict):
        if spent.get("noise"):
            s.add(p(f"Trained with DP-SGD: epsilon {num(spent.get('epsilon_rdp'))} (RDP accountant), "
                    f"{num(spent.get('epsilon_prv'))} (PRV) at delta {num(spent.get('delta'))}; noise multiplier "
                    f"{num(spent.get('noise_multiplier'))}, clipping norm {num(spent.get('max_grad_norm'))}, Poisson "
                    f"sampling rate {num(spent.get('sample_rate'))} over {num(spent.get('steps'))} steps."))
            if spent.get("epsilon_prv_failed"):
                s.warn(spent["epsilon_prv_failed"])
        else:
            s.add(p("Trained with per-example clipping but no noise: no privacy guarantee (the clipping baseline)."))
    else:
        s.add(p("Trained without differential privacy (set train.privacy.epsilon to train with DP-SGD)."))
    path = run.dir / AUDIT
    if not path.exists():
        return s.add(absent("membership-inference audit", f"nnlab audit {run.dir}"))
    doc = read_contract(path, {"attacks": dict, "members": int}, s)
    if doc is None:
        return s
    plot = run.dir / AUDIT_PLOT
    if plot.exists():
        try:
            s.add(figure(figures.file_uri(plot), f"{AUDIT_PLOT}: ROC of each attack on log axes"))
        except NnlabError as e:
            s.warn(f"{e}; the figure is left out")
    rows = [[a.get("name", key), a.get("auc"), a.get("tpr_at_0.1%_fpr"), a.get("member_mean_loss"),
             a.get("non_member_mean_loss")] for key, a in doc["attacks"].items() if isinstance(a, dict)]
    s.add(p(f"{num(doc['members'])} members (training examples) against {num(doc.get('non_members'))} "
            f"non-members (test examples); an AUC of 0.5 is chance."))
    s.add(table(["attack", "ROC AUC", "TPR at 0.1% FPR", "member loss", "non-member loss"], rows,
                numeric={1, 2, 3, 4}))
    lira = doc["attacks"].get("lira")
    if isinstance(lira, dict) and "shadows" in lira:
        s.add(p(f"LiRA: {num(lira['shadows'])} shadow models of {lira.get('shadow_recipe')} "
                f"({lira.get('shadow_training')}), each trained on about half of a pool of {num(lira.get('pool'))} "
                f"(the members and non-members above), so each candidate is IN {num(lira.get('in_per_example'))} "
                f"of them; Gaussians with per-example means and {lira.get('variance')} variances."))
    return s

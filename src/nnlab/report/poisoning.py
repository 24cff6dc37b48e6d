"""The report's backdoor section: the attack success rate training recorded (summary.json) and what
`nnlab detect-poison` flagged (detect_poison.json), class by class. A backdoored run that was never
checked says which command checks it; a malformed detect_poison.json becomes a warning. A run with
neither a backdoor nor a detect_poison.json gets no section."""

from __future__ import annotations

from nnlab.report.analyses import read_contract
from nnlab.report.page import Section, absent, num, p, table
from nnlab.report.sections import Run
from nnlab.runfolder import DETECT_POISON


def shows_poisoning(run: Run) -> bool:
    return (run.dir / DETECT_POISON).exists() or run.summary.get("attack_success_rate") is not None


def _pct(v) -> str:
    return "—" if not isinstance(v, (int, float)) else f"{100 * v:.1f}%"


def poisoning_section(run: Run) -> Section:
    s = Section("poisoning", "Tampered training data: backdoor and its detection")
    asr = run.summary.get("attack_success_rate")
    if asr is not None:
        s.add(p(f"Test accuracy {_pct(run.summary.get('test_accuracy'))} on clean test images; attack success rate "
                f"{_pct(asr)}: the triggered test images of the other classes that the model calls the target."))
    path = run.dir / DETECT_POISON
    if not path.exists():
        return s.add(absent("poison detection", f"nnlab detect-poison {run.dir}"))
    doc = read_contract(path, {"method": str, "poison": dict, "overall": dict, "per_class": list}, s)
    if doc is None:
        return s
    poison = doc["poison"]
    budget = (f"; each class flags its rows at or above the {num(1 - doc['eps_multiplier'] * doc['expected'], '.3g')} "
              f"quantile of their scores (E = {num(doc['expected'], '.3g')}, {doc.get('expected_source')})"
              if isinstance(doc.get("expected"), (int, float)) and isinstance(doc.get("eps_multiplier"), (int, float))
              else "")
    s.add(p(f"{doc['method']} on the {doc.get('features', 'penultimate features')}; "
            + (f"{num(poison.get('rows'))} training images were poisoned (rate {num(poison.get('rate'))}, target class "
               f"{poison.get('target')}, trigger {poison.get('trigger')})" if poison.get("rows")
               else "the run was not poisoned, so every flag is a false alarm") + budget + "."))
    rows = [[f"{r.get('class')} {r.get('name', '')}", r.get("rows"), r.get("poisoned"), r.get("flagged"),
             _pct(r.get("precision")), _pct(r.get("recall"))] for r in doc["per_class"] if isinstance(r, dict)]
    o = doc["overall"]
    rows.append(["all", o.get("rows"), o.get("poisoned"), o.get("flagged"), _pct(o.get("precision")),
                 _pct(o.get("recall"))])
    s.add(table(["class", "rows", "poisoned", "flagged", "precision", "recall"], rows, numeric={1, 2, 3, 4, 5}))
    return s

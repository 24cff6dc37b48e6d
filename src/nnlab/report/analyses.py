"""The report's sections built from the files other verbs write into the run folder (the formats
are the issue-21 contract): baselines.json, learning_curve.json + .png, explain/METHOD.json with
its .png or .html; attack/METHOD.json with its two .png files; and export.json (`nnlab export`).

A file that is absent leaves its section saying which command makes it; a file that is corrupt or
does not follow its format becomes a visible warning in its section (and a printed one), and the
report is still written from everything else.
"""

from __future__ import annotations

from pathlib import Path

from nnlab.errors import NnlabError
from nnlab.report import figures
from nnlab.report.page import REMOTE_REF, Section, absent, embedded_page, esc, figure, num, p, plural, table
from nnlab.report.sections import Run, lower_is_better
from nnlab.runfolder import (ATTACK_DIR, BASELINES, EXPLAIN_DIR, EXPORT, LEARNING_CURVE, LEARNING_CURVE_PLOT,
                             read_json)

PREDICTIONS_SHOWN = 32


def require(doc, path: Path, keys: dict[str, type]) -> dict:
    """doc, if it is an object holding `keys` with values of the given types; else a one-line error."""
    if not isinstance(doc, dict):
        raise NnlabError(f"{path}: not in its format (expected a JSON object)")
    for key, tp in keys.items():
        if not isinstance(doc.get(key), tp):
            raise NnlabError(f"{path}: not in its format (no {key!r} of type {tp.__name__})")
    return doc


def read_contract(path: Path, keys: dict[str, type], s: Section) -> dict | None:
    """A contract file, or None with a warning in section s saying why it cannot be shown."""
    try:
        return require(read_json(path), path, keys)
    except NnlabError as e:
        s.warn(f"{e}; this part of the report is left out")
        return None


# ---- baselines ---------------------------------------------------------------------------------

def baselines_section(run: Run) -> Section:
    s = Section("baselines", "Traditional models beside this one")
    path = run.dir / BASELINES
    if not path.exists():
        s.made = False
        return s.add(absent("baselines.json", f"nnlab baselines --run {run.dir}"))
    doc = read_contract(path, {"metric": str, "rows": list}, s)
    if doc is None:
        return s
    metric = doc["metric"]
    try:
        rows = [require(r, path, {"model": str}) for r in doc["rows"]]
    except NnlabError as e:
        return s.warn(f"{e} in a row; this part of the report is left out")
    scored = [r for r in rows if isinstance(r.get(metric), (int, float))]
    scored.sort(key=lambda r: r[metric], reverse=not lower_is_better(metric))
    machine = doc.get("machine") or {}
    s.add(p(f"{doc.get('data', '?')}, {doc.get('task', '?')}: {num(doc.get('n_train'))} training and "
            f"{num(doc.get('n_test'))} test examples, {num(doc.get('n_features'))} features; best first by {metric}. "
            f"Timed on {machine.get('processor') or machine.get('cpu', '?')} with "
            f"{plural(machine.get('threads', '?'), 'thread')}, written {doc.get('written', '?')}."))
    columns = ["model", "estimator", metric, "fit s", "predict s (test split)", "latency ms (one sample)",
               "rows fitted", "note"]
    s.add(table(columns, [[r["model"], r.get("estimator", ""), r[metric], r.get("fit_s"), r.get("predict_s"),
                           r.get("latency_ms"), r.get("n_fit"), r.get("note") or ""] for r in scored],
                numeric={2, 3, 4, 5, 6}, row_classes=["deep" if r.get("deep") else "" for r in scored]))
    if len(scored) < len(rows):
        s.warn(f"{path}: {len(rows) - len(scored)} row(s) without {metric!r} are left out")
    if not any(r.get("deep") for r in scored):
        s.add(p(f"The deep model has no row in this file: `nnlab baselines --run {run.dir}` adds it.", "absent"))
    return s


# ---- learning curve ----------------------------------------------------------------------------

def learning_curve_section(run: Run) -> Section:
    s = Section("learning-curve", "Learning curve: the metric against training-set size")
    path = run.dir / LEARNING_CURVE
    if not path.exists():
        s.made = False
        return s.add(absent("learning curve", f"nnlab learning-curve {run.cfg.recipe or 'RECIPE'} --out {run.dir}"))
    doc = read_contract(path, {"n_train": list, "models": dict}, s)
    if doc is None:
        return s
    plot = run.dir / LEARNING_CURVE_PLOT
    if plot.exists():
        try:
            s.add(figure(figures.file_uri(plot), f"{LEARNING_CURVE_PLOT}: {doc.get('metric', 'the metric')} "
                                                 "against training examples, mean and spread over seeds"))
        except NnlabError as e:
            s.warn(f"{e}; the figure is left out")
    else:
        s.warn(f"{plot}: missing; the table below holds its figures")
    crossovers = doc.get("crossover") or {}
    if isinstance(crossovers, dict) and crossovers:
        items = []
        for name, c in crossovers.items():
            c = c if isinstance(c, dict) else {}
            text = c.get("text") or (f"{doc.get('deep', 'the deep model')} overtakes {name} from "
                                     f"{c['n_train']:,} training examples" if isinstance(c.get("n_train"), int)
                                     else f"{doc.get('deep', 'the deep model')} never stays ahead of {name}")
            items.append(f"<li>{esc(text)}</li>")
        s.add(f"<ul>{''.join(items)}</ul>")
    n_train = doc["n_train"]
    rows = []
    for name, m in doc["models"].items():
        mean, std = (m.get("mean") or []), (m.get("std") or [])
        cells = [f"{a:.4f} ± {b:.4f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else num(a)
                 for a, b in zip(mean, std + [None] * len(mean))]
        rows.append([name + (" (deep)" if m.get("deep") else ""), *cells])
    s.add(table(["model \\ training examples", *[f"{n:,}" if isinstance(n, int) else str(n) for n in n_train]], rows,
                row_classes=["deep" if m.get("deep") else "" for m in doc["models"].values()]))
    s.add(p(f"{doc.get('metric', 'metric')}: mean ± std over seeds {doc.get('seeds', '?')}."))
    return s


# ---- explanations ------------------------------------------------------------------------------

def explain_section(run: Run) -> Section:
    s = Section("explanations", "Explanations")
    folder = run.dir / EXPLAIN_DIR
    docs = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not docs:
        s.made = False
        return s.add(absent("explanations", f"nnlab explain {run.dir}"))
    for path in docs:
        doc = read_contract(path, {"method": str}, s)
        if doc is not None:
            s.add(*one_explanation(run, path, doc, s))
    return s


def one_explanation(run: Run, path: Path, doc: dict, s: Section) -> list[str]:
    method = doc["method"]
    parts = [f"<h3>{esc(method)}</h3>",
             p(f"{doc.get('model', run.cfg.model.name)}: {doc.get('samples', '?')} test samples explained "
               f"({EXPLAIN_DIR}/{path.name}).")]
    sanity = doc.get("sanity")
    if isinstance(sanity, dict):
        words = (f"sanity check ({sanity.get('test', 'model randomization')}): score {num(sanity.get('score'))} "
                 f"against threshold {num(sanity.get('threshold'))}")
        if sanity.get("passed") is False:
            parts.append(f'<p class="fail">FAILED {esc(words)}: the attributions barely change when the trained '
                         f"weights are replaced by random ones, so this map does not show what the model learned.</p>")
            s.warn(f"{method}: failed its sanity check")
        else:
            parts.append(f'<p class="ok">Passed {esc(words)}.</p>')
    delta = doc.get("convergence_delta")
    if isinstance(delta, list) and delta and all(isinstance(d, (int, float)) for d in delta):
        parts.append(p(f"Integrated gradients' convergence delta (Captum: the attributions' sum minus "
                       f"F(input) - F(baseline); near 0 when the path integral is well approximated): "
                       f"max |delta| {max(abs(d) for d in delta):.3g}, mean |delta| "
                       f"{sum(abs(d) for d in delta) / len(delta):.3g} over {len(delta)} samples."))
    elif method == "integrated-gradients":
        s.warn(f"{path}: no convergence_delta for integrated gradients")
    files = doc.get("files") or [f"{EXPLAIN_DIR}/{path.stem}{ext}" for ext in (".png", ".html")
                                 if (path.with_suffix(ext)).exists()]
    for name in files:
        parts.extend(embedded_file(run.dir, str(name), method, s))
    indices, pred, true = doc.get("indices"), doc.get("predicted"), doc.get("true")
    if isinstance(indices, list) and isinstance(pred, list) and isinstance(true, list) and len(indices) == len(pred) == len(true):
        shown = list(zip(indices, pred, true))[:PREDICTIONS_SHOWN]
        parts.append(table(["test index", "predicted", "true"], [list(r) for r in shown], numeric={0}))
    return parts


def embedded_file(run_dir: Path, name: str, method: str, s: Section) -> list[str]:
    """One file an explanation lists (a path inside the run folder): a PNG as an image, an HTML page
    in a sandboxed frame. A path outside the run folder, or a page that would load from the network,
    is not embedded."""
    path = (run_dir / name).resolve()
    if not path.is_relative_to(run_dir.resolve()):
        s.warn(f"{method}: {name} is outside the run folder; not embedded")
        return []
    try:
        if path.suffix == ".png":
            return [figure(figures.file_uri(path), f"{method}: {name}")]
        if path.suffix in (".html", ".htm"):
            page = path.read_text(encoding="utf-8")
            if REMOTE_REF.search(page):
                s.warn(f"{path}: loads from the network; not embedded (open it on its own)")
                return []
            return [embedded_page(page, f"{method}: {name}"), p(f"{name}, embedded above.")]
    except (OSError, UnicodeDecodeError) as e:
        s.warn(f"{path}: cannot read ({e}); not embedded")
        return []
    except NnlabError as e:
        s.warn(f"{e}; not embedded")
        return []
    s.warn(f"{path}: neither .png nor .html; not embedded")
    return []


# ---- export ------------------------------------------------------------------------------------

def export_section(run: Run) -> Section:
    """export.json (`nnlab export`): the ONNX files and how well onnxruntime agrees with PyTorch."""
    s = Section("export", "Export: ONNX for onnxruntime")
    path = run.dir / EXPORT
    doc = read_contract(path, {"files": dict, "bytes": dict, "check": dict}, s)
    if doc is None:
        return s
    check = doc["check"]
    rows = []
    for kind, name in doc["files"].items():
        c = check.get(kind) or {}
        rows.append([kind, name, doc["bytes"].get(kind), c.get("top1_agreement"), c.get("accuracy"),
                     c.get("max_abs_diff"), c.get("method", "")])
    cache = {False: " The language model is exported without a KV cache."}.get(doc.get("kv_cache"), "")
    s.add(p(f"Checked against PyTorch on {check.get('data', '?')}.{cache}"),
          table(["precision", "file", "bytes", "top-1 agreement with PyTorch", "accuracy", "largest difference",
                 "quantization"], rows, numeric={2, 3, 4, 5}))
    return s


# ---- adversarial inputs ------------------------------------------------------------------------

def attack_section(run: Run) -> Section:
    """attack/METHOD.json (from `nnlab attack`): accuracy against eps, the guard, the two figures."""
    s = Section("attack", "Adversarial inputs")
    folder = run.dir / ATTACK_DIR
    docs = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not docs:
        s.made = False
        return s.add(absent("adversarial attacks", f"nnlab attack {run.dir}"))
    for path in docs:
        doc = read_contract(path, {"method": str, "eps": list, "accuracy": list, "clean_accuracy": float}, s)
        if doc is None:
            continue
        method = doc["method"]
        label = ("FGSM" if method == "fgsm" else
                 f"PGD-{doc.get('steps', '?')}, {plural(doc.get('restarts', 1), 'restart')}")
        s.add(f"<h3>{esc(label)}</h3>",
              p(f"{doc.get('model', '?')}: {doc.get('samples', '?')} test images attacked in pixel space (L-infinity), "
                f"clean accuracy {num(doc['clean_accuracy'])} ({ATTACK_DIR}/{path.name})."),
              table(["eps", "eps x 255", "accuracy"],
                    [[e, round(e * 255, 2) if isinstance(e, (int, float)) else e, a]
                     for e, a in zip(doc["eps"], doc["accuracy"])], numeric={0, 1, 2}))
        g = doc.get("guard")
        if isinstance(g, dict) and isinstance(g.get("checks"), list):
            failed = [c for c in g["checks"] if isinstance(c, dict) and not c.get("passed")]
            for c in failed:
                s.warn(f"{method}: gradient-masking guard failed {c.get('check')}: {c.get('detail')}")
            words = "; ".join(f"{c.get('check')}: {c.get('detail')}" for c in g["checks"] if isinstance(c, dict))
            s.add(f'<p class="{"fail" if failed else "ok"}">Gradient-masking guard on {esc(g.get("samples", "?"))} '
                  f'images {"FAILED" if failed else "passed"}: {esc(words)}.</p>')
        for name in doc.get("files") or []:
            s.add(*embedded_file(run.dir, str(name), method, s))
    return s

"""The report's sections about the run itself: its config and data, its training curves beside the
recipe's reference curve, what the model does on the test split, and what it costs to run.

Each function returns a page.Section; a missing or unreadable input becomes a warning in its section,
never an exception, so the rest of the report is still written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nnlab.config import Config, load_config
from nnlab.errors import NnlabError
from nnlab.recipes import reference_curve
from nnlab.report import evaluation, figures
from nnlab.report.page import Section, code, esc, figure, num, p, plural, pre, table
from nnlab.runfolder import CONFIG

RECORD_KEYS = {"event", "step", "time", "train_seconds"}  # a metrics.jsonl record's keys that are not metrics
# Model fields the data sets (classes, vocabulary, input size): not a difference from the reference's recipe.
DATA_FIELDS = {"in_channels", "image_size", "num_classes", "vocab_size", "in_features", "out_features"}
MISTAKES_SHOWN = 16
SAMPLE = {"max_new_tokens": 300, "temperature": 0.8, "top_k": 200, "seed": 1337}  # nnlab generate's options


@dataclass
class Run:
    """What the report reads from a finished run folder, read once."""

    dir: Path
    cfg: Config
    info: dict  # model.json
    summary: dict  # summary.json ({} when unreadable: a warning says so)
    records: list[dict]  # metrics.jsonl, one dict per readable line
    warnings: list[str] = field(default_factory=list)  # about the files above


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or "mse" in metric


# ---- config and data ---------------------------------------------------------------------------

def config_section(run: Run, task, task_error: str | None) -> Section:
    s = Section("config", "Run, config and data")
    summ, prov = run.summary, run.info.get("provenance", {})
    metrics = {k: v for k, v in summ.items() if k.startswith(("test_", "val_"))}
    rows = [["recipe", run.cfg.recipe or "—"], ["model", f"{run.cfg.model.name} ({run.info.get('task')} task)"],
            ["parameters", num(summ.get("params"))], ["optimizer steps", num(summ.get("steps"))],
            *[[f"final {k}", num(v)] for k, v in metrics.items()],
            ["precision", summ.get("precision", "—")], ["seed", run.cfg.train.seed],
            ["nnlab / torch", f"{prov.get('nnlab', '—')} / {prov.get('torch', '—')}"],
            ["git commit", prov.get("git_commit") or "—"]]
    s.add(table(None, rows))
    s.add("<h3>Data</h3>")
    if task is None:
        s.warn(f"the data could not be loaded, so the sections that evaluate the model are left out: {task_error}")
        s.add(p(f"data.name {run.cfg.data.name}"))
    else:
        s.add(p(describe_data(task, run.info)))
    s.add(f"<h3>The resolved config</h3><details><summary>{esc(CONFIG)}: every key, defaults included</summary>"
          + pre((run.dir / CONFIG).read_text(encoding="utf-8")) + "</details>")
    return s


def describe_data(task, info: dict) -> str:
    d = task.cfg.data
    if task.kind == "text":
        return (f"{d.path}: {len(task.data.train):,} training and {len(task.data.val):,} validation tokens "
                f"({d.tokenizer} tokenizer, vocabulary of {task.data.tokenizer.vocab_size}).")
    n_train, n_test = task.num_train(), len(task.x_test)
    if task.kind == "image":
        shape = "x".join(map(str, task.x_test.shape[1:]))
        return (f"{d.name}: {n_train:,} training and {n_test:,} test images of {shape}, "
                f"{len(info.get('classes', []))} classes: {', '.join(map(str, info.get('classes', [])))}.")
    target = info.get("target", "the target")
    return (f"{d.name}: {n_train:,} training and {n_test:,} test rows, {task.x_test.shape[1]} features "
            f"({', '.join(map(str, info.get('features', [])))}), predicting {target}.")


# ---- training curves ---------------------------------------------------------------------------

def last_per_step(records: list[dict], event: str) -> list[dict]:
    """A run's records of one event in step order; after a resume, the later record of a step wins."""
    by_step = {r["step"]: r for r in records if r.get("event") == event and isinstance(r.get("step"), int)}
    return [by_step[k] for k in sorted(by_step)]


def curves_section(run: Run) -> Section:
    s = Section("curves", "Training curves")
    train = [r for r in last_per_step(run.records, "train") if isinstance(r.get("loss"), (int, float))]
    evals = last_per_step(run.records, "eval")
    metrics = sorted({k for r in evals for k, v in r.items() if k not in RECORD_KEYS and isinstance(v, (int, float))})
    if not train and not evals:
        s.made = False
        return s.add(p("metrics.jsonl holds no training or evaluation records.", "absent"))
    try:
        ref = reference_curve(run.cfg.recipe)
    except NnlabError as e:
        ref = None
        s.warn(str(e))
    rows = [("training loss", [(r["step"], r.get("train_seconds"), r["loss"]) for r in train],
             ref_points(ref["train_loss"], "loss") if ref else None)]
    for m in metrics:
        rows.append((m, [(r["step"], r.get("train_seconds"), r[m]) for r in evals if m in r],
                     ref_points(ref.get("eval", {}).get(m, []), m) if ref else None))
    s.add(figure(figures.png_uri(figures.training_curves(rows, ref)),
                 "Loss and evaluation metrics against step and against training seconds (evaluations "
                 "excluded), from metrics.jsonl" + (", with the recipe's reference curve" if ref else "")))
    if ref is None:
        s.add(p(f"No reference curve for recipe {run.cfg.recipe!r}: "
                f"`python benchmarks/curves.py {run.cfg.recipe} --seeds 0 1 2` writes one "
                f"(nnlab/recipes/curves/), for shipped recipes.", "absent"))
    else:
        s.add(on_track(evals, metrics, ref), config_differences(run.cfg, ref))
    return s


def ref_points(points: list[dict], key: str) -> list[tuple]:
    return [(q["step"], q.get("train_seconds", {}).get("mean"), q[key]["mean"], q[key]["min"], q[key]["max"])
            for q in points if key in q]


def on_track(evals: list[dict], metrics: list[str], ref: dict) -> str:
    """Per metric: the run's last evaluation held against the reference's evaluation nearest in step."""
    lines = []
    for m in metrics:
        points = ref.get("eval", {}).get(m)
        mine = [r for r in evals if m in r]
        if not points or not mine:
            continue
        last = mine[-1]
        q = min(points, key=lambda q: abs(q["step"] - last["step"]))
        if abs(q["step"] - last["step"]) > 0.1 * last["step"]:  # too far apart in training to compare
            steps = ", ".join(f"{x['step']:,}" for x in points[:6]) + (", ..." if len(points) > 6 else "")
            lines.append(f"<li>{esc(m)} at step {last['step']:,}: <strong>{last[m]:.4g}</strong>; the reference "
                         f"evaluates at steps {steps}, none near it.</li>")
            continue
        v, spread = last[m], q[m]
        better = (lambda a, b: a < b) if lower_is_better(m) else (lambda a, b: a > b)
        verdict = ("within the reference seeds' range" if spread["min"] <= v <= spread["max"]
                   else "better than every reference seed" if better(v, spread["mean"]) else "worse than every reference seed")
        lines.append(f"<li>{esc(m)} at step {last['step']:,}: <strong>{v:.4g}</strong>; the reference at step "
                     f"{q['step']:,}: mean {spread['mean']:.4g} [{spread['min']:.4g}-{spread['max']:.4g}] "
                     f"over seeds {esc(ref.get('seeds'))}: <strong>{verdict}</strong>.</li>")
    intro = (f"<p>Reference: recipe {code(ref.get('recipe'))}"
             + (f" with {code(' '.join(ref['overrides']))}" if ref.get("overrides") else " as shipped")
             + f", {esc(ref.get('precision'))} on {esc(ref.get('cpu'))} (torch {esc(ref.get('torch'))}); its seconds "
               "hold for that processor only.</p>")
    return intro + (f"<ul>{''.join(lines)}</ul>" if lines else "")


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_differences(cfg: Config, ref: dict) -> str:
    """The config keys where this run differs from the run the reference curve was made with."""
    try:
        ref_cfg = load_config(ref["recipe"], overrides=ref.get("overrides") or [])
    except NnlabError as e:
        return p(f"The reference's config cannot be rebuilt to compare with: {e}", "warning")
    mine, theirs = flat(cfg.to_dict()), flat(ref_cfg.to_dict())
    skip = {"description", *(f"model.{f}" for f in DATA_FIELDS)}
    diff = [[k, str(mine.get(k)), str(theirs.get(k))] for k in sorted(mine.keys() | theirs.keys())
            if k not in skip and mine.get(k) != theirs.get(k)]
    if not diff:
        return p("This run's config is the reference's: the curves are directly comparable.")
    return (p("This run's config differs from the reference's in these keys, so the curves compare only "
              "as far as these allow:") + table(["key", "this run", "reference"], diff))


# ---- the model on the test split ---------------------------------------------------------------

def classification_sections(run: Run, model, task) -> tuple[list[Section], dict]:
    """Test-set evaluation (confusion matrix, per-class accuracy), the most confident mistakes and
    calibration; and the evaluation's throughput for the efficiency section."""
    y = np.asarray(task.arrays()[3]).astype(np.int64)
    logits, seconds = evaluation.predict(model, task.x_test, task.cfg.train.eval_batch_size)
    probs = evaluation.softmax(logits)
    pred, conf = probs.argmax(1), probs.max(1)
    correct = pred == y
    k = probs.shape[1]
    classes = [str(c) for c in run.info.get("classes", range(k))]
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y, pred, labels=list(range(k)))
    acc = float(correct.mean())

    ev = Section("evaluation", "Test-set evaluation")
    logged = run.summary.get("test_accuracy")
    ev.add(p(f"Accuracy on the {len(y):,} test examples: {acc:.4f} ({int(correct.sum()):,} right)"
             + (f"; the run's final evaluation logged {logged:.4f}." if isinstance(logged, float) else ".")))
    ev.add(figure(figures.png_uri(figures.confusion_matrix(cm, classes)),
                  "Confusion matrix: rows the true class, columns the predicted one (counts; shade = fraction of the row)"))
    rows = []
    for i, name in enumerate(classes):
        off = cm[i].copy()
        off[i] = 0
        j = int(off.argmax())
        recall, precision = cm[i, i] / max(cm[i].sum(), 1), cm[i, i] / max(cm[:, i].sum(), 1)
        rows.append([name, int(cm[i].sum()), f"{recall:.3f}", f"{precision:.3f}",
                     f"{classes[j]} ({off[j]})" if off[j] else "—"])
    order = np.argsort([float(r[2]) for r in rows], kind="stable")
    ev.add("<h3>Per class, the hardest first</h3>", table(["class", "test examples", "accuracy (recall)", "precision", "most often taken for"],
                                       [rows[i] for i in order], numeric={1, 2, 3}))

    mistakes = Section("mistakes", "The most confident mistakes")
    idx = evaluation.confident_mistakes(probs, y, MISTAKES_SHOWN)
    if len(idx) == 0:
        mistakes.add(p("The model makes no mistake on the test split."))
    elif task.kind == "image":
        images = [image_for_display(task.data.x_test[i]) for i in idx]
        captions = [f"#{i}: {classes[pred[i]]}\n{conf[i]:.0%} sure\ntrue: {classes[y[i]]}" for i in idx]
        mistakes.add(figure(figures.png_uri(figures.image_grid(images, captions)),
                            f"The {len(idx)} wrong predictions made with the highest confidence: test index, "
                            "predicted class, its probability, true class"))
    else:
        mistakes.add(table(["test row", "predicted", "confidence", "true"],
                           [[int(i), classes[pred[i]], float(conf[i]), classes[y[i]]] for i in idx], numeric={0, 2}))

    cal = Section("calibration", "Calibration")
    bins = evaluation.calibration_bins(conf, correct)
    ece = evaluation.expected_calibration_error(conf, correct)
    gap = float(conf.mean()) - acc
    cal.add(p(f"Expected calibration error (ECE, {evaluation.ECE_BINS} equal-width confidence bins): {ece:.4f}. "
              f"Mean confidence {conf.mean():.4f} against accuracy {acc:.4f}: the model is "
              + ("over-confident" if gap > 0 else "under-confident") + f" by {abs(gap) * 100:.2f} points on average."))
    cal.add(figure(figures.png_uri(figures.reliability_diagram(bins, ece)),
                   "Reliability diagram: accuracy against confidence per bin; bars under the diagonal are over-confident"))
    cal.add(table(["confidence bin", "predictions", "accuracy", "mean confidence"],
                  [[f"({b['lo']:.3f}, {b['hi']:.3f}]", b["count"], b["accuracy"], b["confidence"]]
                   for b in bins if b["count"]], numeric={1, 2, 3}))
    return [ev, mistakes, cal], {"examples": len(y), "seconds": seconds}


def image_for_display(x: torch.Tensor) -> np.ndarray:
    """A uint8 (C, H, W) image as (H, W) grey or (H, W, 3) RGB floats in [0, 1]."""
    img = x.numpy().astype(np.float32) / 255.0
    return img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)


def regression_section(run: Run, model, task) -> tuple[Section, dict]:
    s = Section("regression", "Predicted against true")
    out, seconds = evaluation.predict(model, task.x_test, task.cfg.train.eval_batch_size)
    y_pred = out[:, 0] * run.info["y_std"] + run.info["y_mean"]  # back to the target's units
    y_true = np.asarray(task.arrays()[3], dtype=np.float64)
    mse = float(np.mean((y_pred - y_true) ** 2))
    r2 = 1 - mse / float(np.var(y_true))
    logged = run.summary.get("test_mse")
    target = run.info.get("target", "target")
    s.add(p(f"Test MSE on the {len(y_true):,} test rows: {mse:,.4g} in the target's units (the article's loss "
            f"1/(2N) sum (y - y*)^2 is half of it: {mse / 2:,.4g}); R^2 {r2:.4f}"
            + (f"; the run's final evaluation logged {logged:,.4g}." if isinstance(logged, float) else ".")))
    s.add(figure(figures.png_uri(figures.predicted_vs_true(y_true, y_pred, target)),
                 f"Predicted against true {target} on the test split; on the dashed line the prediction is exact"))
    return s, {"examples": len(y_true), "seconds": seconds}


def sample_section(run: Run, task) -> Section:
    """A sample from the language model, continuing the first line of the validation text."""
    from nnlab.generate import generate_text

    s = Section("sample", "A generated sample")
    tok = task.data.tokenizer
    # The first whole line of the validation text (the split may cut a line in two).
    lines = tok.decode(task.data.val[:400].tolist()).split("\n")
    prompt = next((line[:60] for line in lines[1:] if line.strip()), lines[0][:60]) or "\n"
    kw = SAMPLE
    text = generate_text(run.dir, prompt, **kw)
    s.add(p(f"The model continues the first whole line of the validation split, in bold ({kw['max_new_tokens']} new tokens, "
            f"temperature {kw['temperature']}, top_k {kw['top_k']}, seed {kw['seed']}; `nnlab generate` takes the "
            "same options):"), pre(text[len(prompt):], bold_prefix=prompt))
    return s


# ---- efficiency --------------------------------------------------------------------------------

def efficiency_section(run: Run, model, measured: dict | None) -> Section:
    s = Section("efficiency", "Efficiency")
    summ, machine = run.summary, run.summary.get("machine", {})
    rows = []
    if model is not None:
        rows.append(["parameters", f"{sum(p.numel() for p in model.parameters()):,}"])
        try:
            flops = evaluation.flops_per_sample(run.dir, run.info)
            if run.info["task"] == "text":
                t = run.info["model"]["block_size"]
                rows.append(["FLOPs per forward pass", f"{flops:,} per block of {t} tokens ({flops / t:,.0f} per token)"])
            else:
                rows.append(["FLOPs per forward pass", f"{flops:,} per sample"])
        except (NnlabError, RuntimeError, KeyError, ValueError) as e:
            s.warn(f"FLOPs not counted: {e}")
    unit = "tokens" if run.info.get("task") == "text" else "samples"
    rate = summ.get(f"{unit}_per_s")
    throughput = (f"{rate:,.0f} {unit}/s (steady state, after a first step of {summ.get('first_step_seconds')} s)"
                  if rate else "—")
    processor = (f"{machine.get('cpu', summ.get('cpu', '—'))}, threads: {machine.get('threads', '—')}"
                 + (f"; CUDA {', '.join(machine['cuda'])}" if machine.get("cuda") else ""))
    rows += [["training throughput", throughput],
             ["training time", f"{summ.get('train_seconds', '—')} s in {summ.get('steps', '—')} steps (evaluations excluded)"],
             ["precision", f"{summ.get('precision', '—')}: {summ.get('precision_reason', '')}"],
             ["processor", processor],
             ["CPU flags", ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in machine.get("cpu_flags", {}).items()) or "—"],
             ["nnlab kernels that ran", ", ".join(summ.get("kernels_used", [])) or "none"],
             ["processes (world size)", summ.get("world_size", "—")]]
    if measured:
        rate = measured["examples"] / measured["seconds"]
        rows.append(["test-set inference (this report)",
                     f"{rate:,.0f} {unit}/s fp32, batches of {run.cfg.train.eval_batch_size}, "
                     f"{plural(torch.get_num_threads(), 'thread')}, on this machine while writing the report"])
    s.add(table(None, rows))
    s.add(p("FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on one sample, with the model "
            "loaded with explicit=True: nnlab's CPU kernels are custom ops the counter cannot see, and the "
            "explicit path computes every convolution (unfold + matmul), dense layer and attention product as a "
            "matmul it counts. 2 FLOPs per multiply-add; element-wise work (activations, pooling, softmax, "
            "norms) is not counted. Training figures come from summary.json and hold for the processor named; "
            "the inference rate is measured now, on a CPU that may be shared."))
    return s

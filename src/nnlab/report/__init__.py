"""`nnlab report RUN_DIR`: everything known about a finished run, in one self-contained HTML page.

    from nnlab.report import build_report
    path = build_report("runs/cnn")          # writes runs/cnn/report.html and returns its path

The sections, each from the run folder alone:
  run, config and data      config.yaml, model.json, summary.json, the data the config names
  training curves           metrics.jsonl, beside the recipe's reference curve (nnlab/recipes/curves/)
  classification runs       the model re-evaluated on the test split: confusion matrix, per-class
                            accuracy, the most confident mistakes, calibration (ECE, reliability diagram)
  regression runs           predicted against true, test MSE
  language models           a generated sample
  baselines, learning curve, explanations
                            baselines.json, learning_curve.json + .png, explain/*.json + .png/.html
                            (the files `nnlab baselines`, `nnlab learning-curve`, `nnlab explain` write)
  tampered training data    summary.json's attack success rate, detect_poison.json (`nnlab detect-poison`)
  export                    export.json, where `nnlab export` wrote one: the ONNX files and their check
  efficiency                parameters, FLOPs per sample, throughput, processor and precision

A section whose file is absent says which command makes it. A folder that is not a finished run (no
config.yaml or model.json) is a NnlabError. A corrupt or malformed file is a warning, shown in its
section and printed to stderr, and the page is written from everything else: one bad analysis file
should not hide the rest of a run. Only report.html is written, atomically.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from nnlab.errors import NnlabError
from nnlab.report import analyses, page, sections
from nnlab.report.sections import Run
from nnlab.runfolder import (ATTACK_DIR, BASELINES, EXPORT, LEARNING_CURVE, METRICS, MODEL_INFO, REPORT,
                             SUMMARY, atomic_write_text, load, read_config, read_json)


def read_run(run_dir: str | Path) -> Run:
    """The files of a finished run folder; a NnlabError when it is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NnlabError(f"{run_dir}: {'not a folder' if run_dir.exists() else 'no such folder'}")
    cfg = read_config(run_dir)
    if not (run_dir / MODEL_INFO).exists():
        raise NnlabError(f"{run_dir}: no {MODEL_INFO}: not a finished run (let training end, or "
                         f"`nnlab train --resume {run_dir}`)")
    info = read_json(run_dir / MODEL_INFO)
    if not (isinstance(info, dict) and isinstance(info.get("model"), dict) and isinstance(info.get("task"), str)):
        raise NnlabError(f"{run_dir / MODEL_INFO}: corrupt (no model or task)")
    run = Run(run_dir, cfg, info, {}, [])
    try:
        summary = read_json(run_dir / SUMMARY)
        run.summary = summary if isinstance(summary, dict) else {}
    except NnlabError as e:
        run.warnings.append(f"{e}; training figures are left out")
    skipped = 0
    try:
        lines = (run_dir / METRICS).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        lines = []
        run.warnings.append(f"{run_dir / METRICS}: cannot read ({e}); no training curves")
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            run.records.append(record)
        elif line.strip():
            skipped += 1
    if skipped:
        run.warnings.append(f"{run_dir / METRICS}: {skipped} unreadable line(s) skipped")
    return run


def build_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.html from the run folder and return its path (see the module docstring)."""
    run = read_run(run_dir)
    task = model = measured = task_error = model_error = None
    try:
        from nnlab.tasks import make_task

        task = make_task(run.cfg)
    except NnlabError as e:
        task_error = str(e)
    try:
        model, _ = load(run.dir)
    except NnlabError as e:
        model_error = str(e)

    config = sections.config_section(run, task, task_error)
    config.warnings[:0] = run.warnings
    parts = [config, sections.curves_section(run)]
    kind = run.info["task"]
    if model is None or task is None:
        missing = page.Section("evaluation", "Test-set evaluation", made=False)
        if model_error:
            missing.warn(f"the model cannot be loaded, so nothing is evaluated: {model_error}")
        else:
            missing.add(page.p("Not evaluated: the data could not be loaded (see the first section).", "absent"))
        parts.append(missing)
    else:
        try:
            if kind == "text":
                parts.append(sections.sample_section(run, task))
            elif task.classification:
                evaluated, measured = sections.classification_sections(run, model, task)
                parts += evaluated
            else:
                evaluated, measured = sections.regression_section(run, model, task)
                parts.append(evaluated)
        except NnlabError as e:
            parts.append(page.Section("evaluation", "Evaluation").warn(f"the model could not be evaluated: {e}"))
    if kind != "text" or (run.dir / BASELINES).exists():
        parts.append(analyses.baselines_section(run))
    if kind != "text" or (run.dir / LEARNING_CURVE).exists():
        parts.append(analyses.learning_curve_section(run))
    parts.append(analyses.explain_section(run))
    if (run.dir / ATTACK_DIR).is_dir():  # shown once `nnlab attack` has run
        parts.append(analyses.attack_section(run))
    from nnlab.report.privacy import privacy_section, shows_privacy

    if shows_privacy(run):
        parts.append(privacy_section(run))
    from nnlab.report.poisoning import poisoning_section, shows_poisoning

    if shows_poisoning(run):  # a backdoored run, or one `nnlab detect-poison` has checked
        parts.append(poisoning_section(run))
    if (run.dir / EXPORT).exists():
        parts.append(analyses.export_section(run))
    parts.append(sections.efficiency_section(run, model, measured))

    from nnlab import __version__

    meta = f"{run.dir.resolve()}; written {time.strftime('%Y-%m-%d %H:%M:%S %z')} by nnlab {__version__}"
    html = page.render(f"nnlab report: {run.dir.resolve().name}", meta, parts)
    path = run.dir / REPORT
    try:
        atomic_write_text(path, html)
    except OSError as e:
        raise NnlabError(f"{path}: cannot write ({e.strerror or e})") from None
    for s in parts:
        for w in s.warnings:
            print(f"nnlab: warning: {s.title}: {w}", file=sys.stderr)
    return path


__all__ = ["build_report", "read_run"]

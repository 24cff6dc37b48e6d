"""The run folder: the one place every verb (train, eval, generate, ...) writes and reads.

    config.yaml         the fully resolved config
    metrics.jsonl       one JSON object per log / eval event
    tensorboard/        TensorBoard event files
    model.safetensors   the final weights
    model.json          everything needed to rebuild and use the model with no other file:
                        architecture, task, input normalisation, classes or tokenizer
    checkpoints/        training state for --resume (last.safetensors)
    summary.json        the final figures
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from nnlab.config import Config, build_config, dump_yaml, read_yaml
from nnlab.errors import NnlabError
from nnlab.train.checkpoint import atomic_write_text, load_tensors, save_tensors


def provenance() -> dict:
    """Versions and machine, recorded beside every artifact so a figure can be traced."""
    from nnlab import __version__
    from nnlab.train.precision import cpu_name

    commit = None
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                           text=True, timeout=5)
        commit = r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"nnlab": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "git_commit": commit, "cpu": cpu_name(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def file_in_the_way(path: Path) -> Path | None:
    """The file, if any, at path or above it that stops path from being made as a folder."""
    return next((d for d in (path, *path.parents) if d.exists() and not d.is_dir()), None)


def new_run_dir(out: str | None, recipe: str) -> Path:
    """A fresh run folder; refuses to write into a folder that already holds a run."""
    if out:
        path = Path(out)
        if (path / "config.yaml").exists():
            raise NnlabError(f"--out {path}: already holds a run; use `nnlab train --resume {path}` or another --out")
        # Checked now, not when the folder is made after data and model have loaded.
        blocker = file_in_the_way(path)
        if blocker is not None:
            raise NnlabError(f"--out {path}: {blocker} is a file, not a folder")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path("runs") / f"{recipe or 'run'}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = Path("runs") / f"{recipe or 'run'}-{stamp}-{n}"
    return path  # created by write_config, once data and model have loaded without error


def read_config(run_dir: str | Path) -> Config:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise NnlabError(f"{run_dir}: not a run folder (no config.yaml)")
    return build_config(read_yaml(run_dir / "config.yaml"))


def write_config(run_dir: Path, cfg: Config) -> None:
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as e:  # no permission, a full disk
        raise NnlabError(f"{run_dir}: cannot make the run folder ({e.strerror or e})") from None
    atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))


def save_model(run_dir: Path, weights: dict | nn.Module, model_cfg: dict, task_kind: str, meta: dict) -> None:
    """Publish the final model: weights (a module or its full state dict) + model.json."""
    if isinstance(weights, nn.Module):
        weights = weights.state_dict()
    info = {"model": model_cfg, "task": task_kind, **meta, "provenance": provenance()}
    save_tensors(run_dir / "model.safetensors", weights)
    atomic_write_text(run_dir / "model.json", json.dumps(info, indent=2))


def load(run_dir: str | Path, explicit: bool | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a trained model from its run folder alone: (model in eval mode, model.json contents)."""
    from nnlab.config import parse_model
    from nnlab.models import build_model, set_explicit

    run_dir = Path(run_dir)
    try:
        info = json.loads((run_dir / "model.json").read_text(encoding="utf-8"))
        model_section = info["model"]
    except FileNotFoundError:
        raise NnlabError(f"{run_dir}: no model.json (not a finished run folder?)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise NnlabError(f"{run_dir / 'model.json'}: corrupt ({e.__class__.__name__}: {e})") from None
    try:
        model = build_model(parse_model(model_section))
    except NnlabError as e:
        raise NnlabError(f"{run_dir / 'model.json'}: describes no buildable model ({e})") from None
    tensors, _ = load_tensors(run_dir / "model.safetensors")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise NnlabError(f"{run_dir / 'model.safetensors'}: does not fit model.json ({str(e).splitlines()[0]})") from None
    if explicit is not None:
        set_explicit(model, explicit)
    return model.eval(), info


def evaluate(run_dir: str | Path) -> dict:
    """Re-evaluate a saved model on its test (or validation) split; returns the metrics."""
    from nnlab.tasks import make_task

    cfg = read_config(run_dir)
    model, _ = load(run_dir)
    return make_task(cfg).evaluate(model, torch.device("cpu"))

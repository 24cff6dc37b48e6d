"""The run folder: the one place every verb (train, eval, generate, ...) writes and reads, and the
only module that knows its file names and formats.

    config.yaml                   the fully resolved config
    metrics.jsonl                 one JSON object per log / eval event
    tensorboard/                  TensorBoard event files
    model.safetensors             the final weights
    model.json                    everything needed to rebuild and use the model with no other
                                  file: architecture, task, input normalisation, classes or tokenizer
    checkpoints/last.safetensors  model, optimizer, RNG and step: what --resume needs
    summary.json                  the final figures

Written later by the analysis verbs, each from the run folder alone (none overwrites another's):

    baselines.json                `nnlab baselines --run`: traditional models beside this one
    learning_curve.json, .png     `nnlab learning-curve --out`: accuracy against training-set size
    explain/METHOD.json, .png     `nnlab explain`: attributions or attention maps (.html for text)
    attack/METHOD.json, .png      `nnlab attack`: accuracy under adversarial inputs against eps, and
    attack/METHOD-examples.png    clean and adversarial images with their predictions
    audit.json, audit.png         `nnlab audit`: membership inference against the model, its ROC
    detect_poison.json            `nnlab detect-poison`: training rows flagged as backdoored, scored
    report.html                   `nnlab report`: everything above, in one self-contained page
    model.onnx, model.int8.onnx   `nnlab export`: the model for onnxruntime (fp32, int8)
    export.json                   `nnlab export`: what was exported and how well it agrees

Security: weights and training state load only from safetensors, a format with no code in it. A
pickle or a zip-based `.pt` file offered as a checkpoint or model is refused by its first bytes
before anything parses it; nnlab never calls torch.load.

Crash safety: every file is written to a temporary name in the same folder, fsynced, then renamed
over the old one (rename is atomic on POSIX), so a process killed mid-write leaves the previous
file whole.
"""

from __future__ import annotations

import json
import os
import platform
import random
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from nnlab.config import Config, build_config, dump_yaml, nest_flat_keys, read_yaml
from nnlab.errors import NnlabError
from nnlab.train.distributed import Env

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
MODEL = "model.safetensors"
MODEL_INFO = "model.json"
CHECKPOINT = "checkpoints/last.safetensors"
SUMMARY = "summary.json"
BASELINES = "baselines.json"
LEARNING_CURVE = "learning_curve.json"
LEARNING_CURVE_PLOT = "learning_curve.png"
EXPLAIN_DIR = "explain"
ATTACK_DIR = "attack"
AUDIT = "audit.json"
AUDIT_PLOT = "audit.png"
DETECT_POISON = "detect_poison.json"
REPORT = "report.html"
ONNX_MODEL = "model.onnx"
ONNX_INT8_SUFFIX = ".int8.onnx"  # model.onnx -> model.int8.onnx
EXPORT = "export.json"

MAX_HEADER = 100 * 1024 * 1024  # a safetensors header larger than this is hostile or corrupt


# ---- atomic writes and safetensors I/O -----------------------------------------------------------

def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # the old file is untouched; leave no debris beside it
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    """An analysis result, written atomically (the file is whole or absent, never half-written)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> dict:
    """A JSON result file of a run folder; a missing or corrupt one is a one-line NnlabError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NnlabError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NnlabError(f"{path}: not valid JSON ({e})") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Write tensors (+ a JSON-able `meta` dict) to `path` atomically as safetensors."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        # safetensors refuses tensors that share storage (tied embeddings): store a copy.
        if v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    atomic_write_bytes(path, st_save(out, metadata={"nnlab": json.dumps(meta or {})}))


def check_safetensors(path: Path) -> bytes:
    """Read `path` and return its bytes if it is a safetensors file; otherwise a one-line NnlabError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NnlabError(f"{path}: no such file") from None
    except OSError as e:
        raise NnlabError(f"{path}: cannot read ({e.strerror})") from None
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else None
    if n is not None and n <= min(MAX_HEADER, len(data) - 8) and data[8:9] == b"{":
        return data
    # Sniff pickles only now: a real safetensors file starts with its header length, whose low
    # byte is 0x80 (or low bytes "PK") for 1 in 32 (1 in 8192) header sizes.
    if data[:2] == b"PK" or data[:1] == b"\x80":
        raise NnlabError(f"{path}: refused: a pickle/torch.save file, not safetensors (nnlab never unpickles)")
    if n is None:
        raise NnlabError(f"{path}: not a safetensors file (only {len(data)} bytes)")
    raise NnlabError(f"{path}: not a safetensors file (bad header)")


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the JSON metadata of a safetensors file written by save_tensors."""
    data = check_safetensors(path)
    try:
        tensors = st_load(data)
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        meta = json.loads(header.get("__metadata__", {}).get("nnlab", "{}"))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise NnlabError(f"{path}: corrupt safetensors file ({str(e).splitlines()[0][:120]})") from None
    return tensors, meta


# ---- config, model and summary -------------------------------------------------------------------

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
        if (path / CONFIG).exists():
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
    if not (run_dir / CONFIG).exists():
        raise NnlabError(f"{run_dir}: not a run folder (no {CONFIG})")
    return build_config(nest_flat_keys(read_yaml(run_dir / CONFIG)))


def write_config(run_dir: Path, cfg: Config) -> None:
    try:
        (run_dir / CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # no permission, a full disk
        raise NnlabError(f"{run_dir}: cannot make the run folder ({e.strerror or e})") from None
    atomic_write_text(run_dir / CONFIG, dump_yaml(cfg))


def full_model_state(model: nn.Module) -> dict:
    """The full (unsharded) model state dict on CPU; under FSDP a collective, empty on ranks > 0."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_model(run_dir: Path, weights: dict | nn.Module, model_cfg: dict, task_kind: str, meta: dict) -> None:
    """Publish the final model: weights (a module or its full state dict) + model.json."""
    if isinstance(weights, nn.Module):
        weights = weights.state_dict()
    info = {"model": model_cfg, "task": task_kind, **meta, "provenance": provenance()}
    save_tensors(run_dir / MODEL, weights)
    atomic_write_text(run_dir / MODEL_INFO, json.dumps(info, indent=2))


def load(run_dir: str | Path, explicit: bool | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a trained model from its run folder alone: (model in eval mode, model.json contents)."""
    from nnlab.config import parse_model
    from nnlab.models import build_model, set_explicit

    run_dir = Path(run_dir)
    try:
        info = json.loads((run_dir / MODEL_INFO).read_text(encoding="utf-8"))
        model_section = info["model"]
    except FileNotFoundError:
        raise NnlabError(f"{run_dir}: no {MODEL_INFO} (not a finished run folder?)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise NnlabError(f"{run_dir / MODEL_INFO}: corrupt ({e.__class__.__name__}: {e})") from None
    try:
        model = build_model(parse_model(model_section))
    except NnlabError as e:
        raise NnlabError(f"{run_dir / MODEL_INFO}: describes no buildable model ({e})") from None
    tensors, _ = load_tensors(run_dir / MODEL)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise NnlabError(f"{run_dir / MODEL}: does not fit {MODEL_INFO} ({str(e).splitlines()[0]})") from None
    if explicit is not None:
        set_explicit(model, explicit)
    return model.eval(), info


def write_summary(run_dir: Path, summary: dict) -> None:
    """summary.json: the run's final figures, followed by provenance()."""
    atomic_write_text(run_dir / SUMMARY, json.dumps({**summary, **provenance()}, indent=2))


# ---- checkpoints: everything --resume needs --------------------------------------------------------
# One safetensors file: the model's tensors as "model.<name>", the optimizer's as
# "optim/<parameter name>/<state name>", the torch RNG as "rng.torch" (and "rng.cuda"); in its JSON
# header the step counters, the optimizer's numbers and param_groups, the Python and NumPy RNGs and
# the resolved config. State dicts are full (gathered from every rank) and keyed by parameter name,
# so a checkpoint loads at any world size.

def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, env: Env, *,
                    step: int, bad_steps: int, train_seconds: float) -> None:
    """Write checkpoints/last.safetensors atomically (a collective under FSDP; rank 0 writes)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    # An optimizer without per-parameter state (SGD without momentum) has nothing to save; torch
    # would first run a zero-gradient step on it to create some.
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer.state else {"state": {}}
    if not env.is_main:
        return
    tensors = {f"model.{k}": v for k, v in model_sd.items()}
    numbers = {}
    for name, state in optim_sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"optim/{name}/{k}"] = v
            else:
                numbers[f"{name}/{k}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    meta = {"step": step, "bad_steps": bad_steps, "train_seconds": train_seconds,
            "optimizer": {"param_groups": optim_sd.get("param_groups", []), "scalars": numbers},
            "rng_python": _lists(random.getstate()), "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "config": cfg.to_dict()}
    save_tensors(run_dir / CHECKPOINT, tensors, meta)


def load_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    env: Env) -> tuple[int, int, float]:
    """Restore model, optimizer and RNGs from checkpoints/last.safetensors: (step, bad_steps, train_seconds)."""
    tensors, meta = load_tensors(run_dir / CHECKPOINT)
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    optim_sd = _optimizer_state(tensors, meta["optimizer"])
    # SGD without momentum keeps no per-parameter state: there is nothing to restore (its
    # hyperparameters come from the config, its lr is set every step), and torch's loader cannot
    # place an empty state on a device.
    stateless = not any(torch.is_tensor(v) for state in optim_sd["state"].values() for v in state.values())
    if env.world_size > 1:
        # Rank 0 scatters the full state into the shards (FSDP) or broadcasts it (DDP); the other
        # ranks pass empty dicts, so the collectives agree in size.
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        if not env.is_main:
            model_sd, optim_sd = {}, {"state": {}, "param_groups": []}
    else:
        opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=opts)
    if not stateless:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
        _state_like_parameters(optimizer)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    random.setstate(_tuples(meta["rng_python"]))
    s = meta["rng_numpy"]
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), *s[2:]))
    return meta["step"], meta["bad_steps"], meta["train_seconds"]


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The optimizer state dict keyed by parameter name, rebuilt from a checkpoint's entries."""
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            name, k = key[len("optim/"):].rsplit("/", 1)
            state.setdefault(name, {})[k] = v
    for key, v in meta["scalars"].items():
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _state_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Give each parameter's state (momentum, Adam's moments) its parameter's memory layout, as the
    optimizer does when it creates them. The file holds them contiguous, and fused AdamW on CPU walks
    a parameter and its state as flat arrays: a contiguous exp_avg beside a channels-last conv
    weight would pair different elements."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def _lists(x):
    return [_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x

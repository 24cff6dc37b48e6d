"""Safe, atomic checkpoints: tensors in safetensors, everything else as JSON in its header.

Security: weights and training state load only from safetensors, a format with no code in it.
A pickle or a zip-based `.pt` file offered as a checkpoint or model is refused by its first bytes
before anything parses it; nnlab never calls torch.load.

Crash safety: a file is written to a temporary name in the same folder, fsynced, then renamed over
the old one (rename is atomic on POSIX), so a process killed mid-write leaves the previous file
whole.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from nnlab.errors import NnlabError

MAX_HEADER = 100 * 1024 * 1024  # a safetensors header larger than this is hostile or corrupt


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


# --- optimizer state <-> flat tensors + JSON ------------------------------------------------------
# An optimizer state dict is {"state": {param_key: {name: tensor or number}}, "param_groups": [...]};
# param_key is an index (torch.optim) or a parameter's name (torch.distributed.checkpoint's
# full state dict, used for FSDP). Tensors go to safetensors as "optim/<param_key>/<name>".


def state_to_flat(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for key, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{key}/{k}"] = v
            else:
                scalars[f"{key}/{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "int_keys": _int_keys(sd)}


def state_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    conv = int if meta.get("int_keys") else str
    state: dict = {}
    for name, v in tensors.items():
        if name.startswith("optim/"):
            key, k = name[len("optim/"):].rsplit("/", 1)
            state.setdefault(conv(key), {})[k] = v
    for name, v in meta["scalars"].items():
        key, k = name.rsplit("/", 1)
        state.setdefault(conv(key), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _int_keys(sd: dict) -> bool:
    return all(isinstance(k, int) for k in sd["state"]) and all(
        isinstance(p, int) for g in sd["param_groups"] for p in g["params"])


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    return state_to_flat(opt.state_dict())


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    opt.load_state_dict(state_from_flat(tensors, meta))

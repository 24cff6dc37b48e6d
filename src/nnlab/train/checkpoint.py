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
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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
    if data[:2] == b"PK" or data[:1] == b"\x80":
        raise NnlabError(f"{path}: refused: a pickle/torch.save file, not safetensors (nnlab never unpickles)")
    if len(data) < 8:
        raise NnlabError(f"{path}: not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(MAX_HEADER, len(data) - 8) or data[8:9] != b"{":
        raise NnlabError(f"{path}: not a safetensors file (bad header)")
    return data


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

def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})

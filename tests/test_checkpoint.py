"""Checkpoints and saved models: nothing is ever unpickled, writes are atomic, tied weights and
optimizer state survive the round trip through safetensors."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

import nnlab
from nnlab import cli, runfolder
from nnlab.config import Config, TrainConfig
from nnlab.errors import NnlabError
from nnlab.models import build_model, model_config
from nnlab.runfolder import check_safetensors, load_tensors, save_model, save_tensors
from nnlab.train.distributed import Env
from nnlab.train.optim import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class OpenPayload:
    """Unpickling this creates `marker` with open() (no shell needed)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def hostile_files(tmp_path: Path, marker: Path) -> dict[str, bytes]:
    """Files that run code when unpickled: pickles of several protocols and a zip-based torch.save."""
    files = {
        "pickle-p4": pickle.dumps({"weight": Payload(marker)}, protocol=4),
        "pickle-p2-open": pickle.dumps(OpenPayload(marker), protocol=2),
        "pickle-p0": pickle.dumps(Payload(marker), protocol=0),  # starts with "c", not 0x80
    }
    pt = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": Payload(marker)}, pt)
    files["torch-save-zip"] = pt.read_bytes()
    assert files["torch-save-zip"][:2] == b"PK"
    return files


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


def test_the_payloads_are_live(tmp_path, marker):
    """Sanity check of the test itself: unpickling these files really does create the marker."""
    for name, data in hostile_files(tmp_path, marker).items():
        if name == "torch-save-zip":
            torch.load(tmp_path / "evil.pt", weights_only=False)
        else:
            pickle.loads(data)
        assert marker.exists(), name
        marker.unlink()


def tiny_mlp_run(folder: Path) -> Path:
    """A finished-looking run folder (model.json + model.safetensors) of a tiny MLP, built without training."""
    folder.mkdir()
    torch.manual_seed(0)
    fields = {"in_features": 3, "hidden": (4,), "out_features": 1}
    model = build_model("mlp", **fields)
    save_model(folder, model, {"name": "mlp", **fields}, "tabular", {})
    return folder


def test_load_refuses_pickles_offered_as_model_safetensors(tmp_path, marker):
    run = tiny_mlp_run(tmp_path / "run")
    assert nnlab.load(run)[0] is not None  # the folder is fine as built
    for name, data in hostile_files(tmp_path, marker).items():
        (run / "model.safetensors").write_bytes(data)
        with pytest.raises(NnlabError) as e:
            nnlab.load(run)
        msg = str(e.value)
        assert "\n" not in msg and "model.safetensors" in msg, msg
        if name != "pickle-p0":
            assert "refused" in msg and "pickle" in msg, msg
        else:
            assert "not a safetensors file" in msg, msg
        assert not marker.exists(), name


def test_resume_refuses_a_pickle_checkpoint(tmp_path, marker, csv_file, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = nnlab.train("mlp-regression", [f"data.path={csv_file}", "data.name=csv", "data.target=y",
                                         "train.epochs=2", "train.batch_size=32"], out=str(tmp_path / "run"))
    model_bytes = (run / "model.safetensors").read_bytes()
    summary = (run / "summary.json").read_text()
    ckpt = run / "checkpoints" / "last.safetensors"
    load_tensors(ckpt)  # a real checkpoint first
    for name, data in hostile_files(tmp_path, marker).items():
        ckpt.write_bytes(data)
        capsys.readouterr()
        rc = cli.main(["train", "--resume", str(run)])
        err = capsys.readouterr().err.strip()
        assert rc == 2, name
        assert len(err.splitlines()) == 1 and err.startswith("nnlab: error: ") and str(ckpt) in err, err
        if name != "pickle-p0":
            assert "refused" in err, err
        assert not marker.exists(), name
        # nothing was written over the finished run
        assert (run / "model.safetensors").read_bytes() == model_bytes
        assert (run / "summary.json").read_text() == summary


# ------------------------------------------------------------------------------------------------
# check_safetensors


def _header_file(path: Path, n: int, rest: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", n) + rest)
    return path


@pytest.mark.parametrize("kind", ["garbage", "short", "empty", "huge-header", "header-past-eof", "not-json-object",
                                  "over-max-header"])
def test_check_safetensors_rejects_bad_files(tmp_path, kind, monkeypatch):
    p = tmp_path / "x.safetensors"
    if kind == "garbage":
        p.write_bytes(bytes(range(7, 256)) * 40)
    elif kind == "short":
        p.write_bytes(b"\x01\x02\x03")
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "huge-header":  # a header "length" of 2^62: would be a giant allocation
        _header_file(p, 2**62, b"{}")
    elif kind == "header-past-eof":
        _header_file(p, 100, b'{"a": 1}')
    elif kind == "not-json-object":
        _header_file(p, 4, b"[1,]")
    else:  # a well-formed file whose header is larger than the limit
        save_tensors(p, {"w": torch.zeros(3)}, {"note": "x" * 200})
        check_safetensors(p)  # fine under the real limit
        monkeypatch.setattr(runfolder, "MAX_HEADER", 64)
    with pytest.raises(NnlabError) as e:
        check_safetensors(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(NnlabError):
        load_tensors(p)


def _save_padded(p: Path, k: int) -> int:
    """save_tensors with k bytes of metadata padding; returns the header length."""
    save_tensors(p, {"w": torch.arange(3.0)}, {"pad": "x" * k})
    return struct.unpack("<Q", p.read_bytes()[:8])[0]


def _saved_with_header_length(p: Path, n_want: int) -> None:
    """save_tensors to p with metadata padded until the header is exactly n_want bytes long."""
    start = max(0, n_want - _save_padded(p, 0) - 16)  # one padding byte adds one header byte
    for k in range(start, start + 32):
        if _save_padded(p, k) == n_want:
            return
    raise AssertionError(f"no padding gave a {n_want}-byte header")


def test_every_header_length_loads_back(tmp_path):
    """The first 8 bytes of a safetensors file are its header length: files whose length happens to
    start with byte 0x80 (the pickle protocol opcode) or "PK" (zip) are still safetensors files."""
    p = tmp_path / "x.safetensors"
    lows = set()
    for k in range(0, 264):  # the header is padded to 8 bytes: this covers all 32 low bytes
        _save_padded(p, k)
        lows.add(p.read_bytes()[0])
        got, meta = load_tensors(p)
        assert meta == {"pad": "x" * k} and torch.equal(got["w"], torch.arange(3.0))
    assert 0x80 in lows and len(lows) == 32
    _saved_with_header_length(p, 0x4B50)  # 19,280 bytes: the file starts with b"PK"
    assert p.read_bytes()[:2] == b"PK"
    assert torch.equal(load_tensors(p)[0]["w"], torch.arange(3.0))


def test_load_tensors_reports_a_corrupt_body(tmp_path):
    p = tmp_path / "x.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}'
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)  # body far shorter than declared
    check_safetensors(p)  # the header itself looks fine
    with pytest.raises(NnlabError, match="corrupt safetensors"):
        load_tensors(p)


def test_missing_file_is_an_nnlab_error(tmp_path):
    with pytest.raises(NnlabError, match="no such file"):
        load_tensors(tmp_path / "nope.safetensors")


# ------------------------------------------------------------------------------------------------
# atomic writes


def test_save_tensors_round_trip_with_meta(tmp_path):
    p = tmp_path / "a.safetensors"
    t = {"w": torch.randn(3, 4), "i": torch.arange(5), "b": torch.tensor([True, False])}
    save_tensors(p, t, {"step": 7, "nested": {"x": [1, 2]}})
    got, meta = load_tensors(p)
    assert meta == {"step": 7, "nested": {"x": [1, 2]}}
    assert got.keys() == t.keys() and all(torch.equal(got[k], t[k]) for k in t)


@pytest.mark.parametrize("call, why", [("replace", "simulated crash before the rename"), ("fsync", "disk full")])
def test_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch, call, why):
    p = tmp_path / "last.safetensors"
    save_tensors(p, {"w": torch.arange(6.0)}, {"step": 1})

    def crash(*args):
        raise OSError(why)

    monkeypatch.setattr(runfolder.os, call, crash)
    with pytest.raises(OSError, match=why):
        save_tensors(p, {"w": torch.full((1000,), 9.0)}, {"step": 2})
    monkeypatch.undo()
    got, meta = load_tensors(p)
    assert meta == {"step": 1} and torch.equal(got["w"], torch.arange(6.0))
    assert [f.name for f in tmp_path.iterdir()] == ["last.safetensors"]  # no temporary file left behind


def test_process_killed_mid_save_leaves_the_previous_file_whole(tmp_path):
    """A real process dies (SIGKILL) after writing the new bytes but before the rename."""
    p = tmp_path / "last.safetensors"
    save_tensors(p, {"w": torch.arange(6.0)}, {"step": 1})
    script = textwrap.dedent(f"""
        import os, signal, torch
        from nnlab import runfolder
        def die(src, dst):
            assert os.path.getsize(src) > 4_000_000  # the new file was fully written to the temp name
            os.kill(os.getpid(), signal.SIGKILL)
        runfolder.os.replace = die
        runfolder.save_tensors({str(p)!r}, {{"w": torch.ones(1_000_000)}}, {{"step": 2}})
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    got, meta = load_tensors(p)
    assert meta == {"step": 1} and torch.equal(got["w"], torch.arange(6.0))
    # the next save goes through and replaces it
    save_tensors(p, {"w": torch.ones(2)}, {"step": 3})
    assert load_tensors(p)[1] == {"step": 3}


# ------------------------------------------------------------------------------------------------
# tied weights


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return build_model("gpt", vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8).eval()


def test_tied_weights_round_trip_through_save_and_load_tensors(tmp_path):
    m = tiny_gpt()
    sd = m.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["tok_emb.weight"].data_ptr()
    save_tensors(tmp_path / "m.safetensors", sd)
    got, _ = load_tensors(tmp_path / "m.safetensors")
    assert got.keys() == sd.keys()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    m2 = tiny_gpt(seed=1)
    m2.load_state_dict(got)
    assert m2.lm_head.weight is m2.tok_emb.weight  # still one Parameter after loading
    idx = torch.randint(0, 11, (2, 8))
    with torch.no_grad():
        assert torch.equal(m2(idx), m(idx))


def test_tied_gpt_round_trips_through_a_run_folder(tmp_path):
    m = tiny_gpt()
    with torch.no_grad():  # make the tied matrix distinctive, so a half-loaded tie would show
        m.tok_emb.weight.mul_(3.0)
    run = tmp_path / "run"
    run.mkdir()
    fields = {f: getattr(m.cfg, f) for f in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")}
    save_model(run, m, {"name": "gpt", **fields}, "text",
               {"tokenizer": {"kind": "char", "chars": "abcdefghijk"}})
    loaded, info = nnlab.load(run)
    assert info["task"] == "text" and not loaded.training
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    assert torch.equal(loaded.tok_emb.weight, m.tok_emb.weight)
    idx = torch.randint(0, 11, (3, 8))
    with torch.no_grad():
        assert torch.equal(loaded(idx), m(idx))
    # the tie keeps working after loading: one update moves both uses
    with torch.no_grad():
        loaded.lm_head.weight[0, 0] = 42.0
    assert loaded.tok_emb.weight[0, 0].item() == 42.0


# ------------------------------------------------------------------------------------------------
# optimizer state through a checkpoint


def _conv_net(seed: int, channels_last: bool) -> torch.nn.Module:
    """Two input channels: with one, a channels-last conv weight holds its elements in the
    contiguous order, and a layout mix-up could not show."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3))
    return net.to(memory_format=torch.channels_last) if channels_last else net


def _step(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 2, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
    F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)  # as the loop does, so a checkpoint meets no gradients


# Every optimizer setting a recipe can have; plain SGD keeps no per-parameter state at all.
OPTIMIZERS = {"sgd": {"optimizer": "sgd", "momentum": 0.0},
              "sgd-momentum": {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.1},
              "adamw": {"optimizer": "adamw", "weight_decay": 0.1, "beta2": 0.99}}


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_checkpoint_restores_the_optimizer_exactly(tmp_path, name, channels_last):
    """The optimizers nnlab builds, saved in the checkpoint format and loaded into a fresh model and
    optimizer, take the next steps exactly as the originals do."""
    t = TrainConfig(lr=0.05, **OPTIMIZERS[name])
    a = _conv_net(0, channels_last)
    opt_a = make_optimizer(a, t)
    for s in range(3):
        _step(a, opt_a, s)
    (tmp_path / runfolder.CHECKPOINT).parent.mkdir()
    steps_taken = []
    hook = register_optimizer_step_post_hook(lambda *_: steps_taken.append(1))
    try:
        cfg = Config(model=model_config("seed-cnn"), train=t)
        runfolder.save_checkpoint(tmp_path, a, opt_a, cfg, Env(), step=3, bad_steps=0, train_seconds=1.5)
    finally:
        hook.remove()
    assert not steps_taken, "saving a checkpoint stepped the optimizer"
    _, meta = load_tensors(tmp_path / runfolder.CHECKPOINT)
    assert meta["config"]["train"]["optimizer"] == t.optimizer and json.dumps(meta)  # all of it plain JSON

    b = _conv_net(1, channels_last)  # different weights and a fresh optimizer...
    opt_b = make_optimizer(b, t)
    assert runfolder.load_checkpoint(tmp_path, b, opt_b, Env()) == (3, 0, 1.5)  # ... restored from disk

    c = _conv_net(1, channels_last)  # the control: same weights, optimizer state NOT restored
    c.load_state_dict(a.state_dict())
    opt_c = make_optimizer(c, t)

    for m, o in ((a, opt_a), (b, opt_b), (c, opt_c)):
        _step(m, o, 99)
        _step(m, o, 100)
    for (param, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), param
        assert pa.stride() == pb.stride(), param  # the restored model keeps its memory format
    if opt_a.state:
        assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters())), \
            "the control should differ, else this test could not see a lost optimizer state"


def test_atomic_write_replaces_a_file_whole_or_not_at_all(tmp_path, monkeypatch):
    """atomic_write_text (run folders and the benchmarks' results files) goes through a temporary
    file and a rename: when the write fails (here the rename), what was saved is still there, whole,
    and no temporary file is left."""
    path = tmp_path / "results.json"
    runfolder.atomic_write_text(path, '{"old": 1}')
    runfolder.atomic_write_text(path, '{"new": 2}')
    assert path.read_text() == '{"new": 2}'

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runfolder.os, "replace", fail)
    with pytest.raises(OSError):
        runfolder.atomic_write_text(path, '{"newer": 3}')
    assert path.read_text() == '{"new": 2}' and [p.name for p in tmp_path.iterdir()] == ["results.json"]

"""Shared fixtures: tiny data sets written to temporary folders, and a helper that runs the CLI.

The data are small enough that a whole training run takes a second or two on a shared CPU, and
are built here (never downloaded), so no test depends on a data set being installed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnlab import cli
from nnlab.data import write_idx
from nnlab.recipes import resolve_data_path

SHAKESPEARE = Path(resolve_data_path("tinyshakespeare.txt"))  # under the data root, where the recipes find it
N_TRAIN, N_TEST = 320, 100
CLI_TIMEOUT = 120


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28x28 uint8 images whose class is written in them: class c lights a 7x7 block at one of ten
    positions (plus a dim second block and noise), so a CNN learns it in a few dozen steps."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    rng.shuffle(y)
    x = rng.integers(0, 60, size=(n, 28, 28)).astype(np.int32)
    for i, c in enumerate(y):
        r, col = divmod(int(c), 4)  # 10 cells of a 3x4 grid of 7x7 blocks
        x[i, r * 7 + 2 : r * 7 + 9, col * 7 : col * 7 + 7] += 180
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.uint8)


def write_fmnist(folder: Path, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr = make_images(n_train, 0)
    x_te, y_te = make_images(n_test, 1)
    write_idx(folder / "train-images-idx3-ubyte.gz", x_tr, gzip=True)
    write_idx(folder / "train-labels-idx1-ubyte.gz", y_tr, gzip=True)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", x_te, gzip=True)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", y_te, gzip=True)
    return folder


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> Path:
    """A Fashion-MNIST-shaped folder: four gzip IDX files, 320 train / 100 test images."""
    return write_fmnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture
def fmnist_copy(tmp_path) -> Path:
    """A private copy of the fixture data set, for tests that damage a file."""
    return write_fmnist(tmp_path / "fmnist")


def sample_text(n_chars: int = 5000) -> str:
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text(encoding="utf-8")[:n_chars]
        if len(text) == n_chars:
            return text
    rng = np.random.default_rng(0)
    words = ["the", "king", "speak", "hear", "me", "citizen", "all", "we", "know", "rome", "bread", "first"]
    lines = ["First Citizen:"]
    while sum(len(s) + 1 for s in lines) < n_chars:
        lines.append(" ".join(rng.choice(words, size=8)).capitalize() + ".")
    return ("\n".join(lines))[:n_chars]


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """About 5 KB of text starting with "First Citizen:" (Tiny Shakespeare's opening when present)."""
    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    p.write_text(sample_text(), encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def csv_file(tmp_path_factory) -> Path:
    """200 rows of a,y,b with y = 3a - 2b + small noise (the target is not the last column)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200), rng.normal(size=200)
    y = 3 * a - 2 * b + 0.1 * rng.normal(size=200)
    p = tmp_path_factory.mktemp("csv") / "data.csv"
    p.write_text("a,y,b\n" + "".join(f"{ai:.6f},{yi:.6f},{bi:.6f}\n" for ai, yi, bi in zip(a, y, b)))
    return p


def cli_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "nnlab", *map(str, args)]


def cli_env() -> dict:
    # One thread: these models are tiny, and on a shared CPU a second OpenMP thread that has to
    # wait for a busy core made steps ~100x slower. Also fixes the thread count, and with it the
    # floating-point summation order, across the runs that a test compares bit for bit.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def single_thread():
    """Torch work in this process on one thread (see cli_env), the setting restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def module_one_thread():
    """one_thread for a module's fixtures: tiny runs trained once and shared by its tests."""
    with single_thread():
        yield


def train_quietly(recipe: str, sets: list[str], out: Path) -> Path:
    """A tiny run trained in this process on one thread, logging and evaluating only at its end."""
    import nnlab

    with single_thread():
        return nnlab.train(recipe, [*sets, "train.log_every=1000", "train.eval_every=1000"], out=str(out))


@pytest.fixture(scope="session")
def run_cli(tmp_path_factory):
    """run_cli(*args, cwd=None, timeout=...) -> CompletedProcess of `python -m nnlab ARGS`, output
    captured as text, run in a temporary folder (so a default runs/ folder never lands in the repo)."""
    default_cwd = tmp_path_factory.mktemp("cwd")

    def run(*args, cwd=None, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run(cli_cmd(*args), cwd=cwd or default_cwd, capture_output=True, text=True,
                              timeout=timeout, env=cli_env())

    return run


@pytest.fixture
def avx2_build(tmp_path_factory, monkeypatch):
    """Call it to make nnlab's kernels load a build for x86-64-v3, the code an AVX2-only CPU gets, from a
    cache folder of this session (built once, by the first test that asks); it checks that they did."""
    from nnlab.kernels import build

    cache = tmp_path_factory.getbasetemp() / "avx2-build-cache"

    def switch():
        monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
        monkeypatch.setenv("NNLAB_KERNELS_MARCH", "x86-64-v3")
        monkeypatch.setattr(build, "_state", {})
        assert build.status()["why"].startswith(f"built {cache}"), build.status()

    return switch


@pytest.fixture
def no_kernels(monkeypatch):
    """Call it to do what NNLAB_NO_KERNELS=1 does, inside this process: from then on (to the test's
    end) no kernel op applies, and every layer takes torch's functional path."""
    from nnlab import kernels

    def switch():
        for name in ("pool_applies", "conv_pool_applies", "attention_applies"):
            monkeypatch.setattr(kernels, name, lambda *a, **k: False)

    return switch


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def one_line_error(rc: int, err: str, *needles: str) -> str:
    """Exit code 2 and exactly one stderr line, `nnlab: error: ...`, naming every needle."""
    lines = err.strip().splitlines()
    assert rc == 2, f"exit {rc}, stderr: {err[-2000:]}"
    assert len(lines) == 1, f"expected one stderr line, got: {err[-2000:]}"
    assert lines[0].startswith("nnlab: error: "), lines[0]
    assert "Traceback" not in err
    for n in needles:
        assert str(n) in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def cli_main(capsys, tmp_path, monkeypatch):
    """cli_main(*args) -> (exit code, stdout, stderr) of `nnlab ARGS` run in this process (in tmp_path)."""
    monkeypatch.chdir(tmp_path)  # a default runs/ folder must never land in the repository

    def run(*args):
        capsys.readouterr()
        rc = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err

    return run

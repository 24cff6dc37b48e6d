"""Compile the C kernels on first use, load them with ctypes, and say what runs here.

Plain C needs no torch headers, so the library builds in seconds with the system's compiler into
the user's cache folder. The build is keyed by the sources, the flags and the CPU (it uses
-march=native), so a cache folder shared between machines never loads a binary built for another
processor. NNLAB_NO_KERNELS=1 switches the kernels off; NNLAB_KERNELS_MARCH=x86-64-v3 (say) builds
for another processor than this one, to time or test the code an AVX2-only CPU runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = [HERE / n for n in ("pool.c", "conv_pool.c", "winograd.c", "attention.c")]
HEADERS = [HERE / "simd.h"]
# -ffp-contract=fast: multiply-adds as FMAs (-std=c11 alone turns that off).
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
if platform.machine() in ("x86_64", "AMD64"):
    FLAGS.insert(2, "-mprefer-vector-width=512")  # gcc's default for AVX-512 CPUs is 256-bit vectors
OPS = ("pool2x2", "conv1_pool2x2", "conv3x3_pool2x2", "attention")
CONV_OPS = ("conv1_pool2x2", "conv3x3_pool2x2")  # vectors of the CPU's width: AVX2 or AVX-512 only

_state: dict = {}  # "lib": the loaded library or None, "why": the reason, "conv": conv kernels run here
_used: set[str] = set()


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def why_not_tried() -> str | None:
    """Why no build is attempted here (the switch, the platform, no compiler), or None: then the
    library must build, and a failure is a bug (tests/test_kernels.py holds it to that)."""
    if os.environ.get("NNLAB_NO_KERNELS"):
        return "NNLAB_NO_KERNELS is set"
    if platform.system() != "Linux" or not torch.backends.openmp.is_available():
        return "needs Linux and torch built with OpenMP"
    if compiler() is None:
        return "no C compiler found"
    return None


def _cpu_id() -> str:
    """The processor's name and feature flags: what -march=native compiles for."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    first = {}
    for line in lines:
        first.setdefault(line.split(":")[0].strip(), line)
    return first.get("model name", "") + first.get("flags", "")


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "nnlab" / "kernels"


def _compile_and_load() -> ctypes.CDLL:
    cc, flags = compiler(), FLAGS
    if os.environ.get("NNLAB_KERNELS_MARCH"):
        flags = [f.replace("-march=native", "-march=" + os.environ["NNLAB_KERNELS_MARCH"]) for f in FLAGS]
    src = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    key = hashlib.sha256(src + " ".join([cc, *flags, _cpu_id()]).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"kernels-{key}.so"
    try:
        return ctypes.CDLL(str(lib))
    except OSError:  # not built yet, or a damaged file: (re)build it
        pass
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # build beside, then rename: atomic
        out = Path(tmp) / lib.name
        subprocess.run([cc, *flags, *map(str, SOURCES), "-o", str(out), "-lm"], check=True, capture_output=True,
                       timeout=300)
        os.replace(out, lib)
    return ctypes.CDLL(str(lib))


def _declare(dll: ctypes.CDLL) -> None:
    """The C functions' argument and result types."""
    L, I, P, F = ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    for name in ("bf16", "f32"):
        getattr(dll, f"pool2x2_fwd_{name}").argtypes = [P, P, P, L, L, L, L, I, I]
        getattr(dll, f"pool2x2_bwd_{name}").argtypes = [P, P, P, L, L, L, L, I]
    dll.conv3x3_pool2x2_fwd.argtypes = [P, P, P, P, P, P, L, L, L, L, I, I, I]
    dll.conv3x3_pool2x2_bwd.argtypes = [P, P, P, P, P, L, L, L, L, I, I]
    dll.conv3x3_pool2x2_wgrad.argtypes = [P, P, P, P, P, L, L, L, L, L, I, I]
    dll.conv3x3_winograd.argtypes = [P, P, P, P, P, L, L, L, L, L, I, I, I]
    dll.attention_fwd.argtypes = [P, P, P, L, L, L, L, F, I, I, I]
    dll.attention_bwd.argtypes = [P, P, P, P, P, L, L, L, L, F, I, I, I]
    for fn in ("conv3x3_pool2x2_fwd", "conv3x3_pool2x2_wgrad", "conv3x3_winograd", "attention_fwd",
               "attention_bwd", "conv_kernels_native"):
        getattr(dll, fn).restype = I


def library() -> ctypes.CDLL | None:
    """The loaded library, built on first use; None (with the reason in status()) where it cannot be."""
    if "lib" in _state:
        return _state["lib"]
    _state.update(lib=None, conv=False, why=why_not_tried())
    if _state["why"] is None:
        try:
            dll = _compile_and_load()
            _declare(dll)
        except (OSError, AttributeError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e) or type(e).__name__
            detail = detail.decode(errors="replace") if isinstance(detail, bytes) else detail
            lines = detail.strip().splitlines()
            _state["why"] = f"build or load failed: {lines[0] if lines else type(e).__name__}"
            warnings.warn(f"nnlab's CPU kernels: {_state['why']}; running ATen's ops instead", stacklevel=2)
        else:
            _state.update(lib=dll, conv=bool(dll.conv_kernels_native()), why=f"built {dll._name}")
    return _state["lib"]


@torch.compiler.assume_constant_result
def built() -> bool:
    """Built and loaded. A constant to torch.compile, which cannot trace a compiler run or a ctypes load."""
    return library() is not None


@torch.compiler.assume_constant_result
def conv_native() -> bool:
    """Whether the conv kernels run here: built, on a CPU with AVX2 or AVX-512 (with narrower vectors
    they are slower than ATen's)."""
    return library() is not None and _state["conv"]


@contextlib.contextmanager
def switched_off():
    """Inside the block no kernel op applies and every layer takes torch's functional path: what
    NNLAB_NO_KERNELS=1 does for a whole process. For tracers that cannot see into a custom op (the
    ONNX exporter). Not thread-safe: it swaps this module's state for the whole process."""
    saved = dict(_state)
    _state.clear()
    _state.update(lib=None, conv=False, why="switched off (nnlab.kernels.switched_off)")
    try:
        yield
    finally:
        _state.clear()
        _state.update(saved)


def status() -> dict:
    """{"built": bool, "why": the library's path or why it is not built, "ops": {op: runs on this CPU}}."""
    library()
    ops = {op: _state["lib"] is not None and (op not in CONV_OPS or _state["conv"]) for op in OPS}
    why = _state["why"]
    if _state["lib"] is not None and not _state["conv"]:
        why += "; conv ops off: the CPU has neither AVX2 nor AVX-512"
    return {"built": _state["lib"] is not None, "why": why, "ops": ops}


def record(name: str) -> None:
    """Called by each op's real implementation: `name` ran in this process."""
    _used.add(name)


def used() -> list[str]:
    """The kernels that ran in this process, eager or compiled, sorted."""
    return sorted(_used)

"""`nnlab export`: a run's model as an ONNX file that onnxruntime runs, optionally also in int8.

What is exported is the model's functional torch path (model.explicit off, nnlab's CPU kernels
switched off: their torch.library ops have no ONNX translation), traced by torch.onnx.export's
dynamo exporter with a dynamic batch dimension. The example batch holds 2 rows because the
exporter specialises a dimension of size 1 into a constant. A language model is exported without
a KV cache: input `idx` (batch, seq) of token ids with seq from 1 to block_size, output the logits
of every position (batch, seq, vocab); generation reruns the whole context per token.

int8 (--quantize int8), with onnxruntime.quantization:
  convolutional nets: static quantization, QDQ format, per-channel weights, after quant_pre_process,
    activations calibrated (min-max) on CALIBRATION training images. reduce_range (7-bit weights)
    on CPUs without VNNI, whose u8*s8 multiply-add can saturate in 16 bits.
  everything else (mlp, vit, gpt): dynamic quantization of MatMul/Gemm weights; activations are
    quantized per batch at run time.

Before any file is written the export is checked against PyTorch: classifiers on the run's whole
test split (top-1 agreement, at least MIN_AGREEMENT in fp32, and accuracy of both), otherwise on
random inputs (largest logit difference). An export that fails or disagrees writes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnlab.errors import NnlabError

FORMATS = ("onnx",)
QUANTIZE = ("int8",)
CALIBRATION = 512  # training images that calibrate the int8 activations' ranges
MIN_AGREEMENT = 0.999  # fp32 ONNX vs PyTorch top-1 on the test split, below which the export failed
CHECK_BATCH = 1000


def _onnx_modules():
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise NnlabError(f"export needs onnx, onnxruntime and onnxscript ({e.name} is missing): "
                         f"pip install 'nnlab[export]'") from None
    return onnxruntime


def session(model, threads: int | None = None):
    """An onnxruntime CPU session for an ONNX file or its bytes, on `threads` threads (default:
    torch's thread count; onnxruntime ignores OMP_NUM_THREADS)."""
    ort = _onnx_modules()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    src = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def example_input(info: dict) -> tuple[torch.Tensor, dict]:
    """A 2-row example input for the model of `info` and its dynamic dimensions."""
    batch = torch.export.Dim("batch", min=1)
    if info["task"] == "text":
        block = info["model"]["block_size"]
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(0, info["model"]["vocab_size"], (2, min(block, 8)), generator=g)
        return idx, {0: batch, 1: torch.export.Dim("seq", min=1, max=block)}
    shape = info["input_shape"] if info["task"] == "image" else [len(info["features"])]
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)), {0: batch}


def to_onnx(model: nn.Module, info: dict) -> bytes:
    """The ONNX file of `model` (kernels and explicit paths off) as bytes; NnlabError if the exporter fails."""
    from nnlab import kernels
    from nnlab.models import set_explicit

    _onnx_modules()
    set_explicit(model, False)
    x, dims = example_input(info)
    names = (["idx"], ["logits"]) if info["task"] == "text" else (["x"], ["logits"])
    quiet = logging.getLogger("torch.onnx")  # it lists every torchvision op it skips
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)
        with warnings.catch_warnings(), kernels.switched_off(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=(dims,), input_names=names[0],
                                        output_names=names[1], verbose=False)
            return program.model_proto.SerializeToString()
    except Exception as e:  # noqa: BLE001 - any exporter failure is reported, nothing is written
        raise NnlabError(f"export: torch.onnx.export failed ({_cause(e)})") from None
    finally:
        quiet.setLevel(level)


def _cause(e: Exception) -> str:
    """One line for an exporter error: its "Exception summary" line when it has one (the first line
    is a generic banner), without terminal colours."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    if "## Exception summary" in lines and lines.index("## Exception summary") + 1 < len(lines):
        return lines[lines.index("## Exception summary") + 1][:300]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_vnni" in flags or " avx_vnni" in flags or " asimddp" in flags


def to_int8(fp32: bytes, model: nn.Module, calibration: np.ndarray | None) -> tuple[bytes, dict]:
    """The int8 model of the fp32 ONNX bytes (see the module docstring) and how it was made."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    static = is_convolutional(model)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src, pre, dst = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(fp32)
        with _quiet_logging():
            quant_pre_process(str(src), str(pre))
            if static:
                reduce_range = not cpu_has_vnni()
                batches = iter(np.array_split(calibration, max(1, len(calibration) // 64)))

                class Reader(CalibrationDataReader):
                    def get_next(self):
                        b = next(batches, None)
                        return None if b is None else {"x": b}

                quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8)
                how = {"method": "static QDQ, per-channel weights (s8), activations (u8) calibrated min-max",
                       "calibration_images": len(calibration), "reduce_range": reduce_range}
            else:
                quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8,
                                 op_types_to_quantize=["MatMul", "Gemm"])
                how = {"method": "dynamic: MatMul/Gemm weights s8, activations quantized per batch"}
        return dst.read_bytes(), how


@contextlib.contextmanager
def _quiet_logging():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime.quantization logs every node it skips
    try:
        yield
    finally:
        root.setLevel(level)


def is_convolutional(model: nn.Module) -> bool:
    """A CNN (convolutions and no attention): the kind that static int8 suits."""
    from nnlab.nn.layers import SelfAttention

    mods = list(model.modules())
    return any(isinstance(m, nn.Conv2d) for m in mods) and not any(isinstance(m, SelfAttention) for m in mods)


def run_onnx(sess, x: np.ndarray) -> np.ndarray:
    """Outputs of an onnxruntime session on x, in batches of CHECK_BATCH rows."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + CHECK_BATCH]})[0] for i in range(0, len(x), CHECK_BATCH)])


@torch.no_grad()
def run_torch(model: nn.Module, x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(x)
    return torch.cat([model(t[i:i + CHECK_BATCH]).float() for i in range(0, len(t), CHECK_BATCH)]).numpy()


def export(run_dir, format: str = "onnx", quantize: str | None = None, out=None) -> dict:
    """Export the model of `run_dir` to `out` (default RUN_DIR/model.onnx) and, with quantize="int8",
    an int8 model beside it (NAME.int8.onnx); check both against PyTorch (module docstring) and
    record what was done in RUN_DIR/export.json. Returns that record. An existing export is replaced
    atomically; any other existing file is never overwritten, and a failure writes nothing.
    export.json names the files of the latest export only (an older int8 file may sit beside them)."""
    from nnlab import runfolder

    if format not in FORMATS:
        raise NnlabError(f"--format: unknown format {format!r}; choose from {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise NnlabError(f"--quantize: unknown {quantize!r}; choose from {', '.join(QUANTIZE)}")
    run_dir = Path(run_dir)
    model, info = runfolder.load(run_dir, explicit=False)
    paths = {"fp32": Path(out) if out is not None else run_dir / runfolder.ONNX_MODEL}
    if quantize:
        paths["int8"] = paths["fp32"].with_name(paths["fp32"].name[:-len(".onnx")] + runfolder.ONNX_INT8_SUFFIX)
    for path in paths.values():
        if path.suffix != ".onnx":
            raise NnlabError(f"--out: {path}: an ONNX file's name ends in .onnx")
        if not path.parent.is_dir():
            raise NnlabError(f"--out: {path.parent}: no such folder")
    check, calibration = _check_data(run_dir, info, calibrate=bool(quantize) and is_convolutional(model))
    blobs = {"fp32": to_onnx(model, info)}
    record = {"format": "onnx", "task": info["task"], "model": info["model"]["name"], "files": {}, "bytes": {},
              "check": {"data": check["data"]}}
    if info["task"] == "text":
        record["kv_cache"] = False  # the full-sequence forward: idx (batch, seq <= block_size) -> logits
    record["check"]["fp32"] = _compare(blobs["fp32"], model, check, info)
    if quantize:
        blobs["int8"], how = to_int8(blobs["fp32"], model, calibration)
        record["check"]["int8"] = {**how, **_compare(blobs["int8"], model, check, info)}
    agreement = record["check"]["fp32"].get("top1_agreement")
    if agreement is not None and agreement < MIN_AGREEMENT:
        raise NnlabError(f"export: onnxruntime's top-1 agrees with PyTorch on only {agreement:.2%} "
                         f"of {check['data']} (at least {MIN_AGREEMENT:.1%} needed); nothing written")
    import onnx
    import onnxruntime
    record["versions"] = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    for kind, path in paths.items():
        runfolder.atomic_write_bytes(path, blobs[kind])
        inside = path.resolve().parent == run_dir.resolve()
        record["files"][kind], record["bytes"][kind] = path.name if inside else str(path.resolve()), len(blobs[kind])
    runfolder.write_json(run_dir / runfolder.EXPORT, record)
    return record


def _check_data(run_dir: Path, info: dict, calibrate: bool) -> tuple[dict, np.ndarray | None]:
    """The inputs the export is checked on ({"data", "xs", "y"}) and int8 calibration images: the
    run's own test and training splits where its data loads; random inputs otherwise, unless
    `calibrate` (static int8) needs the training images."""
    from nnlab.errors import DataError
    from nnlab.runfolder import read_config
    from nnlab.tasks import make_task

    if info["task"] == "text":
        block = info["model"]["block_size"]
        g = torch.Generator().manual_seed(0)
        lengths = (block, max(1, block // 3))
        xs = [torch.randint(0, info["model"]["vocab_size"], (4, t), generator=g).numpy() for t in lengths]
        return {"data": f"random token ids, 4 rows of {lengths[0]} and of {lengths[1]} tokens", "xs": xs}, None
    try:
        task = make_task(read_config(run_dir))
    except DataError as e:
        if calibrate:
            raise NnlabError(f"export: int8 calibration and the agreement check need the run's data ({e})") from None
        x, _ = example_input(info)
        xs = [torch.randn(64, *x.shape[1:]).numpy()]
        return {"data": "random inputs (the run's data did not load)", "xs": xs}, None
    x, y = task.x_test.numpy(), task.data.y_test.numpy()
    idx = torch.randperm(task.num_train(), generator=torch.Generator().manual_seed(0))[:CALIBRATION]
    calibration = task.x_train[idx].numpy()
    classes = getattr(task, "classification", True)
    return {"data": f"the test split ({len(x)} samples)", "xs": [x], "y": y if classes else None}, calibration


def _compare(blob: bytes, model: nn.Module, check: dict, info: dict) -> dict:
    """onnxruntime vs PyTorch on the check inputs: largest logit difference, and for classifiers
    top-1 agreement and both accuracies."""
    sess = session(blob)
    diffs, agree, n, acc_onnx, acc_torch = [], 0, 0, 0, 0
    for x in check["xs"]:
        got, want = run_onnx(sess, x), run_torch(model, x)
        diffs.append(float(np.abs(got - want).max()))
        if got.shape[-1] > 1:
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
            n += got.argmax(-1).size
        if check.get("y") is not None:
            acc_onnx += int((got.argmax(-1) == check["y"]).sum())
            acc_torch += int((want.argmax(-1) == check["y"]).sum())
    result = {"max_abs_diff": max(diffs)}
    if n:
        result["top1_agreement"] = agree / n
    if check.get("y") is not None:
        result["accuracy"] = acc_onnx / len(check["y"])
        result["accuracy_pytorch"] = acc_torch / len(check["y"])
    return result

"""B7: ONNX export of a trained seed-cnn: agreement, int8 accuracy, and speed against eager PyTorch.

Trains `seed-cnn-fast` for one epoch on Fashion-MNIST (--quick: 20 steps on the first 2,000
images), exports it with `nnlab export --quantize int8` (fp32 ONNX, and int8 static QDQ with
per-channel weights), and reads the export's own check on the whole test split: top-1 agreement
of fp32 onnxruntime with PyTorch, the largest logit difference, and test accuracy of PyTorch, fp32
and int8. Then three sides, each in a fresh process (common.isolated), in turn within each repeat:
eager PyTorch (nnlab.load, the kernels nnlab uses by default, inference_mode), onnxruntime fp32 and
onnxruntime int8 (CPU provider, intra_op_num_threads = torch's threads). Each times batch-1 latency
(median of single calls) and batch-256 throughput (images over back-to-back calls) on real test
images.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import Ctx, fmt, isolated, summarize, timed, train_quiet

BIG = 256
SIDES = ("eager PyTorch fp32", "onnxruntime fp32", "onnxruntime int8")
QUICK = {"train.max_steps": 20, "data.limit": 2000}


def infer_side(run_dir: str, side: str, n1: int, nbig: int) -> dict:
    """One side in its own process: batch-1 latency and batch-BIG throughput on test images."""
    import nnlab
    from nnlab.export import session
    from nnlab.runfolder import read_config
    from nnlab.tasks import make_task

    x = make_task(read_config(run_dir)).x_test[:BIG].contiguous()
    cpu = torch.device("cpu")
    if side.startswith("eager"):
        model, _ = nnlab.load(run_dir)
        fn = model
    else:
        sess = session(Path(run_dir) / ("model.int8.onnx" if "int8" in side else "model.onnx"))
        fn = lambda t: sess.run(None, {"x": t.numpy()})  # noqa: E731
    x1 = x[:1]
    with torch.inference_mode():
        for _ in range(3):  # warm up both shapes
            fn(x1), fn(x)
        latency = statistics.median(timed(lambda: fn(x1), 1, cpu) for _ in range(n1))
        throughput = nbig * BIG / timed(lambda: fn(x), nbig, cpu)
    return {"latency_s": latency, "throughput": throughput}


def run(ctx: Ctx) -> dict:
    from nnlab.export import export

    n1, nbig = (20, 2) if ctx.quick else (200, 20)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = QUICK if ctx.quick else {"train.epochs": 1}
        run_dir = train_quiet("seed-cnn-fast", overrides, str(Path(tmp) / "cnn"))["run_dir"]
        t0 = time.perf_counter()
        record = export(run_dir, quantize="int8")
        export_s = time.perf_counter() - t0
        raw = {s: [] for s in SIDES}
        for _ in range(ctx.repeats):  # the sides in turn within each repeat, so drift hits all alike
            for s in SIDES:
                raw[s].append(isolated(ctx, infer_side, run_dir, s, n1, nbig))
    fp32, int8 = record["check"]["fp32"], record["check"]["int8"]
    accuracy = {SIDES[0]: fp32["accuracy_pytorch"], SIDES[1]: fp32["accuracy"], SIDES[2]: int8["accuracy"]}
    eager, rows, results = raw[SIDES[0]], [], {}
    for s in SIDES:
        xs = raw[s]
        res = {"latency_b1_ms": summarize(x["latency_s"] * 1e3 for x in xs),
               f"throughput_b{BIG}": summarize(x["throughput"] for x in xs),
               "latency_ratio_vs_eager": summarize(e["latency_s"] / x["latency_s"] for x, e in zip(xs, eager)),
               "ratio_vs_eager": summarize(x["throughput"] / e["throughput"] for x, e in zip(xs, eager)),
               "test_accuracy": accuracy[s]}
        results[s] = res
        rows.append([s, fmt(res["latency_b1_ms"], ".3f"), fmt(res["latency_ratio_vs_eager"], ".2f", suffix="x"),
                     fmt(res[f"throughput_b{BIG}"]) + " images", fmt(res["ratio_vs_eager"], ".2f", suffix="x"),
                     f"{100 * accuracy[s]:.2f}%"])
    agreement = {"fp32_top1_agreement": fp32["top1_agreement"], "fp32_max_abs_logit_diff": fp32["max_abs_diff"],
                 "int8_top1_agreement": int8["top1_agreement"],
                 "int8_accuracy_change": int8["accuracy"] - int8["accuracy_pytorch"],
                 "int8_reduce_range": int8["reduce_range"], "test_images": record["check"]["data"]}
    notes = [f"agreement on {record['check']['data']}: fp32 top-1 {100 * fp32['top1_agreement']:.2f}% "
             f"(largest logit difference {fp32['max_abs_diff']:.1e}); int8 top-1 {100 * int8['top1_agreement']:.2f}%, "
             f"accuracy change {100 * agreement['int8_accuracy_change']:+.2f} points",
             f"int8: {int8['method']}, {int8['calibration_images']} calibration images, "
             f"reduce_range={int8['reduce_range']}; export and quantization took {export_s:.1f} s",
             "each side runs in a fresh process (common.isolated), the sides in turn; onnxruntime with "
             f"intra_op_num_threads = torch's threads ({ctx.machine['threads']})",
             "latency ratio = eager latency / this latency; throughput ratio = this / eager (higher is faster)"]
    if ctx.quick:
        notes.append("--quick: 20 training steps on the first 2,000 images: seconds, not figures")
    return {
        "fresh_processes": True,
        "title": f"B7 ONNX export of seed-cnn: batch-1 latency ({n1} calls), batch-{BIG} throughput ({nbig} calls)",
        "notes": notes,
        "columns": ["side", "b1 latency ms", "ratio", f"b{BIG} throughput", "ratio", "test accuracy"],
        "rows": rows,
        "results": results,
        "agreement": agreement,
        "config": {"recipe": "seed-cnn-fast", "overrides": overrides, "latency_calls": n1, "throughput_calls": nbig,
                   "big_batch": BIG},
    }

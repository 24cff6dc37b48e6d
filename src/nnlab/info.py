"""What decides training speed on this machine: `nnlab info`, and the "machine" entry of summary.json.

The CPU and the flags that change which code runs (AVX2 and AVX-512 vectors for nnlab's kernels,
avx512_bf16 and AMX for bf16), the precision `train.precision=auto` picks and why, torch's version
and threads, whether nnlab's CPU kernels are built and which of their ops run here, CUDA devices.
"""

from __future__ import annotations

import platform

import torch

from nnlab import __version__, kernels
from nnlab.train.precision import cpu_flags, cpu_name, resolve_precision

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def machine_info() -> dict:
    flags = cpu_flags()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")  # what a run uses
    precision, why = resolve_precision("auto", device, flags)
    return {
        "cpu": cpu_name(),
        "cpu_flags": {f: f in flags for f in CPU_FLAGS},
        "precision_auto": {"device": str(device), "precision": precision, "why": why},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "nnlab": __version__,
        "kernels": kernels.status(),
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


def format_machine_info(info: dict) -> str:
    k = info["kernels"]
    on = [op for op, runs in k["ops"].items() if runs]
    kernels_line = (f"{k['why']}; ops that run here: {', '.join(on) or 'none'}" if k["built"]
                    else f"not built: {k['why']} (torch's ops run instead)")
    auto = info["precision_auto"]
    rows = [
        ("CPU", info["cpu"]),
        ("CPU flags", ", ".join(f"{f} {'yes' if has else 'no'}" for f, has in info["cpu_flags"].items())),
        ("precision", f"auto picks {auto['precision']} on {auto['device']}: {auto['why'].removeprefix('auto: ')}"),
        ("torch", f"{info['torch']}, threads {info['threads']}; Python {info['python']}; nnlab {info['nnlab']}"),
        ("kernels", kernels_line),
        ("CUDA", ", ".join(info["cuda"]) or "no devices"),
    ]
    return "\n".join(f"{name:10s} {value}" for name, value in rows)

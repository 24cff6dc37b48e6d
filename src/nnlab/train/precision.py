"""Choosing the compute precision: bf16 only where the hardware runs it natively.

A CPU with AMX or AVX512-BF16 runs bf16 matmuls several times faster than fp32; a CPU without
bf16 units runs bf16 autocast slower than fp32, because every op converts to fp32 and back in
software. So `auto` reads the CPU flags instead of assuming.
bf16 means autocast: weights and optimizer state stay fp32 (master weights), matmuls and convs run
in bf16.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (or from the given text, for tests)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_name(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            import platform

            return platform.processor() or "unknown CPU"
    for line in cpuinfo.splitlines():
        if line.startswith("model name") and ":" in line:
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def native_bf16(device: torch.device, flags: set[str] | None = None) -> tuple[bool, str]:
    """(supported natively, why) for `device`; `flags` overrides the CPU flags read from /proc."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA device {torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bf16"
    flags = cpu_flags() if flags is None else flags
    found = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if found:
        return True, f"CPU has {', '.join(found)}"
    return False, f"CPU lacks {' and '.join(NATIVE_BF16_FLAGS)} (bf16 would be emulated, several times slower)"


def resolve_precision(requested: str, device: torch.device, flags: set[str] | None = None) -> tuple[str, str]:
    """Map train.precision (auto | fp32 | bf16) to the precision used, with the reason recorded."""
    ok, why = native_bf16(device, flags)
    if requested == "auto":
        return ("bf16" if ok else "fp32"), f"auto: {why}"
    if requested == "bf16" and not ok:
        warnings.warn(f"train.precision=bf16 on a device without native bf16 will be slow: {why}", stacklevel=2)
        return "bf16", f"requested: {why}"
    return requested, "requested"


def autocast(precision: str, device: torch.device):
    """The forward-pass context: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

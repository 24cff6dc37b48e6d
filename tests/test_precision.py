"""precision=auto picks bf16 only where the hardware runs it natively; bf16 and compile match fp32."""

import warnings

import pytest
import torch

from nnlab.train.precision import cpu_flags, native_bf16, resolve_precision

CPU = torch.device("cpu")
AMX = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n"
EPYC = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx avx2 fma\n"
AVX512BF16 = "flags\t\t: fpu avx512f avx512_bf16\n"


def test_flags_parsed_from_cpuinfo_text():
    assert {"amx_bf16", "avx2"} <= cpu_flags(AMX)
    assert "amx_bf16" not in cpu_flags(EPYC)
    assert cpu_flags("no flags line here") == set()


@pytest.mark.parametrize("cpuinfo, native", [(AMX, True), (AVX512BF16, True), (EPYC, False)])
def test_auto_picks_bf16_only_where_native(cpuinfo, native):
    flags = cpu_flags(cpuinfo)
    assert native_bf16(CPU, flags)[0] is native
    chosen, why = resolve_precision("auto", CPU, flags)
    assert chosen == ("bf16" if native else "fp32")
    assert why.startswith("auto:") and ("amx_bf16" in why or "avx512_bf16" in why)


def test_explicit_bf16_without_native_support_warns_once_and_obeys():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        chosen, _ = resolve_precision("bf16", CPU, cpu_flags(EPYC))
    assert chosen == "bf16" and len(w) == 1 and "slow" in str(w[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp32 and native bf16 never warn
        assert resolve_precision("fp32", CPU, cpu_flags(AMX))[0] == "fp32"
        assert resolve_precision("bf16", CPU, cpu_flags(AMX))[0] == "bf16"


def test_tuned_allocator_stops_refaulting_freed_memory():
    """After tune_allocator(), a block that is freed and allocated again is reused, not faulted in
    afresh: once the heap has settled, a repeated 64 MB alloc-fill-free cycle faults no pages at
    all, where glibc's default faults the whole block in on every cycle. (Fresh processes: the
    setting is process-wide.)

    The heap takes a few cycles to settle (benchmarks/README.md gives our reading of why). With the
    package's modules imported, the heap grew in 2 to 8 of the first 9 cycles and never after (cycles
    10-30 faulted nothing, 3 processes), so the first 15 cycles are warm-up here."""
    import subprocess
    import sys

    probe = """
import resource, sys, torch
import nnlab.models, nnlab.nn, nnlab.train  # what a training run has imported
from nnlab.train.allocator import tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator()[0]
def cycle():
    torch.empty(16 << 20).fill_(1)  # 64 MB: above glibc's default mmap threshold
for _ in range(15):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = {mode: int(subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "tuned")}
    pages = 10 * (64 << 20) // 4096
    assert faults["default"] > pages // 2, faults  # the default faults every cycle in again
    assert faults["tuned"] < pages // 20, faults  # tuned: the block is reused (seen: 0)

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

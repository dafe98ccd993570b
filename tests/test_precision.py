import torch

from dgg.precision import bf16_warning, cpu_has_native_bf16

SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
SKYLAKE_AVX512 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f fma\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_has_native_bf16(SAPPHIRE_RAPIDS) is True
    assert cpu_has_native_bf16(SKYLAKE_AVX512) is False
    assert cpu_has_native_bf16("processor\t: 0\n") is None  # no flags line (not x86): cannot tell, so no warning


def test_bf16_on_a_cpu_that_only_emulates_it_gets_a_warning_naming_the_fix():
    cpu = torch.device("cpu")
    warning = bf16_warning(cpu, "bf16", SKYLAKE_AVX512)
    assert "train.precision=fp32" in warning and "avx512_bf16" in warning
    assert bf16_warning(cpu, "bf16", SAPPHIRE_RAPIDS) is None
    assert bf16_warning(cpu, "fp32", SKYLAKE_AVX512) is None
    assert bf16_warning(torch.device("cuda"), "bf16", SKYLAKE_AVX512) is None

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


def test_auto_precision_resolves_to_bf16_only_where_it_is_native(monkeypatch):
    import dgg.precision as precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: None)
    assert precision.resolve_precision("auto", cpu) == "fp32"
    assert precision.resolve_precision("bf16", cpu) == "bf16" and precision.resolve_precision("fp32", cpu) == "fp32"


def test_a_run_saves_the_precision_auto_resolved_to(tiny_model_dir, tmp_path):
    from dgg.config import load_config
    from dgg.precision import resolve_precision
    from dgg.trainer import GRPOTrainer

    config = load_config(None, [f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'run'}", "train.precision=auto",
                                "train.max_batches=1", "eval.every=0", "output.progress=false", "train.threads=1",
                                "rollout.prompts_per_batch=2", "rollout.group_size=2", "profile.weights_every=0"])
    trainer = GRPOTrainer(config)
    trainer.train()
    expected = resolve_precision("auto", torch.device("cpu"))
    assert trainer.precision == expected
    assert f"precision: {expected}" in (trainer.run_dir / "config.yaml").read_text()

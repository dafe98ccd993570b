"""benchmarks/mb4_report.py: which machine each harvested run trained on."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from mb4_report import machines_line  # noqa: E402


def test_the_report_names_each_runs_machine_from_its_harvested_environment(tmp_path):
    amx = {"cpu": "Intel Xeon", "cpu_flags": ["avx512_bf16", "amx_bf16"], "gpu": None, "precision": "bf16",
           "threads": 1}
    for name in ("single_lr1.5e-5_seed0", "naive_lr1.5e-5_seed0", "naive_lr1.5e-5_seed1"):
        (tmp_path / f"{name}.metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes.metrics.jsonl").write_text("{}\n")  # not a sweep run's name: left out
    (tmp_path / "single_lr1.5e-5_seed0.environment.jsonl").write_text(json.dumps(amx) + "\n")
    (tmp_path / "naive_lr1.5e-5_seed1.environment.jsonl").write_text(
        json.dumps(amx) + "\n" + json.dumps({**amx, "cpu": "AMD EPYC", "cpu_flags": ["avx512_bf16"]}) + "\n")
    assert machines_line([tmp_path]) == (
        "Machines: Intel Xeon (avx512_bf16, amx_bf16), bf16, 1 thread: 1 run(s) · "
        "Intel Xeon (avx512_bf16, amx_bf16), bf16, 1 thread; then AMD EPYC (avx512_bf16), bf16, 1 thread: 1 run(s) · "
        "not recorded: 1 run(s).")

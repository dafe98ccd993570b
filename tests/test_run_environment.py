import subprocess
from pathlib import Path

import torch

from dgg.run_environment import (
    ENVIRONMENT_FILE,
    cpu_flags,
    cpu_model,
    describe_environment,
    machine_label,
    read_environment,
    record_start,
    source_commit,
)

XEON_AMX = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
            "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
            "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse2 avx2\n")
EPYC = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"


def test_the_cpu_model_and_flags_are_read_from_cpuinfo():
    assert cpu_model(XEON_AMX) == "Intel(R) Xeon(R) Processor" and cpu_model(EPYC) == "AMD EPYC 9B14"
    assert {"amx_bf16", "amx_tile", "avx512_bf16"} <= cpu_flags(XEON_AMX)  # the first core's line
    assert "amx_bf16" not in cpu_flags(EPYC) and cpu_flags("processor\t: 0\n") == set() and cpu_flags(None) == set()
    assert cpu_model("processor\t: 0\n")  # no model name line: the platform's word for it, or "unknown"


def test_the_description_names_the_matmul_flags_the_precision_and_the_versions():
    cpu = torch.device("cpu")
    amx = describe_environment(cpu, "bf16", XEON_AMX)
    assert amx["cpu"] == "Intel(R) Xeon(R) Processor"
    assert amx["cpu_flags"] == ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]  # amx_int8 is not one
    assert describe_environment(cpu, "fp32", EPYC)["cpu_flags"] == ["avx2", "avx512f", "avx512_bf16"]
    assert amx["precision"] == "bf16" and amx["device"] == "cpu" and amx["gpu"] is None
    assert amx["torch"] == torch.__version__ and amx["threads"] == torch.get_num_threads() and amx["cores"] >= 1


def test_the_commit_is_this_checkouts_when_dgg_runs_from_one():
    package = Path(__file__).resolve().parents[1] / "src" / "dgg"
    head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True)
    described = describe_environment(torch.device("cpu"), "fp32", EPYC)
    if head.returncode == 0:
        assert described["dgg_commit"] == head.stdout.strip()
        assert described["dgg_uncommitted_changes"] in (True, False)
    else:  # a source tree outside git (an sdist, say)
        assert described["dgg_commit"] is None


def test_source_commit_sees_uncommitted_changes_and_nothing_outside_a_checkout(tmp_path):
    assert source_commit(tmp_path) == (None, None)
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)
    git("init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "one")
    commit, dirty = source_commit(repo)
    assert len(commit) == 40 and dirty is False
    (repo / "untracked.txt").write_text("not part of the code\n")
    assert source_commit(repo) == (commit, False)
    (repo / "a.py").write_text("x = 2\n")
    assert source_commit(repo) == (commit, True)


def test_each_start_appends_a_line_and_earlier_runs_read_as_empty(tmp_path):
    assert read_environment(tmp_path) == []
    record_start(tmp_path, 0, {"cpu": "A"})
    record_start(tmp_path, 12, {"cpu": "B"})
    lines = read_environment(tmp_path)
    assert [(line["batches_done"], line["cpu"]) for line in lines] == [(0, "A"), (12, "B")]
    assert all(line["started_at"].endswith("+00:00") for line in lines)
    assert (tmp_path / ENVIRONMENT_FILE).read_text().count("\n") == 2


def test_the_machine_label_names_the_gpu_or_the_cpu_with_its_bf16_flags():
    cpu_line = {"cpu": "AMD EPYC", "cpu_flags": ["avx2", "avx512f", "avx512_bf16"], "gpu": None,
                "precision": "bf16", "threads": 2}
    assert machine_label(cpu_line) == "AMD EPYC (avx512_bf16), bf16, 2 threads"
    assert machine_label({**cpu_line, "cpu_flags": ["avx2"], "precision": "fp32", "threads": 1}) == \
        "AMD EPYC, fp32, 1 thread"
    assert machine_label({**cpu_line, "gpu": "NVIDIA H100 80GB HBM3"}) == "NVIDIA H100 80GB HBM3, bf16, 2 threads"

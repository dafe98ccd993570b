"""`dgg report` from metrics files alone: a hand-made sweep whose Table-1 numbers are known in advance."""

import json

from dgg.cli import main as cli_main


def _run(out, arm, seed, accuracies, seconds_per_batch, reuse=1, stops=()):
    """A run of len(accuracies) − 1 batches of 64 rollouts, evaluated after every batch."""
    run = out / arm / f"seed{seed}"
    run.mkdir(parents=True)
    records = []
    for batch, accuracy in enumerate(accuracies):
        state = {"batch": batch, "rollouts": 64 * batch, "wall_time": seconds_per_batch * batch}
        if batch:
            for k in range(1, reuse + 1):
                stop = (batch, k) in stops
                records.append({"kind": "update", **state, "reuse_index": k, "actor/applied": not stop,
                                "reuse/stop": stop, "reuse/stop_reason": "kl" if stop else None})
            records.append({"kind": "rollout", **state, "gate/reuse_count": reuse})
        records.append({"kind": "eval", **state, "eval/accuracy": accuracy})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "done.json").write_text("{}")


def test_report_rebuilds_table_one_from_metrics(tmp_path, capsys):
    out = tmp_path / "bench"
    arms = [{"name": "single", "label": "single-use", "overrides": [], "baseline": "single"},
            {"name": "fixed_k4", "label": "naive K=4", "overrides": [], "baseline": "single"},
            {"name": "kl_0.02", "label": "KL stop", "overrides": [], "baseline": "single"}]
    out.mkdir()
    (out / "experiment.json").write_text(json.dumps({"name": "main", "config": "demo", "overrides": [],
                                                      "seeds": [0, 1], "arms": arms}))
    # single-use: converged (mean of the last five) 0.5, first reached at batch 4 = 256 rollouts, 40 s
    _run(out, "single", 0, [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5], 10.0)
    _run(out, "single", 1, [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5], 10.0)
    # naive: reaches 0.5 at batch 2 (128 rollouts, 60 s) -> 2.0× rollouts, 0.67× wall-clock; then collapses
    _run(out, "fixed_k4", 0, [0.1, 0.3, 0.5, 0.6, 0.3, 0.2, 0.2, 0.2, 0.2], 30.0, reuse=4)
    # the KL arm stops twice and never reaches 0.5; it runs on seed 0 only so far
    _run(out, "kl_0.02", 0, [0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3], 12.0, reuse=2, stops={(1, 2), (3, 2)})
    assert cli_main(["report", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    naive = summary["arms"]["fixed_k4"]["runs"][0]
    assert naive["rollout_speedup"] == 2.0 and abs(naive["wall_clock_speedup"] - 40 / 60) < 1e-9
    assert naive["collapsed"] and summary["arms"]["fixed_k4"]["collapsed_seeds"] == 1
    kl = summary["arms"]["kl_0.02"]
    assert kl["runs"][0]["rollout_speedup"] is None and kl["runs"][0]["stops_by_reason"] == {"kl": 2}
    assert summary["arm_seeds"] == {"single": [0, 1], "fixed_k4": [0], "kl_0.02": [0]}
    report = (out / "report.md").read_text()
    assert "| naive K=4 | 0 | 0.220 ± 0.000 | 0.600 | 2.00 ± 0.00 | 0.67 ± 0.00 | 1/1 |" in report
    assert "| KL stop | 0 | 0.300 ± 0.000 | 0.300 | never reached | never reached | 0/1 | 0.0 | 2.0 (kl 2) |" in report
    assert "compare means with care" in report  # single has two seeds, the others one
    assert (out / "fig_accuracy.png").stat().st_size > 0


def test_report_says_where_the_runs_trained_and_warns_when_machines_differ(tmp_path):
    from dgg.run_environment import record_start

    out = tmp_path / "bench"
    out.mkdir()
    arms = [{"name": "single", "label": "single-use", "overrides": [], "baseline": "single"},
            {"name": "fixed_k4", "label": "naive K=4", "overrides": [], "baseline": "single"}]
    (out / "experiment.json").write_text(json.dumps({"name": "main", "config": "demo", "overrides": [],
                                                      "seeds": [0], "arms": arms}))
    _run(out, "single", 0, [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5], 10.0)
    _run(out, "fixed_k4", 0, [0.1, 0.3, 0.5, 0.6, 0.3, 0.2, 0.2, 0.2, 0.2], 30.0, reuse=4)
    assert cli_main(["report", str(out)]) == 0
    assert "*Machines:* not recorded" in (out / "report.md").read_text()  # logs from before environment.jsonl

    amx = {"cpu": "Intel Xeon", "cpu_flags": ["avx512f", "avx512_bf16", "amx_bf16"], "gpu": None,
           "precision": "bf16", "threads": 1}
    epyc = {**amx, "cpu": "AMD EPYC", "cpu_flags": ["avx512f", "avx512_bf16"]}
    record_start(out / "single" / "seed0", 0, amx)
    record_start(out / "fixed_k4" / "seed0", 0, amx)
    assert cli_main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "*Machines:* every run trained on Intel Xeon (avx512_bf16, amx_bf16), bf16, 1 thread." in report

    record_start(out / "fixed_k4" / "seed0", 4, epyc)  # resumed elsewhere
    assert cli_main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "the runs trained on different machines" in report
    assert ("| fixed_k4/seed0 | Intel Xeon (avx512_bf16, amx_bf16), bf16, 1 thread; AMD EPYC (avx512_bf16), bf16, "
            "1 thread |") in report
    machines = json.loads((out / "summary.json").read_text())["machines"]
    assert machines["single/seed0"] == ["Intel Xeon (avx512_bf16, amx_bf16), bf16, 1 thread"]

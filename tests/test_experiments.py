"""Tests for src/dgg/experiments.py: the record of a `dgg bench` directory that several launches share."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dgg.errors import UserError
from dgg.experiments import EXPERIMENT, record_experiment

SPEC = {"name": "reuse-rules", "config": "demo", "overrides": [], "arms": []}


def test_a_launch_with_fewer_seeds_widens_the_record_and_never_narrows_it(tmp_path):
    assert record_experiment(tmp_path, SPEC, [2, 0])["seeds"] == [0, 2]
    assert record_experiment(tmp_path, {**SPEC, "overrides": ["optim.lr=1e-6"]}, [1])["seeds"] == [0, 1, 2]
    written = json.loads((tmp_path / EXPERIMENT).read_text())
    assert written == {**SPEC, "overrides": ["optim.lr=1e-6"], "seeds": [0, 1, 2]}


def test_launches_recording_at_the_same_time_keep_every_seed(tmp_path):
    # Each process rewrites the record 25 times with its own seed. Unlocked, a reader saw an empty file (a
    # JSONDecodeError on 2026-12-08 when two seeds of one sweep started together) or lost the other's seed.
    script = ("import sys; from pathlib import Path; from dgg.experiments import record_experiment\n"
              f"spec = {SPEC!r}\n"
              "for _ in range(25): record_experiment(Path(sys.argv[1]), spec, [int(sys.argv[2])])\n")
    racers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(seed)], stderr=subprocess.PIPE,
                               text=True) for seed in range(6)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in racers]
    assert all(code == 0 for code, _ in results), results
    assert json.loads((tmp_path / EXPERIMENT).read_text())["seeds"] == list(range(6))


@pytest.mark.parametrize("text", ['{"seeds": "0,1"}', '[1, 2]', '{"seeds": [-1]}'])
def test_a_record_dgg_bench_did_not_write_is_refused_by_name(tmp_path, text):
    (tmp_path / EXPERIMENT).write_text(text)
    with pytest.raises(UserError, match=r"experiment\.json is not one `dgg bench` wrote"):
        record_experiment(tmp_path, SPEC, [0])
    assert (tmp_path / EXPERIMENT).read_text() == text

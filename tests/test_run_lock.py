"""Tests for src/dgg/run_lock.py: one writer per run directory, for `dgg train` and `dgg bench` alike."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time

from dgg.cli import main as cli_main
from dgg.run_lock import holder, shared_files, try_lock, unlock
from fault_harness import RUN, deterministic, read_records


def snapshot(run_dir) -> dict[str, str]:
    """Every file under ``run_dir`` with a hash of its bytes."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def hold_in_another_process(run_dir) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from dgg.run_lock import held\n"
        f"with held(Path({str(run_dir)!r})) as mine:\n"
        "    print(mine, flush=True); time.sleep(120)"), "--pretend-training"], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "True"
    return process


def test_the_lock_is_reentrant_in_one_process_and_released_by_the_last_holder(tmp_path):
    assert try_lock(tmp_path) and try_lock(tmp_path)
    unlock(tmp_path)
    other = subprocess.run([sys.executable, "-c", "from dgg.run_lock import try_lock; import sys; "
                            f"sys.exit(0 if try_lock({str(tmp_path)!r}) else 3)"])
    assert other.returncode == 3  # still held once here
    unlock(tmp_path)
    assert subprocess.run([sys.executable, "-c", "from dgg.run_lock import try_lock; import sys; "
                           f"sys.exit(0 if try_lock({str(tmp_path)!r}) else 3)"]).returncode == 0
    assert holder(tmp_path).startswith("PID ")


def test_a_second_launch_is_refused_with_the_holder_named_and_nothing_changes(tiny_model_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), *RUN, "train.max_batches=2", "--output", str(run_dir)]
    assert cli_main(args) == 0
    process = hold_in_another_process(run_dir)
    before = snapshot(run_dir)  # the holder's record in the lock file included
    try:
        for attempt in (args, [*args, "--overwrite"], ["train", "--resume", str(run_dir)]):
            capsys.readouterr()
            assert cli_main(attempt) == 2
            err = capsys.readouterr().err
            assert f"{run_dir} is in use by another run (PID {process.pid}: -c --pretend-training)" in err, err
            assert snapshot(run_dir) == before
    finally:
        process.kill()
        process.wait()
    assert cli_main(["train", "--resume", str(run_dir), "train.max_batches=3"]) == 0  # a kill -9 leaves no lock


def test_two_launches_racing_on_one_directory_run_exactly_once(tiny_model_dir, tmp_path):
    run_dir, go = tmp_path / "run", tmp_path / "go"
    args = ["train", "--model", str(tiny_model_dir), *RUN, "train.max_batches=6", "--overwrite", "--output"]
    assert cli_main([*args, str(tmp_path / "alone")]) == 0
    script = ("import os, sys, time\nimport dgg.trainer\nfrom dgg.cli import main\n"  # imported first, so both start together
              f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
              "sys.exit(main(sys.argv[1:]))\n")
    racers = [subprocess.Popen([sys.executable, "-c", script, *args, str(run_dir)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(8)  # both have imported torch and dgg
    go.touch()
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in racers)
    assert [code for code, _ in results] == [0, 2], results
    assert "is in use by another run (PID" in results[1][1]
    assert deterministic(read_records(run_dir)) == deterministic(read_records(tmp_path / "alone"))



def test_shared_files_makes_a_second_process_wait_until_the_first_is_done(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from dgg.run_lock import shared_files\n"
        f"with shared_files(Path({str(tmp_path)!r})):\n"
        "    print('holding', flush=True); sys.stdin.readline()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    assert process.stdout.readline().strip() == "holding"
    entered = threading.Event()

    def wait_for_turn():
        with shared_files(tmp_path):
            entered.set()

    waiter = threading.Thread(target=wait_for_turn, daemon=True)
    waiter.start()
    assert not entered.wait(1.0)  # the other process holds the files
    process.stdin.write("done\n")
    process.stdin.flush()
    assert process.wait(timeout=30) == 0
    assert entered.wait(10.0)  # its turn came as soon as the holder left
    waiter.join(timeout=10)

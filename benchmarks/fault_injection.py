"""Kill -9 (or SIGTERM) `dgg train` at random moments, resume, and count what was lost; race two launches.

    python benchmarks/fault_injection.py [--rounds 10] [--kills 5] [--signal kill|term|int] [--races 0]
                                         [--out benchmarks/results/fault_injection.json]

Each round trains a small random model (30 batches, DGG reuse K = 3, a checkpoint every batch) once without
interruption, then again with ``--kills`` kill -9s, each a random 0–1 s after the run last wrote a metrics line, resuming
after each (a run killed before
its first checkpoint starts again). After every kill the checkpoint on disk must load (weights and trainer state);
at the end, metrics (timings aside) and final weights must be bit-identical to the uninterrupted run. Counts go
to the JSON file and, by hand, to BENCHMARKS.md's reliability section. With ``--signal term`` each SIGTERM must
also end the run with exit code 143 and a one-line message (``clean_stops``; ``mid_batch_stops`` counts the
checkpoints that held a batch in progress; ``after_the_end`` counts signals that came after the run's last
checkpoint, while the process was already exiting, and killed it with the signal's default action, losing
nothing). ``--races N`` starts two `dgg train --overwrite` launches on one
directory N times, released together after both have imported dgg: exactly one may run, and the directory must
hold that one run's records.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fault_harness import deterministic, kill_and_resume, read_records  # noqa: E402

SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}

RUN = ["rollout.prompts_per_batch=2", "rollout.group_size=4", "rollout.max_new_tokens=4", "eval.every=2",
       "eval.problems=2", "eval.samples=1", "output.progress=false", "optim.lr=1e-2", "reuse.mode=dgg",
       "reuse.max_reuse=3", "train.threads=1", "train.max_batches=30", "train.checkpoint_every=1",
       "task.test_size=4"]


def tiny_model(directory: Path) -> Path:
    from dgg.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer()
    config = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64)
    build_tiny_model(tokenizer, config, seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--kills", type=int, default=5, help="signals per round")
    parser.add_argument("--signal", choices=sorted(SIGNALS), default="kill", help="what each interruption sends")
    parser.add_argument("--races", type=int, default=0, help="two launches racing on one directory, N times")
    parser.add_argument("--out", default="benchmarks/results/fault_injection.json")
    args = parser.parse_args()
    from dgg.cli import main as cli_main

    started = time.perf_counter()
    rounds = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = tiny_model(scratch / "model")
        base = ["--model", str(model), *RUN]
        for seed in range(args.rounds):
            alone = scratch / f"alone{seed}"
            assert cli_main(["train", *base, f"train.seed={seed}", "--output", str(alone)]) == 0
            report = kill_and_resume([*base, f"train.seed={seed}"], scratch / f"killed{seed}", alone,
                                     kills=args.kills, seed=seed, max_delay_s=1.0, sig=SIGNALS[args.signal])
            rounds.append(asdict(report))
            print(f"round {seed}: {report}", flush=True)
        races = [race(base, scratch / f"race{i}", scratch / "alone0") for i in range(args.races)]
    total = {key: sum(r[key] for r in rounds)
             for key in ("kills", "clean_stops", "mid_batch_stops", "after_the_end", "resumes",
                         "restarts_from_scratch")}
    result = {"signal": args.signal, "rounds": len(rounds), **total,
              "corruptions": sum(len(r["corrupt"]) for r in rounds),
              "identical_runs": sum(r["identical"] for r in rounds),
              "races": len(races), "races_with_exactly_one_run": sum(races), "per_round": rounds,
              "seconds": round(time.perf_counter() - started, 1), "machine": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv])}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "per_round"}, indent=2))


def race(base: list[str], run_dir: Path, reference: Path) -> bool:
    """Two launches on one directory: True when exactly one ran (exit 0), the other was refused (exit 2, naming
    the holder) and the directory holds the records of one uninterrupted run."""
    go = run_dir.with_suffix(".go")
    script = ("import os, sys, time\nimport dgg.trainer\nfrom dgg.cli import main\n"
              f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
              "sys.exit(main(sys.argv[1:]))\n")
    racers = [subprocess.Popen([sys.executable, "-c", script, "train", *base, "train.seed=0", "--overwrite",
                                "--output", str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(p.poll() is None and not _imported(p.pid) for p in racers):
        time.sleep(0.05)
    go.touch()
    outcomes = sorted((p.wait(timeout=600), p.stderr.read()) for p in racers)
    ok = [code for code, _ in outcomes] == [0, 2] and "is in use by another run (PID" in outcomes[1][1] and \
        deterministic(read_records(run_dir)) == deterministic(read_records(reference))
    print(f"race {run_dir.name}: exits {[code for code, _ in outcomes]}, one run: {ok}", flush=True)
    return ok


def _imported(pid: int) -> bool:
    """Whether the process has loaded torch (it then waits at the starting line)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return os.path.exists(f"/proc/{pid}") is False


if __name__ == "__main__":
    main()

"""Peak resident memory of a short `dgg train` run, with and without chunked lm_head log-probs.

    python benchmarks/peak_memory.py --config smollm2_arith --chunks 0,256 --out benchmarks/results/peak_memory_smollm2.json

Each variant is a separate `dgg train` process (so one variant's allocator cannot hide another's peak), whose
peak RSS is read from the kernel (``os.wait4``'s ``ru_maxrss``, what ``/usr/bin/time -v`` prints as "Maximum
resident set size"). The default overrides are the issue's measurement: two SmolLM2 training batches of
64 completions of ≤ 16 tokens, fp32, no evaluation, no weight profiler, no Theorem 2 check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEASURED = ["train.max_batches=2", "eval.every=0", "profile.weights_every=0", "profile.theorem2=false",
            "train.precision=fp32", "output.progress=false", "train.threads=1", "train.checkpoint_minutes=0"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss_of(command: list[str]) -> tuple[int, float, int]:
    """(peak RSS in bytes, wall seconds, exit code) of ``command`` run to completion."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.returncode != 0:
        print(stderr[-2000:], file=sys.stderr)
    return usage.ru_maxrss * 1024, seconds, process.returncode  # Linux reports kilobytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="smollm2_arith", help="a bundled config name or a YAML path")
    parser.add_argument("--chunks", default="0,256", help="train.logprob_chunk values, comma-separated (0: off)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="more key=value overrides for every variant")
    args = parser.parse_args()

    results = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        with tempfile.TemporaryDirectory() as run_dir:
            overrides = [*MEASURED, f"train.logprob_chunk={chunk}", *args.overrides]
            command = [sys.executable, "-m", "dgg.cli", "train", "-c", args.config, "--output", run_dir, *overrides]
            rss, seconds, code = peak_rss_of(command)
        row = {"logprob_chunk": chunk, "peak_rss_gb": round(rss / 1e9, 3), "wall_seconds": round(seconds, 1),
               "exit_code": code}
        print(json.dumps(row), flush=True)
        results.append(row)
    report = {"config": args.config, "overrides": [*MEASURED, *args.overrides], "cpu": cpu_model(),
              "date": time.strftime("%Y-%m-%d"), "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where a training batch's peak memory goes: resident memory at each phase of a short run, in one process.

    python benchmarks/memory_phases.py --config smollm2_arith [--out FILE.json] [OVERRIDE ...]

benchmarks/peak_memory.py measures a run's peak; this script says which phase sets it. A sampler thread reads
the process's resident set (``/proc/self/status`` VmRSS) every 5 ms while the trainer's phases are wrapped:
building the trainer (model, tokenizer, optimizer), collecting and scoring a rollout batch, and, inside each
update, the forward/backward pass and the optimizer step. Each phase reports the resident memory when it began
and ended and the most seen while it ran; the run's kernel-measured peak (VmHWM) is printed beside them. The
default overrides are peak_memory.py's (two batches, fp32, no evaluation, no profiler).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from peak_memory import MEASURED, cpu_model


def status_kb(field: str) -> int:
    """A /proc/self/status field in KiB (the kernel writes "kB" for 1024 bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def gb(kib: int) -> float:
    return kib * 1024 / 1e9


class Sampler:
    """The largest VmRSS seen since the last ``mark``, read every ``interval`` seconds on a thread."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.highest, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.highest = max(self.highest, status_kb("VmRSS"))

    def mark(self) -> int:
        now = status_kb("VmRSS")
        self.highest = now
        return now

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def traced(sampler: Sampler, phases: dict, name: str, function):
    def wrapper(*args, **kwargs):
        before = sampler.mark()
        try:
            return function(*args, **kwargs)
        finally:
            after = status_kb("VmRSS")
            phases.append({"phase": name, "before_gb": gb(before), "peak_gb": gb(max(sampler.highest, after)),
                           "after_gb": gb(after), "after_file_backed_gb": gb(status_kb("RssFile"))})
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="smollm2_arith")
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides after the measured defaults")
    args = parser.parse_args()

    started = time.perf_counter()
    sampler = Sampler()
    phases: list[dict] = []
    at_start = status_kb("VmRSS")
    import tempfile

    import torch

    from dgg import trainer as trainer_module
    from dgg.config import load_config
    after_imports = status_kb("VmRSS")

    Trainer = trainer_module.GRPOTrainer
    Trainer._build = traced(sampler, phases, "build (model, tokenizer, optimizer)", Trainer._build)
    Trainer.update = traced(sampler, phases, "update (one mini-batch)", Trainer.update)
    Trainer.collect_rollouts = traced(sampler, phases, "collect and score rollouts", Trainer.collect_rollouts)
    Trainer._backward = traced(sampler, phases, "forward + backward", Trainer._backward)
    step = torch.optim.AdamW.step
    torch.optim.AdamW.step = traced(sampler, phases, "AdamW step", step)

    with tempfile.TemporaryDirectory() as out:
        config = load_config(args.config, [*MEASURED, *args.overrides, f"output.dir={out}/run"])
        Trainer(config).train()
    sampler.stop()
    result = {
        "config": args.config, "overrides": [*MEASURED, *args.overrides], "cpu": cpu_model(),
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "rss_at_start_gb": gb(at_start), "rss_after_imports_gb": gb(after_imports),
        "phases": phases, "peak_rss_gb (VmHWM)": gb(status_kb("VmHWM")),
        "wall_seconds": time.perf_counter() - started,
    }
    print(f"{'phase, in order':40s} {'before':>8s} {'peak':>8s} {'after':>8s} {'of it file':>10s}  (resident GB)")
    print(f"{'interpreter start':40s} {'':8s} {'':8s} {gb(at_start):8.2f}")
    print(f"{'imports (torch, transformers, dgg)':40s} {'':8s} {'':8s} {gb(after_imports):8.2f}")
    for entry in phases:
        print(f"{entry['phase']:40s} {entry['before_gb']:8.2f} {entry['peak_gb']:8.2f} {entry['after_gb']:8.2f} "
              f"{entry['after_file_backed_gb']:10.2f}")
    print(f"kernel peak (VmHWM): {result['peak_rss_gb (VmHWM)']:.2f} GB; {result['wall_seconds']:.0f} s in all")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Bit-identity of training before and after a refactor: short runs in every reuse mode, compared line by line.

    python benchmarks/bit_identity.py run OUT [--smollm2]      # at the old commit, then at the new one
    python benchmarks/bit_identity.py compare OLD NEW [--rename OLD_KEY=NEW_KEY ...]

``run`` trains each case below (the embedded tiny model, 3 batches; with ``--smollm2`` also two SmolLM2 batches
with reuse) into ``OUT/<case>/``. ``compare`` checks that every metrics record of each case holds the same
values under the same keys (timings aside; a renamed key is compared under its new name) and that the final
weights are bit-identical, and prints one line per case.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TINY = ["train.max_batches=3", "eval.every=3", "eval.problems=8", "output.progress=false", "train.threads=1",
        "train.checkpoint_every=0", "train.checkpoint_minutes=0"]
CASES = {
    "single": ["reuse.mode=single"],
    "fixed_k3": ["reuse.mode=fixed", "reuse.max_reuse=3"],
    "dgg_tau0.5": ["reuse.mode=dgg", "reuse.max_reuse=3"],
    "dgg_tau0.1_window3": ["reuse.mode=dgg", "reuse.max_reuse=3", "reuse.tau=0.1", "reuse.window=3"],
    "kl_mini2": ["reuse.mode=dgg", "reuse.rule=kl", "reuse.target_kl=0.001", "reuse.mini_batches=2"],
    "dgg_nosignal_micro": ["reuse.mode=dgg", "reuse.rule=dgg+nosignal", "reuse.window=3", "reuse.tau=0.1",
                           "train.micro_batch_size=16"],
    "clip_m2_single": ["reuse.mode=single", "reuse.rule=clip+m2"],
    # Cases whose rules do drop steps (6 batches): the gate with a short window, the no-signal floor, the clip stop.
    "dgg_discards": ["reuse.mode=dgg", "reuse.max_reuse=3", "reuse.tau=0.01", "reuse.window=2", "train.max_batches=6"],
    "nosignal_floor": ["reuse.mode=fixed", "reuse.max_reuse=3", "reuse.rule=nosignal", "reuse.signal_floor=0.9",
                       "train.max_batches=6"],
    "clip_stops": ["reuse.mode=fixed", "reuse.max_reuse=3", "reuse.rule=clip+gradnorm", "reuse.target_clip=0.001",
                   "reuse.gradnorm_window=19", "train.max_batches=6"],
    "energy_split_theorem2": ["reuse.mode=fixed", "reuse.max_reuse=2", "profile.energy_split_every=1",
                              "profile.theorem2=true", "train.micro_batch_size=16"],
}
SMOLLM2 = ["-c", "smollm2_arith", "train.max_batches=2", "eval.every=0", "reuse.mode=dgg", "reuse.max_reuse=2",
           "profile.weights_every=0", "output.progress=false", "train.threads=1"]
TIMING_KEYS = ("wall_time", "rollout/seconds", "rollout/scoring_seconds")


def run(out: Path, smollm2: bool) -> None:
    from dgg.cli import main as dgg

    for name, overrides in CASES.items():
        code = dgg(["train", "-c", "demo", *TINY, *overrides, "--output", str(out / name), "--overwrite"])
        print(f"{name}: exit {code}", flush=True)
    if smollm2:
        code = dgg(["train", *SMOLLM2, "--output", str(out / "smollm2"), "--overwrite"])
        print(f"smollm2: exit {code}", flush=True)


def comparable(path: Path, rename: dict[str, str]) -> list[dict]:
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{rename.get(k, k): v for k, v in r.items() if k not in TIMING_KEYS and not k.startswith("perf/")}
            for r in records]


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "checkpoint" / "model.safetensors")


def compare(old: Path, new: Path, rename: dict[str, str]) -> bool:
    same = True
    for case in sorted(p.name for p in old.iterdir() if (p / "metrics.jsonl").is_file()):
        a, b = comparable(old / case, rename), comparable(new / case, {})
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        wa, wb = weights(old / case), weights(new / case)
        bits = wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
        ok = first is None and len(a) == len(b) and bits
        detail = "" if ok else (f"; records differ from line {first + 1}: "
                                f"{ {k: (a[first].get(k), b[first].get(k)) for k in a[first].keys() | b[first].keys() if a[first].get(k) != b[first].get(k)} }"
                                if first is not None else f"; {len(a)} vs {len(b)} records, weights equal: {bits}")
        print(f"{case}: {'identical' if ok else 'DIFFERENT'} ({len(a)} records, weights "
              f"{'bit-identical' if bits else 'differ'}){detail}")
        same &= ok
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    runner = sub.add_parser("run")
    runner.add_argument("out", type=Path)
    runner.add_argument("--smollm2", action="store_true")
    checker = sub.add_parser("compare")
    checker.add_argument("old", type=Path)
    checker.add_argument("new", type=Path)
    checker.add_argument("--rename", action="append", default=[], metavar="OLD=NEW")
    args = parser.parse_args()
    if args.command == "run":
        run(args.out, args.smollm2)
        return 0
    rename = dict(item.split("=", 1) for item in args.rename)
    return 0 if compare(args.old, args.new, rename) else 1


if __name__ == "__main__":
    sys.exit(main())

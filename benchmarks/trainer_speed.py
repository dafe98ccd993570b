"""Seconds per rollout batch and per update of the reference trainer, and what DGG costs inside an update.

    python benchmarks/trainer_speed.py [--batches 20] [--large-batches 2] [--threads 2]

Two models: the embedded default (``dgg warmstart``, 0.3M parameters, 80-token vocabulary) on the demo
config, and a random Qwen2-style ~100M-parameter model (hidden 768, 12 layers, vocabulary 32,000) on a smaller
batch. For each, the same work is run with fixed reuse (K = 4) and DGG (K = 4, τ = ∞ so that both arms do
identical updates; in fixed mode the gate only watches). Reported from the metrics files: median seconds of a
rollout batch (sampling), of π_old scoring, of one update attempt, the median time spent reading the probe
and running the gate (``perf/gate_seconds``) as a fraction of the update, and the live Theorem 2 check's
cost (``perf/theorem2_seconds``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def large_model_dir() -> str:
    from dgg.tiny import DEFAULT_CHARACTERS, TinyModelConfig, build_char_tokenizer, build_tiny_model

    # A 32k vocabulary: the task's characters plus CJK code points the model never sees in prompts.
    tokenizer = build_char_tokenizer(DEFAULT_CHARACTERS + "".join(chr(0x4E00 + i) for i in range(32000 - 84)))
    config = TinyModelConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                             intermediate_size=2048, max_position_embeddings=128)
    model = build_tiny_model(tokenizer, config, seed=0)
    path = tempfile.mkdtemp(prefix="dgg-100m-")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(model_dir: str, mode: str, batches: int, prompts: int, group: int) -> dict:
    from dgg.analysis import read_metrics
    from dgg.config import load_config
    from dgg.launch import train

    out = tempfile.mkdtemp(prefix="dgg-speed-")
    config = load_config("demo", [f"model.path={model_dir}", f"reuse.mode={mode}", "reuse.max_reuse=4",
                                  "reuse.tau=inf", f"train.max_batches={batches}", "eval.every=0",
                                  f"rollout.prompts_per_batch={prompts}", f"rollout.group_size={group}",
                                  "output.progress=false", "train.threads=null", f"output.dir={out}"])
    started = time.perf_counter()
    trainer = train(config)
    seconds = time.perf_counter() - started
    records = read_metrics(out)
    updates = [r for r in records if r["kind"] == "update"]
    rollouts = [r for r in records if r["kind"] == "rollout"]
    params = sum(p.numel() for p in trainer.model.parameters())

    def median(rows, key):
        return statistics.median(r[key] for r in rows if r.get(key) is not None)

    return {
        "mode": mode, "params_m": params / 1e6, "batches": batches, "completions_per_batch": prompts * group,
        "total_seconds": seconds,
        "rollout_seconds": median(rollouts, "rollout/seconds"),
        "scoring_seconds": median(rollouts, "rollout/scoring_seconds"),
        "update_seconds": median(updates, "perf/update_seconds"),
        "gate_seconds": median(updates, "perf/gate_seconds"),
        "gate_fraction": statistics.median(r["perf/gate_seconds"] / r["perf/update_seconds"] for r in updates),
        "theorem2_fraction": statistics.median(r.get("perf/theorem2_seconds", 0.0) / r["perf/update_seconds"]
                                               for r in updates),
        "seconds_per_batch": trainer.state.wall_time / batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="embedded default directory (default: built by dgg warmstart)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--large-batches", type=int, default=2, help="batches for the ~100M model (0 skips it)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model
    if model_dir is None:
        from dgg.warmstart import WarmstartConfig, warmstart

        model_dir = str(warmstart(WarmstartConfig()))
    results = [run(model_dir, mode, args.batches, 32, 8) for mode in ("fixed", "dgg")]
    if args.large_batches:
        large = large_model_dir()
        results += [run(large, mode, args.large_batches, 4, 4) for mode in ("fixed", "dgg")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}\n")
    print("| model | mode (K=4) | completions/batch | rollout s/batch | π_old scoring s | update s | "
          "probe+gate ms | probe+gate / update | Theorem-2 check / update | training s/batch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['params_m']:.1f}M | {r['mode']} | {r['completions_per_batch']} | {r['rollout_seconds']:.3f} | "
              f"{r['scoring_seconds']:.3f} | {r['update_seconds']:.3f} | {r['gate_seconds'] * 1e3:.2f} | "
              f"{r['gate_fraction'] * 100:.2f} % | {r['theorem2_fraction'] * 100:.1f} % | "
              f"{r['seconds_per_batch']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""What reading g_t costs: LMHeadGradProbe + GradientGate as a fraction of one forward+backward (paper §5).

For each model (the dgg.tiny default and a ~100M-parameter Qwen2-style config), tied and untied, it times on CPU:

- ``fwd+bwd``: one forward and backward of a GRPO-like clipped surrogate loss, probe attached (median);
- ``hook``: the tied-'output' backward hook that compacts the embedding-lookup gradient (it runs inside
  fwd+bwd; timed by replaying it on the step's captured inputs), per backward;
- ``read``: ``probe.energy()`` after the backward;
- ``observe``: ``gate.observe(float(energy), k)``.

overhead = (hook + read + observe) / fwd+bwd; the cheap parts are medians over ``--read-repeats`` runs per
round, fwd+bwd a median over ``--repeats`` rounds. On a shared machine pass ``--threads 1``: with 2 threads,
parallel regions stall for tens of ms whenever the other thread is descheduled, which swamps small ops
(and makes the whole run take minutes instead of ~90 s). Prints a Markdown table and writes JSON to ``--out``.

    PYTHONPATH=src python benchmarks/probe_overhead.py --threads 1 --out probe_overhead.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from dgg import GradientGate, LMHeadGradProbe
from dgg.tiny import TinyModelConfig, build_char_tokenizer


@dataclass(frozen=True)
class BenchCase:
    """One model shape and batch to measure."""

    name: str
    """Label in the table."""
    vocab_size: int
    """Rows of the lm_head."""
    model: TinyModelConfig
    """Transformer shape (the tie flag is set per run)."""
    batch_size: int
    """Sequences per forward."""
    sequence_length: int
    """Tokens per sequence (the first quarter is left padding for half the rows)."""


def build_model(case: BenchCase, tied: bool, pad_token_id: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = case.model
    config = Qwen2Config(
        vocab_size=case.vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
        intermediate_size=shape.intermediate_size, max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=tied, pad_token_id=pad_token_id,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def grpo_like_loss(model, input_ids, attention_mask, advantages, clip=0.2):
    """PPO-clipped surrogate over tokens, π_old = π detached (the first update on a fresh batch)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    ratio = torch.exp(logp - logp.detach())
    surrogate = torch.minimum(ratio * advantages[:, None], ratio.clamp(1 - clip, 1 + clip) * advantages[:, None])
    token_mask = attention_mask[:, 1:].float()
    return -(surrogate * token_mask).sum() / token_mask.sum()


def make_batch(case: BenchCase, pad_token_id: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, case.vocab_size, (case.batch_size, case.sequence_length), generator=generator)
    mask = torch.ones_like(ids)
    padded_rows, pad_length = slice(0, case.batch_size // 2), case.sequence_length // 4
    ids[padded_rows, :pad_length] = pad_token_id  # left padding, as in generated rollouts
    mask[padded_rows, :pad_length] = 0
    advantages = torch.randn(case.batch_size, generator=generator)
    return ids, mask, advantages


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def measure(case: BenchCase, tied: bool, repeats: int, read_repeats: int, pad_token_id: int) -> dict:
    model = build_model(case, tied, pad_token_id)
    ids, mask, advantages = make_batch(case, pad_token_id)
    probe = LMHeadGradProbe(model, tied="output")
    captured_hook_calls: list[tuple] = []
    original_hook = probe._on_embedding_grad

    def capturing_hook(*args):
        captured_hook_calls.append(args)
        original_hook(*args)

    probe._on_embedding_grad = capturing_hook  # the forward hook looks the method up per call
    gate = GradientGate()
    step_seconds, hook_seconds, read_seconds, observe_seconds = [], [], [], []
    for repeat in range(repeats + 1):  # the first round warms up allocators and kernels
        model.zero_grad(set_to_none=True)
        probe.reset()
        captured_hook_calls.clear()
        _, step = timed(lambda: grpo_like_loss(model, ids, mask, advantages).backward())
        if repeat == 0:
            continue
        step_seconds.append(step)
        # The cheap parts are re-run many times on this step's real inputs: on a shared machine one
        # sample of a sub-millisecond operation is mostly scheduler noise.
        recorded = list(probe._lookups)
        for _ in range(read_repeats):
            for args in captured_hook_calls:
                hook_seconds.append(timed(lambda args=args: original_hook(*args))[1])
        probe._lookups[:] = recorded  # drop the replayed copies
        for _ in range(read_repeats):
            energy, read = timed(probe.energy)
            _, observe = timed(lambda e=energy, k=1 + repeat % 4: gate.observe(float(e), k))
            read_seconds.append(read)
            observe_seconds.append(observe)
    step, read, observe = (statistics.median(s) for s in (step_seconds, read_seconds, observe_seconds))
    hook = statistics.median(hook_seconds) if hook_seconds else 0.0
    return {
        "case": case.name, "tied": tied,
        "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "tokens": case.batch_size * case.sequence_length,
        "fwd_bwd_ms": step * 1e3, "hook_ms": hook * 1e3, "read_ms": read * 1e3, "observe_ms": observe * 1e3,
        "overhead_percent": 100 * (hook + read + observe) / step,
        "repeats": repeats, "read_repeats": read_repeats,
    }


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| model | tied | params (M) | tokens | fwd+bwd (ms) | hook (ms) | energy() (ms) | observe (ms) | overhead |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {'yes' if r['tied'] else 'no'} | {r['parameters_millions']} | {r['tokens']} "
            f"| {r['fwd_bwd_ms']:.1f} | {r['hook_ms']:.3f} | {r['read_ms']:.3f} | {r['observe_ms']:.4f} "
            f"| {r['overhead_percent']:.3f} % |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON results")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward rounds per model (median)")
    parser.add_argument("--read-repeats", type=int, default=20, help="hook replays and energy()+observe() reads per round")
    parser.add_argument("--large-batch", type=int, default=8, help="sequences per batch for the ~100M model")
    parser.add_argument("--large-seq", type=int, default=128, help="tokens per sequence for the ~100M model")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice). On a shared machine 1 avoids "
                             "parallel regions stalling on a descheduled thread, which dominates small ops")
    args = parser.parse_args()
    for field in ("repeats", "read_repeats", "large_batch", "large_seq", "threads"):
        value = getattr(args, field)
        if value is not None and value < 1:
            parser.error(f"--{field.replace('_', '-')} must be >= 1 (got {value})")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    tokenizer = build_char_tokenizer()
    cases = [
        BenchCase("tiny (dgg.tiny default)", len(tokenizer), TinyModelConfig(), 8, 128),
        BenchCase(
            "qwen2-style ~100M", 32000,
            TinyModelConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                            intermediate_size=2048, max_position_embeddings=max(512, args.large_seq)),
            args.large_batch, args.large_seq,
        ),
    ]
    started = time.perf_counter()
    rows = [measure(case, tied, args.repeats, args.read_repeats, tokenizer.pad_token_id)
            for case in cases for tied in (True, False)]
    table = markdown_table(rows)
    print(table)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
        "total_seconds": round(time.perf_counter() - started, 1), "args": vars(args),
        "note": "medians; the machine may be shared, so absolute times are noisy",
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "cases": [asdict(c) for c in cases]}, f, indent=2)
    print(f"\n{meta['date']}, torch {meta['torch']}, {meta['cpu_count']} CPUs, {meta['total_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

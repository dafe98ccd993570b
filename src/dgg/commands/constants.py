"""``dgg constants``: measure the architectural constants of Theorem 1 (paper Table 2) on a causal LM.

Example (a real model on a GPU, three layers, bf16)::

    dgg constants --model /models/Qwen2.5-1.5B-Instruct --prompts heldout.jsonl \
        --tokens 128 --samples 32 --layers 0,14,-1 --dtype bfloat16 --json constants.json

See ``docs/theory.md`` and :mod:`dgg.theory` for what is measured and how.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

TEXT_KEYS = ("text", "prompt", "content", "question")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (or hub id owner/name) of a causal LM")
    source = parser.add_argument_group("held-out text (one of)")
    source.add_argument("--prompts", help="text file (one text per non-empty line) or .jsonl "
                        f"(strings or objects with one of the keys {', '.join(TEXT_KEYS)})")
    source.add_argument("--task", help="a dgg task name; its test-split prompts are the texts")
    parser.add_argument("--texts", type=int, default=16, help="texts taken from --task (default 16)")
    parser.add_argument("--tokens", type=int, default=64, help="token positions sampled across the texts")
    parser.add_argument("--samples", type=int, default=16,
                        help="rows j~π per token for the sampled E_j‖J_j‖² estimator (large vocabularies)")
    parser.add_argument("--exact-vocab-max", type=int, default=1024,
                        help="use the exact Σ_j π_j‖J_j‖² when the vocabulary is at most this big")
    parser.add_argument("--layers", default="all", help="decoder layers: 'all' or indices like '0,5,-1'")
    parser.add_argument("--max-length", type=int, default=256, help="truncate each text to this many tokens")
    parser.add_argument("--batch-size", type=int, default=32, help="prefix copies per VJP pass (memory knob)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="model weights dtype; norms and estimates are accumulated in float32/float64")
    parser.add_argument("--json", dest="json_out", help="write the full results (summary + per token) here")
    parser.add_argument("--seed", type=int, default=0, help="seed for token positions and sampled rows")


def pick_device(name: str):
    import torch

    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:1, mps, ...)") from None
        available = {"cpu": True, "cuda": torch.cuda.is_available(),
                     "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
        if not available.get(device.type, False):
            usable = ", ".join(["auto", *(kind for kind, ok in available.items() if ok)])
            raise ValueError(f"--device {name!r}: this machine has no {device.type} device (usable here: {usable})")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def read_prompts(path: str) -> list[str]:
    """Texts from a .jsonl file (strings or objects with a text key) or a plain file (one per line)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--prompts: file not found: {path}")
    lines = file.read_text(encoding="utf-8").splitlines()
    if file.suffix.lower() != ".jsonl":
        return [line for line in lines if line.strip()]
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--prompts: {path} line {number} is not valid JSON ({err.msg})") from None
        if isinstance(item, str):
            texts.append(item)
            continue
        key = next((k for k in TEXT_KEYS if isinstance(item, dict) and isinstance(item.get(k), str)), None)
        if key is None:
            raise ValueError(f"--prompts: {path} line {number} has none of the keys {', '.join(TEXT_KEYS)}")
        texts.append(item[key])
    return texts


def task_prompts(name: str, count: int) -> list[str]:
    import dgg.agents  # noqa: F401  (registers the environments as a task family)
    from dgg.tasks import TaskConfig, make_task

    task = make_task(TaskConfig(name=name))
    return [task.problem("test", index).prompt for index in range(count)]


def load_model(path: str, dtype_name: str, device):
    import torch
    from transformers.utils import logging as hf_logging

    from dgg.loading import load_causal_lm
    from dgg.tiny import load_tokenizer

    hf_logging.disable_progress_bar()

    from dgg import models

    if path in models.MODELS:  # a named real model: fetched and converted on first use
        try:
            path = str(models.fetch(path))
        except models.ModelFetchError as err:
            raise ValueError(f"--model: {err}") from None
    if not os.path.isdir(path) and not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise ValueError(f"--model: model directory not found: {path}")
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"--model: could not load the tokenizer of {path}: {err}") from None
    model = load_causal_lm(path, getattr(torch, dtype_name), field="--model")
    return tokenizer, model.to(device).eval()


def print_table(result: dict, console) -> None:
    from rich.table import Table

    summary = result["summary"]

    def sci(x: float) -> str:
        return f"{x:.2e}"

    table = Table(title=f"Theorem 1 constants — {result['model']}  ({result['tokens_measured']} tokens × "
                        f"{len(result['sites'])} layers, C(i) {result['estimator']}"
                        + (f", S={result['samples']}" if result["estimator"] == "sampled" else "") + ")")
    for header in ("layer type", "β/α med", "β/α p95", "C(i) med", "C(ii) med", "C med", "C p95",
                   "C_struct med", "C_struct p95", "≤ bound", "≤ p95 bound"):
        table.add_column(header, justify="left" if header == "layer type" else "right")

    def add_row(name: str, s: dict, style: str | None = None) -> None:
        table.add_row(
            name, sci(s["beta_over_alpha"]["median"]), sci(s["beta_over_alpha"]["p95"]),
            sci(s["c_expected"]["median"]), sci(s["c_target"]["median"]), sci(s["c"]["median"]), sci(s["c"]["p95"]),
            sci(s["c_struct"]["median"]), sci(s["c_struct"]["p95"]),
            f"{s['theorem1']['within_per_token_bound']:.1%}", f"{s['theorem1']['within_global_p95_bound']:.1%}",
            style=style,
        )

    for layer_type, s in summary["by_layer_type"].items():
        add_row(layer_type, s)
    add_row("all", summary["overall"], style="bold")
    console.print(table)
    overall = summary["overall"]
    h = summary["lm_input_mean_square"]
    console.print(
        f"α_min = ½·min_k w_k² = {summary['alpha_min']:.3e} (final norm {result['final_norm']}); "
        f"empirical ‖h_L‖²/d_model: median {h['median']:.3e}, min {h['min']:.3e}\n"
        f"paper-style C_struct = 4·Q(β/α)·Q(C): median {overall['paper_style_c_struct']['median']:.2e}, "
        f"p95 {overall['paper_style_c_struct']['p95']:.2e}\n"
        f"gradient ratio ‖G_int‖²/‖G_lm‖²: median {overall['grad_ratio']['median']:.2e}, "
        f"p95 {overall['grad_ratio']['p95']:.2e}; ratio/bound median "
        f"{overall['theorem1']['ratio_over_bound']['median']:.2e}, max {overall['theorem1']['ratio_over_bound']['max']:.2e}\n"
        f"took {result['elapsed_s']:.1f} s on {result['device']} ({result['dtype']})"
    )


def run(args) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from dgg.theory import ConstantsConfig, encode_probe_texts, measure_constants, summarise

    console = Console()
    if not console.is_terminal:  # piped or logged: do not squeeze the table into 80 columns
        console = Console(width=170)
    try:
        if (args.prompts is None) == (args.task is None):
            raise ValueError("give exactly one of --prompts FILE or --task NAME for the held-out text")
        if args.max_length < 2:
            raise ValueError(f"--max-length must be >= 2, got {args.max_length}")
        config = ConstantsConfig(tokens=args.tokens, samples=args.samples, exact_vocab_max=args.exact_vocab_max,
                                 layers=args.layers, batch_size=args.batch_size, seed=args.seed)
        texts = read_prompts(args.prompts) if args.prompts else task_prompts(args.task, args.texts)
        device = pick_device(args.device)
        tokenizer, model = load_model(args.model, args.dtype, device)
        texts_ids = encode_probe_texts(tokenizer, texts, args.max_length, device)
        start = time.perf_counter()
        with Progress(transient=True, console=Console(stderr=True)) as progress:
            bar = progress.add_task("measuring tokens", total=min(args.tokens, sum(len(t) - 1 for t in texts_ids)))
            measurement = measure_constants(model, texts_ids, config,
                                            progress=lambda done, total: progress.update(bar, completed=done))
        elapsed = time.perf_counter() - start
    except ValueError as err:
        if getattr(args, "debug", False):
            raise
        print(f"dgg constants: error: {err}", file=sys.stderr)
        return 2
    result = {
        "model": args.model,
        "device": str(device),
        "dtype": args.dtype,
        "config": asdict(config),
        "texts": len(texts_ids),
        "max_length": args.max_length,
        "elapsed_s": elapsed,
        "d_model": measurement.d_model,
        "vocab_size": measurement.vocab_size,
        "final_norm": measurement.final_norm,
        "alpha_min": measurement.alpha_min,
        "estimator": measurement.estimator,
        "samples": measurement.samples,
        "tokens_measured": len(measurement.tokens),
        "sites": measurement.sites,
        "summary": summarise(measurement),
        "tokens": [asdict(t) for t in measurement.tokens],
    }
    print_table(result, console)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=1))
        console.print(f"wrote {args.json_out}")
    return 0

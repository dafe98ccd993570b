"""A tiny, fast GRPO setup shared by the TRL integration tests and their multi-process worker."""

from __future__ import annotations

from pathlib import Path

TINY_SHAPE = dict(hidden_size=32, intermediate_size=64)


def save_tiny_model(directory: Path) -> str:
    """Build the tiny random Qwen2 model and its character tokenizer into ``directory``; returns its path."""
    from dgg.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, TinyModelConfig(**TINY_SHAPE), seed=0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def addition_prompts(count: int = 16):
    """Plain-text prompts such as ``"1+3="`` (no chat template needed)."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(4) for b in range(4)][:count]})


def digit_fraction_reward(completions, **kwargs) -> list[float]:
    """Share of digit characters in each completion: varies within a group, so advantages are non-zero."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


def tiny_config_kwargs(output_dir: str, **overrides) -> dict:
    """GRPOConfig arguments for a few-second CPU run: one prompt group of 4, completions of 4 characters."""
    kwargs = dict(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=4,
        num_iterations=2,
        max_steps=4,
        learning_rate=1e-2,
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return kwargs

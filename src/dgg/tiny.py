"""Tiny Hugging Face models and tokenizers built from nothing, for tests and the embedded default.

Nothing here touches a model hub: the tokenizer is a real ``PreTrainedTokenizerFast`` built with the
``tokenizers`` library over a given vocabulary of characters, and the model a Qwen2-architecture causal LM
from a config, so everything downstream (``save_pretrained``/``from_pretrained``, ``generate``) is the code
path a real model takes.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch

# Characters for arithmetic prompts and short written answers.
DEFAULT_CHARACTERS = string.digits + "+-*/=()., " + string.ascii_letters + "?:<>"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_char_tokenizer(characters: str = DEFAULT_CHARACTERS):
    """A character-level fast tokenizer: one token per character, plus <pad>, <bos>, <eos>, <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(characters))  # unique, order kept
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left",  # decoder-only generation pads on the left
    )
    return tokenizer


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of a tiny Qwen2-style model."""

    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 128
    tie_word_embeddings: bool = False


def build_tiny_model(tokenizer, config: TinyModelConfig = TinyModelConfig(), seed: int = 0):
    """A randomly initialised Qwen2ForCausalLM sized for ``tokenizer``; deterministic for ``seed``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(hf_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def load_tokenizer(path: str):
    """``AutoTokenizer.from_pretrained``, except for tokenizers saved from a bare ``tokenizers`` object.

    transformers picks the tokenizer class from the model type in config.json (Qwen2Tokenizer for our tiny
    Qwen2 models), which re-interprets such a vocabulary and drops spaces; those directories say
    ``"tokenizer_class": "TokenizersBackend"`` and load exactly with ``PreTrainedTokenizerFast``.
    """
    import json
    from pathlib import Path

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = Path(path) / "tokenizer_config.json"
    if config_file.is_file():
        saved_class = json.loads(config_file.read_text()).get("tokenizer_class")
        if saved_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)

import os
import sys

import pytest
import torch

from dgg.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model

# Tests live in folders that mirror the package (tests/tasks/ for dgg/tasks/, ...); the helpers they share
# (trainer_helpers, fault_harness, trl_setup, ...) stay here, importable from every folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SMALL = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    torch.set_num_threads(1)  # tiny models gain nothing from threads; the suite runs on 2 cores


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A small random Qwen2 model + character tokenizer saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("tiny_model")
    tokenizer = build_char_tokenizer()
    build_tiny_model(tokenizer, SMALL, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

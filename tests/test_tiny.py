import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dgg.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model


def test_char_tokenizer_round_trips_and_pads_left():
    tok = build_char_tokenizer()
    enc = tok(["12+3=", "7-1="], padding=True)
    assert tok.batch_decode(enc["input_ids"], skip_special_tokens=True) == ["12+3=", "7-1="]
    assert enc["attention_mask"][1][0] == 0  # left padding
    assert tok.eos_token_id != tok.pad_token_id


def test_tiny_model_is_deterministic_and_saves_as_hf_directory(tmp_path):
    tok = build_char_tokenizer()
    a, b = build_tiny_model(tok, seed=3), build_tiny_model(tok, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    a.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, a.lm_head.weight)
    assert AutoTokenizer.from_pretrained(tmp_path)("7=").input_ids == tok("7=").input_ids


def test_tied_variant_shares_the_output_embedding():
    model = build_tiny_model(build_char_tokenizer(), TinyModelConfig(tie_word_embeddings=True))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_saved_tokenizer_reloads_exactly_with_spaces(tmp_path):
    from dgg.tiny import load_tokenizer

    tok = build_char_tokenizer()
    build_tiny_model(tok, TinyModelConfig(hidden_size=16, intermediate_size=32)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded("a b").input_ids == tok("a b").input_ids and len(loaded("a b").input_ids) == 3
    assert loaded.padding_side == "left" and loaded.eos_token == "<eos>"

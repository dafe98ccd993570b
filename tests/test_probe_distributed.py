"""LMHeadGradProbe under data parallelism: 2 CPU processes over gloo, DDP and FSDP2, tied and untied.

Each rank sees different data. Checked: both ranks read bit-identical energies and take identical gate
decisions, and the energies equal a single-process run on the concatenated batch with DDP's/FSDP2's mean.
"""

import functools
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dgg import GradientGate, LMHeadGradProbe
from dgg.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
WORLD = 2
BATCHES = 3
MAX_REUSE = 3
SCENARIOS = [("ddp", True), ("ddp", False), ("fsdp2", True), ("fsdp2", False)]


def rank_texts(batch_index: int, rank: int) -> list[str]:
    """Different prompts (and lengths, so left padding) per rank and batch."""
    base = 7 * batch_index + 3 * rank
    return [f"{base + i}*{i + 2}={(base + i) * (i + 2)}" + " ok" * ((i + rank) % 3) for i in range(3)]


def local_loss(model, tokenizer, texts: list[str], batch_index: int, rank: int) -> torch.Tensor:
    """GRPO-like surrogate: −mean over response tokens of A · π/π_old (π_old = π detached)."""
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    advantages = torch.tensor([1.0, -0.5, 0.25]) * (1 + batch_index + rank)
    token_mask = mask[:, 1:].float()
    return -(advantages[:, None] * torch.exp(logp - logp.detach()) * token_mask).sum() / token_mask.sum()


def reuse_loop(model, tokenizer, loss_for_batch, probe_model=None):
    """Algorithm 1's reuse loop: up to MAX_REUSE updates per batch, stop at the first discard."""
    probe = LMHeadGradProbe(probe_model or model, tied="output")
    gate = GradientGate(tau=0.1, window=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    energies, decisions = [], []
    for batch_index in range(BATCHES):
        for reuse_index in range(1, MAX_REUSE + 1):
            loss_for_batch(model, batch_index).backward()
            energy = probe.energy()
            decision = gate.observe(float(energy), reuse_index)
            energies.append(energy.item())
            decisions.append(decision.discard)
            if not decision.discard:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            probe.reset()
            if decision.discard:
                break
    probe.close()
    return energies, decisions


def make_model(tokenizer, tied: bool):
    return build_tiny_model(tokenizer, TinyModelConfig(**SMALL, tie_word_embeddings=tied), seed=0)


def _worker(rank: int, port: int, out_dir: str) -> None:
    import os

    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    tokenizer = build_char_tokenizer()
    results = {}
    for wrapper, tied in SCENARIOS:
        model = make_model(tokenizer, tied)
        if wrapper == "ddp":
            wrapped = DistributedDataParallel(model)
        else:
            for layer in model.model.layers:
                fully_shard(layer)
            wrapped = fully_shard(model)

        def loss_for_batch(m, batch_index):
            return local_loss(m, tokenizer, rank_texts(batch_index, rank), batch_index, rank)

        results[(wrapper, tied)] = reuse_loop(wrapped, tokenizer, loss_for_batch)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("probe_dist")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@functools.cache
def single_process_reference(tied: bool):
    """The same loop in one process on both ranks' batches, loss = mean of the ranks' losses (DDP's mean)."""
    tokenizer = build_char_tokenizer()

    def loss_for_batch(m, batch_index):
        losses = [local_loss(m, tokenizer, rank_texts(batch_index, r), batch_index, r) for r in range(WORLD)]
        return sum(losses) / WORLD

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread avoids stalls on a busy 2-core machine
    try:
        return reuse_loop(make_model(tokenizer, tied), tokenizer, loss_for_batch)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("wrapper, tied", SCENARIOS, ids=[f"{w}-{'tied' if t else 'untied'}" for w, t in SCENARIOS])
def test_ranks_agree_and_match_single_process(distributed_results, wrapper, tied):
    (energies0, decisions0), (energies1, decisions1) = (r[(wrapper, tied)] for r in distributed_results)
    assert energies0 == energies1  # bit-identical: the gate can never split the ranks
    assert decisions0 == decisions1
    reference_energies, reference_decisions = single_process_reference(tied)
    assert decisions0 == reference_decisions
    assert energies0 == pytest.approx(reference_energies, rel=2e-4)
    assert len(energies0) >= BATCHES and all(e > 0 for e in energies0)
    assert any(decisions0) and not all(decisions0)  # the gate both accepted and discarded

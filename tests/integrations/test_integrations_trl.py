"""Tests for src/dgg/integrations/trl.py: DGG as a drop-in GRPOTrainer (paper Algorithm 1 inside TRL's loop)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from dgg.integrations.trl import (  # noqa: E402
    GATE_STATE_FILE,
    STATE_FILE,
    DGGGRPOConfig,
    DGGGRPOTrainer,
    _refuse_unsupported_distribution,
    next_generation_boundary,
    reuse_index_of_step,
    skip_scaled_optimizer_step,
)
from trl_setup import addition_prompts, digit_fraction_reward, save_tiny_model, tiny_config_kwargs  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tiny matmuls on a shared machine run ~4x faster without intra-op threads.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def make_trainer(trainer_class, config_class, model_dir, output_dir, **overrides):
    from transformers import AutoTokenizer

    args = config_class(**tiny_config_kwargs(str(output_dir), **overrides))
    return trainer_class(
        model_dir,
        reward_funcs=digit_fraction_reward,
        args=args,
        train_dataset=addition_prompts(),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )


def weights(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


# ---- the pure bookkeeping -------------------------------------------------------------------------------


def test_reuse_index_follows_trl_schedule_with_one_generation_batch_per_optimizer_step():
    # steps_per_generation = gradient_accumulation_steps = 1, K = 3: each optimizer step is one micro-step.
    assert [reuse_index_of_step(n, 1, 3) for n in range(1, 8)] == [1, 2, 3, 1, 2, 3, 1]


def test_reuse_index_with_gradient_accumulation_and_longer_generation_batches():
    # gradient_accumulation_steps = 2, steps_per_generation = 4, K = 2: a batch lives 8 micro-steps = 4 optimizer
    # steps; the sync micro-steps are 2, 4, 6, 8, 10, ... -> passes 1, 1, 2, 2, then a fresh batch.
    assert [reuse_index_of_step(n, 4, 2) for n in range(2, 19, 2)] == [1, 1, 2, 2, 1, 1, 2, 2, 1]
    with pytest.raises(ValueError, match="micro_steps_done"):
        reuse_index_of_step(0, 1, 2)


def test_next_generation_boundary_rounds_up_to_the_batch_life():
    # life = steps_per_generation * K = 2 * 3 = 6 micro-steps
    assert [next_generation_boundary(n, 2, 3) for n in (2, 4, 6, 8, 12)] == [6, 6, 6, 12, 12]


# ---- config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dgg_enabled", "yes"),
        ("dgg_tau", float("nan")),
        ("dgg_tau", -math.inf),
        ("dgg_tau", "0.5"),
        ("dgg_window", 1),
        ("dgg_window", 2.5),
        ("dgg_history", "recent"),
        ("dgg_tied", ""),
        ("dgg_fresh_drop", "skip"),
    ],
)
def test_config_rejects_bad_dgg_fields_by_name(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        DGGGRPOConfig(**tiny_config_kwargs(str(tmp_path), **{field: value}))


def test_config_defaults_are_the_papers(tmp_path):
    config = DGGGRPOConfig(**tiny_config_kwargs(str(tmp_path)))
    assert (config.dgg_enabled, config.dgg_tau, config.dgg_window, config.dgg_history, config.dgg_tied) == (
        True, 0.5, 20, "all", "output")
    assert DGGGRPOConfig(**tiny_config_kwargs(str(tmp_path), dgg_tau=math.inf)).dgg_tau == math.inf


def test_config_needs_each_optimizer_step_inside_one_reuse_pass(tmp_path):
    # gradient_accumulation_steps=2 with a generation batch of one micro-batch: an optimizer step spans 2 passes.
    kwargs = tiny_config_kwargs(str(tmp_path), gradient_accumulation_steps=2, steps_per_generation=1)
    with pytest.raises(ValueError, match="steps_per_generation"):
        DGGGRPOConfig(**kwargs)
    assert DGGGRPOConfig(**kwargs, dgg_enabled=False).steps_per_generation == 1


def test_trainer_needs_a_dgg_config(tiny_model_dir, tmp_path):
    with pytest.raises(TypeError, match="DGGGRPOConfig"):
        make_trainer(DGGGRPOTrainer, GRPOConfig, tiny_model_dir, tmp_path)


def test_deepspeed_and_fsdp1_are_refused_and_fsdp2_warns():
    with pytest.raises(ValueError, match="DeepSpeed"):
        _refuse_unsupported_distribution(DistributedType.DEEPSPEED)
    with pytest.raises(ValueError, match="FSDP version 1.*local shard"):
        _refuse_unsupported_distribution(DistributedType.FSDP, fsdp_version=1)
    with pytest.warns(UserWarning, match="untested"):
        _refuse_unsupported_distribution(DistributedType.FSDP, fsdp_version=2)
    _refuse_unsupported_distribution(DistributedType.MULTI_CPU)  # DDP: supported, silent


def _scaled_step(optimizer, scaler, model, discard: bool) -> None:
    """One fp16-style optimizer step as transformers.Trainer + accelerate run it: scaled backward, unscale_ for
    gradient clipping, then AcceleratedOptimizer.step (scaler.step + scaler.update)."""
    scaler.scale(model(torch.ones(1, 4)).sum()).backward()
    if discard:
        model.zero_grad(set_to_none=True)  # what a DGG discard does
        skip_scaled_optimizer_step(optimizer, scaler)
    scaler.unscale_(optimizer.optimizer)  # accelerator.clip_grad_norm_ -> unscale_gradients
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_a_discard_under_fp16_loss_scaling_skips_the_step_without_crashing():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)  # the state AcceleratedOptimizer reads
    model = torch.nn.Linear(4, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer = AcceleratedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1), scaler=scaler)
    # the crash being fixed: every grad None, and GradScaler.step finds no inf check
    scaler.scale(model(torch.ones(1, 4)).sum()).backward()
    model.zero_grad(set_to_none=True)
    scaler.unscale_(optimizer.optimizer)
    with pytest.raises(AssertionError, match="No inf checks"):
        optimizer.step()
    scaler.update(new_scale=1024.0)  # end the broken iteration before the real test

    before = {k: v.clone() for k, v in model.state_dict().items()}
    _scaled_step(optimizer, scaler, model, discard=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert optimizer.optimizer.state == {} and scaler.get_scale() == 1024.0  # AdamW untouched, scale kept
    _scaled_step(optimizer, scaler, model, discard=False)  # the next step is a normal one again
    assert not torch.equal(model.weight, before["weight"]) and len(optimizer.optimizer.state) == 2


def test_the_private_trl_api_dgg_relies_on_still_exists(tiny_model_dir, tmp_path):
    """A TRL upgrade that renames any of these breaks the integration; this says which, by name."""
    methods = ("training_step", "_compute_loss", "_get_per_token_logps_and_entropies", "_save_checkpoint",
               "_load_optimizer_and_scheduler", "_get_output_dir", "_generate_and_score_completions",
               "_prepare_inputs")
    missing = [name for name in methods if not callable(getattr(GRPOTrainer, name, None))]
    assert missing == [], f"TRL no longer has GRPOTrainer.{', '.join(missing)}: dgg.integrations.trl needs updating"
    trainer = make_trainer(DGGGRPOTrainer, DGGGRPOConfig, tiny_model_dir, tmp_path, max_steps=1)
    for attribute in ("_step", "_metrics", "num_iterations"):
        assert hasattr(trainer, attribute), f"GRPOTrainer instances no longer have {attribute}"
    assert isinstance(trainer._step, int) and "train" in trainer._metrics
    for field_name in ("steps_per_generation", "num_iterations", "epsilon", "epsilon_high"):
        assert hasattr(trainer.args, field_name), f"GRPOConfig no longer has {field_name}"


def test_importing_without_trl_says_how_to_install(tmp_path):
    # A meta-path finder that hides trl, as if it were not installed.
    code = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'trl' or name.startswith('trl.'):\n"
        "            raise ImportError('No module named trl')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import dgg\n"
        "try:\n"
        "    import dgg.integrations.trl\n"
        "except ImportError as e:\n"
        "    print('IMPORT-ERROR:', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "IMPORT-ERROR:" in out.stdout and "pip install dgg[trl]" in out.stdout


# ---- training --------------------------------------------------------------------------------------------


def test_disabled_or_infinite_tau_trains_identically_to_stock_grpo(tiny_model_dir, tmp_path):
    stock = make_trainer(GRPOTrainer, GRPOConfig, tiny_model_dir, tmp_path / "stock")
    initial = weights(stock)
    stock.train()
    reference = weights(stock)
    assert any(not torch.equal(initial[n], reference[n]) for n in initial), "training changed nothing"

    for overrides in ({"dgg_enabled": False}, {"dgg_tau": math.inf}):
        trainer = make_trainer(DGGGRPOTrainer, DGGGRPOConfig, tiny_model_dir, tmp_path / str(overrides), **overrides)
        trainer.train()
        for name, value in weights(trainer).items():
            assert torch.equal(value, reference[name]), f"{name} differs with {overrides}"  # bitwise

    logs = [entry for entry in trainer.state.log_history if "reuse_index" in entry]
    assert [entry["reuse_index"] for entry in logs] == [1.0, 2.0, 1.0, 2.0]
    assert [entry["gate/observations"] for entry in logs] == [1.0, 2.0, 3.0, 4.0]
    assert all(entry["gate/discards"] == 0.0 and entry["actor/lm_head_grad_energy"] > 0 for entry in logs)

    # Watch mode with a rule that would stop every reuse step: training is stock's, bit for bit, and the log
    # says where the rule would have stopped.
    watch = make_trainer(DGGGRPOTrainer, DGGGRPOConfig, tiny_model_dir, tmp_path / "watch", dgg_watch_only=True,
                         dgg_rule="kl", dgg_target_kl=1e-12)
    watch.train()
    for name, value in weights(watch).items():
        assert torch.equal(value, reference[name]), f"{name} differs in watch mode"
    logs = [entry for entry in watch.state.log_history if "reuse_index" in entry]
    assert [entry["reuse/would_stop"] for entry in logs] == [0.0, 1.0, 0.0, 1.0]
    assert all(entry["reuse/stop"] == 0.0 and entry["actor/applied"] == 1.0 for entry in logs)


class Snapshots(TrainerCallback):
    """Weights and AdamW state after every optimizer step, keyed by global_step."""

    def __init__(self):
        self.by_step = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        adam = {}
        for p in model.parameters():
            if p in optimizer.state:
                s = optimizer.state[p]
                adam[id(p)] = (s["exp_avg"].clone(), s["exp_avg_sq"].clone(), s["step"].clone())
        self.by_step[state.global_step] = ([p.detach().clone() for p in model.parameters()], adam)


def test_a_spike_on_a_reuse_step_is_discarded_and_the_next_step_regenerates(tiny_model_dir, tmp_path):
    trainer = make_trainer(
        DGGGRPOTrainer, DGGGRPOConfig, tiny_model_dir, tmp_path, num_iterations=3, max_steps=7, dgg_window=2
    )
    # Scripted energies (hand-computed in the comments); the real gradients still flow to the optimizer.
    # step 1..4: 1, 2, 4, 5 -> increments 1, 2, 1, window [2, 1] full; step 5 (k=2): 1000 -> z ~ 1.4e3 > 0.5.
    # step 6 (k=1 of a fresh batch): 6, delta 1 from the last accepted 5 -> z = -0.707; step 7 (k=2): 7 -> z = 0.
    energies = iter([1.0, 2.0, 4.0, 5.0, 1000.0, 6.0, 7.0])
    trainer._lm_head_grad_energy = lambda: next(energies)
    generations = []  # (global_step when generating, prompts)
    original_generate = trainer._generate_and_score_completions

    def counting_generate(batch):
        generations.append((trainer.state.global_step, sorted({row["prompt"] for row in batch})))
        return original_generate(batch)

    trainer._generate_and_score_completions = counting_generate
    snapshots = Snapshots()
    trainer.add_callback(snapshots)
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "gate/discard" in entry]
    assert [entry["reuse_index"] for entry in logs] == [1.0, 2.0, 3.0, 1.0, 2.0, 1.0, 2.0]
    assert [entry["gate/discard"] for entry in logs] == [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert logs[4]["gate/z"] == pytest.approx((995 - 1.5) / math.sqrt(0.5), rel=1e-6)
    assert logs[5]["gate/z"] == pytest.approx(-0.5 / math.sqrt(0.5), rel=1e-6)
    assert logs[-1]["gate/discards"] == 1.0 and logs[-1]["gate/observations"] == 7.0
    assert trainer.state.global_step == 7  # a discarded attempt still counts as a step

    # Step 5 changed neither the weights nor AdamW's moments and step counts.
    weights_4, adam_4 = snapshots.by_step[4]
    weights_5, adam_5 = snapshots.by_step[5]
    assert all(torch.equal(a, b) for a, b in zip(weights_4, weights_5, strict=True))
    assert adam_4.keys() == adam_5.keys() and len(adam_4) > 0
    for key, (exp_avg, exp_avg_sq, step) in adam_4.items():
        assert torch.equal(exp_avg, adam_5[key][0]) and torch.equal(exp_avg_sq, adam_5[key][1])
        assert step.item() == adam_5[key][2].item() == 4.0
    weights_6, _ = snapshots.by_step[6]
    assert any(not torch.equal(a, b) for a, b in zip(weights_5, weights_6, strict=True))

    # Without the discard TRL generates before steps 0, 3, 6; the discard at step 5 (0-based 4) moves it to 5,
    # on the same prompts the sampler still had scheduled (regenerated with the current policy).
    assert [step for step, _ in generations] == [0, 3, 5]
    assert generations[2][1] == generations[1][1]


def record_generation_steps(trainer) -> list[int]:
    """The global step at each generation of ``trainer``, filled in as it trains."""
    steps, original_generate = [], trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda batch: (
        steps.append(trainer.state.global_step), original_generate(batch))[1]
    return steps


def test_discard_under_gradient_accumulation_ends_the_batch_at_an_optimizer_step(tiny_model_dir, tmp_path):
    # 2 micro-batches of 2 completions per optimizer step (steps_per_generation = 2), K = 3, window 2 and a very
    # negative tau: the first reuse step after the window fills (step 5, k = 2) is discarded.
    trainer = make_trainer(
        DGGGRPOTrainer, DGGGRPOConfig, tiny_model_dir, tmp_path, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, num_iterations=3, max_steps=6, dgg_window=2, dgg_tau=-1e9,
    )
    generation_steps = record_generation_steps(trainer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "gate/discard" in entry]
    assert [entry["reuse_index"] for entry in logs] == [1.0, 2.0, 3.0, 1.0, 2.0, 1.0]
    assert [entry["gate/discard"] for entry in logs] == [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert generation_steps == [0, 3, 5]  # stock TRL: 0, 3, 6
    assert trainer._step == 14  # 10 micro-steps after step 5, moved to the boundary 12, + 2 for step 6


@pytest.mark.parametrize("fresh_drop, reuse_indices, generation_steps", [
    ("end_batch", [1.0, 1.0, 1.0, 2.0], [0, 1]),  # the drop on the first step regenerates at once
    ("skip_step", [1.0, 1.0, 2.0, 2.0], [0]),  # it skips that step alone; the batch's second fresh step trains
])
def test_a_drop_on_a_fresh_step_regenerates_or_skips_that_step_alone(tiny_model_dir, tmp_path, fresh_drop,
                                                                     reuse_indices, generation_steps):
    # Two optimizer steps per pass over a generation batch (steps_per_generation = 2), K = 2; the first step's
    # lm_head energy is non-finite, so it is dropped at k = 1.
    trainer = make_trainer(
        DGGGRPOTrainer, DGGGRPOConfig, tiny_model_dir, tmp_path, per_device_train_batch_size=2,
        steps_per_generation=2, num_iterations=2, max_steps=4, dgg_fresh_drop=fresh_drop,
    )
    energies = iter([math.nan, 1.0, 2.0, 3.0])
    trainer._lm_head_grad_energy = lambda: next(energies)
    generations = record_generation_steps(trainer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "reuse_index" in entry]
    assert [entry["reuse_index"] for entry in logs] == reuse_indices
    assert [entry["actor/applied"] for entry in logs] == [0.0, 1.0, 1.0, 1.0]
    assert logs[0]["reuse/step_skipped"] == float(fresh_drop == "skip_step")
    assert generations == generation_steps


def test_gate_state_is_saved_with_checkpoints_and_restored(tiny_model_dir, tmp_path):
    trainer = make_trainer(
        DGGGRPOTrainer, DGGGRPOConfig, tiny_model_dir, tmp_path, max_steps=2, save_strategy="steps", save_steps=2
    )
    trainer.train()
    saved = json.loads((tmp_path / "checkpoint-2" / STATE_FILE).read_text())
    assert saved["reuse_rule"]["rules"] == ["dgg"] and saved["reuse_rule"]["state"][0] == saved["watch"]
    saved = saved["watch"]
    assert saved == trainer.dgg_gate.state_dict() and saved["observations"] == 2

    resumed = make_trainer(DGGGRPOTrainer, DGGGRPOConfig, tiny_model_dir, tmp_path, max_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.dgg_gate.observations == 3  # two restored + one new
    restored = resumed.dgg_gate.state_dict()
    # The restored increment is still in the window; the new one is measured from the restored g_prev.
    assert len(saved["increments"]) == 1 and restored["increments"][0] == saved["increments"][0]
    assert restored["increments"][1] == pytest.approx(restored["last_accepted_energy"] - saved["last_accepted_energy"])


def test_a_checkpoint_written_before_the_controller_still_restores_the_gate(tiny_model_dir, tmp_path):
    trainer = make_trainer(
        DGGGRPOTrainer, DGGGRPOConfig, tiny_model_dir, tmp_path, max_steps=2, save_strategy="steps", save_steps=2
    )
    trainer.train()
    folder = tmp_path / "checkpoint-2"
    state = json.loads((folder / STATE_FILE).read_text())
    (folder / STATE_FILE).unlink()  # the layout of earlier releases: the gate's state plus the rule's
    (folder / GATE_STATE_FILE).write_text(json.dumps({**state["watch"], "reuse_rule": state["reuse_rule"]}))
    resumed = make_trainer(DGGGRPOTrainer, DGGGRPOConfig, tiny_model_dir, tmp_path, max_steps=3)
    resumed.train(resume_from_checkpoint=str(folder))
    assert resumed.dgg_gate.observations == 3


def test_sigterm_saves_a_checkpoint_with_the_rule_state_and_stops_after_the_step(tiny_model_dir, tmp_path):
    import signal

    from dgg.preemption import RunStopped

    trainer = make_trainer(DGGGRPOTrainer, DGGGRPOConfig, tiny_model_dir, tmp_path, max_steps=4)

    class TermDuringStep2(TrainerCallback):  # the signal lands inside optimizer step 2, before it is taken
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer.add_callback(TermDuringStep2())
    with pytest.raises(RunStopped, match="SIGTERM after optimizer step 2") as stopped:
        trainer.train()
    assert stopped.value.exit_code == 143
    assert trainer.state.global_step == 2  # step 2 completed; steps 3 and 4 never ran
    saved = json.loads((tmp_path / "checkpoint-2" / STATE_FILE).read_text())
    assert saved["watch"]["observations"] == 2 and saved["reuse_rule"]["rules"] == ["dgg"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler lived only during train()

    resumed = make_trainer(DGGGRPOTrainer, DGGGRPOConfig, tiny_model_dir, tmp_path, max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 4 and resumed.dgg_gate.observations == 4


# a real 2-process gloo group; ~25 s on 2 cores, mostly process start-up
def test_two_processes_make_the_same_gate_decisions(tiny_model_dir, tmp_path):
    # `--cpu` would pick accelerate's single-process (MPI) launcher; `--multi_gpu` is its torchrun launcher, and
    # use_cpu=True in the config makes the two processes a gloo (MULTI_CPU) DDP group.
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO_ROOT / "tests" / "trl_ddp_worker.py"), tiny_model_dir, str(tmp_path),
    ]
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'src'}{os.pathsep}{REPO_ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]

    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["decisions"] == rank1["decisions"]
    # K=3, window 2 and a very negative tau: every reuse step once the window is full is discarded, and the
    # step after a discard starts a fresh batch (k=1).
    assert [d["reuse_index"] for d in rank0["decisions"]] == [1, 2, 3, 1, 2, 1]
    assert [d["discard"] for d in rank0["decisions"]] == [False, False, False, False, True, False]
    assert rank0["weights_sha256"] == rank1["weights_sha256"]


def test_the_kl_rule_stops_reuse_inside_trl_with_sb3_semantics(tiny_model_dir, tmp_path):
    """rule=kl: the approximate KL of each optimizer step decides; k = 1 is always applied."""
    trainer = make_trainer(DGGGRPOTrainer, DGGGRPOConfig, tiny_model_dir, tmp_path, max_steps=2, num_iterations=2,
                           dgg_rule="kl", dgg_target_kl=1e-9)
    trainer.train()
    assert trainer.dgg_gate is None and trainer.dgg_rule.name == "kl"
    logs = [entry for entry in trainer.state.log_history if "reuse_index" in entry]
    assert [entry["reuse_index"] for entry in logs] == [1.0, 2.0]
    assert [entry["reuse/stop"] for entry in logs] == [0.0, 1.0]  # KL > 1.5e-9 after one step at lr 1e-2
    assert [entry["gate/discard"] for entry in logs] == [0.0, 0.0]  # the paper's gate did not drop it: KL did
    assert logs[0]["actor/kl"] == pytest.approx(0.0, abs=1e-7) and logs[1]["actor/kl"] > 1.5e-9
    assert trainer.dgg_rule.stops_by_reason == {"kl": 1}
    assert trainer.dgg_last_signals.active_tokens > 0 and trainer.dgg_last_signals.has_signal is not None


def test_unknown_rule_names_are_refused_by_the_config(tmp_path):
    with pytest.raises(ValueError, match="valid rules"):
        DGGGRPOConfig(**tiny_config_kwargs(str(tmp_path), dgg_rule="sb3"))


def test_the_gradnorm_rule_reads_the_pre_clip_global_norm_inside_trl(tiny_model_dir, tmp_path):
    def first_step(max_grad_norm):
        trainer = make_trainer(DGGGRPOTrainer, DGGGRPOConfig, tiny_model_dir, tmp_path / str(max_grad_norm),
                               max_steps=1, dgg_rule="gradnorm", dgg_gradnorm_window=19, max_grad_norm=max_grad_norm)
        seen = []

        class Norms(TrainerCallback):  # Trainer calls it after clipping, just before the optimizer
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                seen.append(math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in model.parameters()
                                          if p.grad is not None)))

        trainer.add_callback(Norms())
        trainer.train()
        assert trainer.dgg_last_decision.values["gradnorm/ready"] is False  # 1 of the 20 norms it needs
        return trainer.dgg_last_signals.grad_norm, seen[0]

    read, after_no_clip = first_step(1e9)
    assert read == pytest.approx(after_no_clip, rel=1e-5) and read > 1e-3  # the global norm
    read_clipped, after_clip = first_step(1e-6)
    assert after_clip == pytest.approx(1e-6, rel=1e-3)
    assert read_clipped == pytest.approx(read, rel=1e-6)  # read before clipping


def test_the_trl_path_reaches_the_scripted_verdicts(tiny_model_dir, tmp_path, monkeypatch):
    from reuse_script import EXPECTED_REASONS, RULE, SCRIPT, SETTINGS, reference_metrics, statistics

    trainer = make_trainer(DGGGRPOTrainer, DGGGRPOConfig, tiny_model_dir, tmp_path, num_iterations=3,
                           dgg_rule=RULE, dgg_tau=SETTINGS.tau, dgg_window=SETTINGS.window,
                           dgg_target_kl=SETTINGS.target_kl, dgg_kl_estimator=SETTINGS.kl_estimator)
    tokens = (3.0, 5.0)
    current = {}
    monkeypatch.setattr("dgg.integrations.trl.ratio_statistics",
                        lambda logps, *a, **k: statistics(current["attempt"], current["micro_batch"]))
    monkeypatch.setattr("dgg.integrations.trl._pre_clip_grad_norm", lambda model: current["attempt"].grad_norm)
    monkeypatch.setattr(trainer, "_lm_head_grad_energy", lambda: current["attempt"].energy)
    trainer._dgg_probe = type("Probe", (), {"reset": lambda self: None})()
    verdicts = []
    for position, attempt in enumerate(SCRIPT):
        current["attempt"] = attempt
        for index, count in enumerate(tokens):  # TRL's micro-steps of one optimizer step
            current["micro_batch"] = index
            inputs = {"completion_mask": torch.ones(1, int(count)), "old_per_token_logps": None,
                      "advantages": torch.tensor([1.0 if attempt.has_signal else 0.0])}
            trainer._accumulate_ratio_statistics(torch.zeros(1, int(count)), inputs)
        trainer._step = position * 3 + attempt.reuse_index  # micro-steps done, as TRL counts them (K = 3)
        trainer._gate_optimizer_step(trainer.model)
        verdicts.append(trainer.dgg_last_verdict)
    assert [v.reason for v in verdicts] == EXPECTED_REASONS
    for verdict, expected in zip(verdicts, reference_metrics(tokens), strict=True):
        assert verdict.numeric_metrics() == pytest.approx(expected)

"""What it takes to run verl's real actor update loop on a CPU-only machine, each patch named.

verl 0.9.1 ships platforms for CUDA, ROCm and NPU only. None of these patches changes the update loop that
dgg hooks (``TrainingWorker.train_mini_batch`` → ``train_batch`` → ``engine.optimizer_step``):

1. ``CPUPlatform`` (installed with verl's own ``set_platform``): device "cpu", gloo, no memory statistics;
   ``current_device`` returns "cpu" because verl uses it as a ``.to(device=...)`` target.
2. ``VERL_ENGINE_DEVICE=cuda`` / ``VERL_ENGINE_VENDOR=nvidia`` (verl's own override): picks the FSDP engine,
   which verl registers for cuda and npu only; it runs unchanged on CPU tensors.
3. A gloo process group created before verl's, which would ask for NCCL.
4. ``attn_implementation=eager`` in the model's ``override_config``: verl defaults to flash-attention 2.
"""

from __future__ import annotations

import contextlib
import os
import types
from functools import partial

import torch
import torch.distributed as dist

os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")  # patch 2
os.environ.setdefault("VERL_ENGINE_VENDOR", "nvidia")

from verl.plugin.platform.platform_base import PlatformBase  # noqa: E402
from verl.plugin.platform.platform_manager import set_platform  # noqa: E402


def _cpu_device_module():
    module = types.SimpleNamespace(**{n: getattr(torch.cpu, n) for n in dir(torch.cpu) if not n.startswith("_")})
    zero = lambda *args, **kwargs: 0  # noqa: E731
    none = lambda *args, **kwargs: None  # noqa: E731
    module.max_memory_allocated = module.max_memory_reserved = module.memory_allocated = zero
    module.memory_reserved = zero
    module.empty_cache = module.reset_peak_memory_stats = module.set_device = none
    module.mem_get_info = lambda *args: (0, 0)
    module.get_device_name = lambda *args: "CPU"
    module.manual_seed = module.manual_seed_all = torch.manual_seed
    module.get_rng_state, module.set_rng_state = torch.get_rng_state, torch.set_rng_state  # checkpoints
    module.is_available = lambda: True
    module.current_device = lambda: "cpu"
    return module


class CPUPlatform(PlatformBase):  # patch 1
    device_name = "cpu"
    vendor_name = "cpu"
    device_module = _cpu_device_module()

    def is_available(self): return True
    def is_platform_available(self, use_smi_check=False): return True
    def current_device(self): return "cpu"
    def device_count(self): return 1
    def set_device(self, device_index): pass
    def synchronize(self, device_index=None): pass
    def manual_seed(self, seed): torch.manual_seed(seed)
    def manual_seed_all(self, seed): torch.manual_seed(seed)
    def set_allocator_settings(self, settings): pass
    def empty_cache(self): pass
    def get_device_capability(self, device_index=0): return (None, None)
    def communication_backend_name(self): return "gloo"
    def visible_devices_envvar(self): return "CPU_VISIBLE_DEVICES"
    def profiler_start(self): pass
    def profiler_stop(self): pass
    def ray_resource_name(self): return "CPU"
    def ray_noset_envvars(self): return []
    def is_ipc_supported(self): return False
    def cudart(self): return None

    @contextlib.contextmanager
    def nvtx_range(self, msg):
        yield


set_platform(CPUPlatform())


def init_gloo(rank: int = 0, world_size: int = 1, port: int = 29541) -> None:  # patch 3
    if not dist.is_initialized():
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)


def build_worker(model_dir, worker_cls, lr: float = 1e-3, mini_batch: int = 4, **worker_kwargs):
    """A verl actor TrainingWorker (FSDP2 engine, fp32) with verl's own PPO loss, as ActorRolloutRefWorker builds it."""
    from verl.trainer.config.config import CheckpointConfig
    from verl.workers.config import FSDPActorConfig, FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine_workers import TrainingWorkerConfig
    from verl.workers.utils.losses import ppo_loss

    model = HFModelConfig(path=str(model_dir), use_remove_padding=False, enable_gradient_checkpointing=False,
                          override_config={"attn_implementation": "eager"})  # patch 4
    engine = FSDPEngineConfig(strategy="fsdp2", dtype="float32", use_dynamic_bsz=False,
                              micro_batch_size_per_gpu=2)
    optim = FSDPOptimizerConfig(lr=lr, lr_warmup_steps=2, lr_scheduler_type="cosine", total_training_steps=40)
    config = TrainingWorkerConfig(model_type="language_model", model_config=model, engine_config=engine,
                                  optimizer_config=optim, checkpoint_config=CheckpointConfig())
    worker = worker_cls(config, **worker_kwargs)
    worker.reset()
    actor = FSDPActorConfig(strategy="fsdp2", ppo_mini_batch_size=mini_batch, ppo_micro_batch_size_per_gpu=2,
                            use_dynamic_bsz=False, rollout_n=1)
    worker.set_loss_fn(partial(ppo_loss, config=actor))
    return worker


def rollout_batch(seed: int, epochs: int, mini_batch: int = 4, size: int = 8, prompt: int = 5, response: int = 6):
    """A left-padded rollout batch in verl's layout, converted as RayPPOTrainer._update_actor does."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 40, (size, prompt + response), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[: size // 2, :2] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    advantages = torch.randn(size, 1, generator=generator).expand(size, response).contiguous()
    old_log_probs = -3.7 + 0.1 * torch.randn(size, response, generator=generator)
    batch = TensorDict({"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                        "prompts": input_ids[:, :prompt], "responses": input_ids[:, prompt:],
                        "response_mask": torch.ones(size, response, dtype=torch.long),
                        "old_log_probs": old_log_probs, "advantages": advantages}, batch_size=[size])
    batch = left_right_2_no_padding(batch)
    tu.assign_non_tensor(batch, calculate_entropy=False, distillation_use_topk=False, distillation_only=False,
                         global_batch_size=mini_batch, mini_batch_size=mini_batch, epochs=epochs, seed=1,
                         dataloader_kwargs={"shuffle": False}, compute_loss=True, temperature=1.0)
    return batch


def full_state(worker) -> dict[str, torch.Tensor]:
    """Every parameter, gathered from its FSDP2 shards."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in worker.engine.module.named_parameters()}

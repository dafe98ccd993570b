"""Two gloo ranks train one verl actor with DGG; each writes the stop decisions it logged (see the test)."""

import os
import sys

import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))


def run(rank: int, model_dir: str, out_dir: str, port: int) -> None:
    import torch

    torch.set_num_threads(1)
    from cpu_verl import build_worker, init_gloo, rollout_batch
    from verl.utils import tensordict_utils as tu

    from dgg.integrations.verl import DGGTrainingWorker
    from dgg.reuse_rules import RuleSettings

    init_gloo(rank, 2, port)
    worker = build_worker(model_dir, DGGTrainingWorker, settings=RuleSettings(tau=0.0, window=2))
    stops = []
    for seed in range(3):  # each rank its own half of the data, as verl's dispatch gives it
        output = worker.train_mini_batch(rollout_batch(10 * seed + rank, epochs=2))
        stops.append(tu.get(output, "metrics")["reuse/stop"] if output is not None else None)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as handle:
        handle.write(repr(stops) + "\n" + repr(worker.dgg_rule.state_dict()) + "\n")


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1], sys.argv[2], 29600 + os.getpid() % 300), nprocs=2, join=True)

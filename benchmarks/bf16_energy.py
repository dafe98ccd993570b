"""How far bf16 autocast moves the gate's input: the lm_head gradient energy of the same update, fp32 vs bf16.

    python benchmarks/bf16_energy.py --model smollm2-135m-instruct [--batches 3]

For each of a few rollout batches (sampled once, in fp32, from the same model and seed), one update attempt is
computed twice from the same weights: in fp32 and under ``train.precision=bf16``. Reported per batch: both
energies, the relative difference, and the same for the global gradient norm and the k3 KL at a second
(reuse) step. The weights are reset between the two so that both see identical inputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    from dgg.analysis import read_metrics
    from dgg.config import load_config
    from dgg.trainer import GRPOTrainer

    out = tempfile.mkdtemp(prefix="dgg-bf16-energy-")
    trainers = {}
    for precision in ("fp32", "bf16"):
        config = load_config("smollm2_arith", [f"model.path={args.model}", f"train.precision={precision}",
                                               "eval.every=0", "output.progress=false", "reuse.mode=fixed",
                                               f"output.dir={out}/{precision}"])
        trainers[precision] = GRPOTrainer(config)
    start = copy.deepcopy(trainers["fp32"].model.state_dict())
    rows = []
    for index in range(args.batches):
        torch.manual_seed(index)
        batch = trainers["fp32"].collect_rollouts()
        row = {"batch": index + 1, "reward_mean": float(batch.rewards.mean())}
        for precision, trainer in trainers.items():
            trainer.model.load_state_dict(start)
            trainer.optimizer.state.clear()
            batch.old_logprobs = None
            trainer.update(batch, 1)
            trainer.update(batch, 2)
            records = [r for r in read_metrics(trainer.run_dir) if r["kind"] == "update"][-2:]
            row[precision] = {f"k{r['reuse_index']}": {key: r[key] for key in (
                "actor/lm_head_grad_energy", "actor/grad_norm", "actor/kl")} for r in records}
        for k in ("k1", "k2"):
            for key in ("actor/lm_head_grad_energy", "actor/grad_norm"):
                a, b = row["fp32"][k][key], row["bf16"][k][key]
                row[f"{k} {key} rel. diff"] = abs(b - a) / abs(a) if a else None
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

"""Rewards from the user's code: ``task.reward: module:function``, tasks from ``__main__``, and a run that stops
when every reward keeps failing."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from dgg.cli import main as cli_main
from dgg.rewards import CustomReward, InProcessReward, scorable_task, spawnable
from dgg.tasks import Problem, TaskConfig, make_task

RUN = ["rollout.prompts_per_batch=2", "rollout.group_size=4", "rollout.max_new_tokens=4", "eval.every=0",
       "output.progress=false", "profile.weights_every=0", "task.test_size=4", "task.prompt_format=bare"]

REWARDS = textwrap.dedent('''
    def digits(completion, answer, problem):
        """Fraction of digit characters, and the prompt it saw, so a test can tell it was called."""
        share = sum(c.isdigit() for c in completion) / max(len(completion), 1)
        return share, {"prompt": problem.prompt}

    def always_fails(completion, answer, problem):
        raise RuntimeError("my reward is broken")
''')


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)  # importable from the run's working directory, as the docs say
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_a_reward_function_from_the_working_directory_replaces_the_tasks(tiny_model_dir, tmp_path, rewards_module):
    assert cli_main(["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "run"), *RUN,
                     "train.max_batches=1", f"task.reward={rewards_module}:digits"]) == 0
    rollout = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
               if '"rollout"' in x][0]
    assert rollout["reward/errors"] == 0
    task = CustomReward(make_task(TaskConfig(prompt_format="bare")), f"{rewards_module}:digits")
    problem = task.problem("train", 0)
    assert task.reward("12ab", problem.answer, problem) == (0.5, {"prompt": problem.prompt})
    assert spawnable(task)  # pickled by its spec, so the reward process imports the function itself


@pytest.mark.parametrize("spec, expected", [
    ("not a spec", "must look like 'module:function'"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("my_rewards:missing", "has no function 'missing'"),
])
def test_a_bad_reward_spec_is_named(tiny_model_dir, tmp_path, rewards_module, capsys, spec, expected):
    assert cli_main(["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "run"), *RUN,
                     f"task.reward={spec}"]) == 2
    err = capsys.readouterr().err
    assert "task.reward" in err and expected in err and "Traceback" not in err


def test_a_run_whose_rewards_all_fail_stops_and_keeps_its_checkpoint(tiny_model_dir, tmp_path, rewards_module,
                                                                      capsys):
    run = tmp_path / "run"
    assert cli_main(["train", "--model", str(tiny_model_dir), "--output", str(run), *RUN, "train.max_batches=5",
                     "train.checkpoint_every=1", "task.max_failed_batches=2",
                     f"task.reward={rewards_module}:always_fails"]) == 2
    err = capsys.readouterr().err
    assert "every reward failed on 2 batches in a row" in err and "my reward is broken" in err
    assert "--resume" in err and "reward_errors.jsonl" in err
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)["state"]
    assert state["batch"] == 1  # the second failing batch was never trained on, nor checkpointed
    assert len((run / "reward_errors.jsonl").read_text().splitlines()) == 2 * 2 * 4


class _LocalTask:
    name, isolate_reward = "local", True

    def problem(self, split, index):
        return Problem(prompt="1+1=", answer="2", meta={})

    def split_size(self, split):
        return 4

    def reward(self, completion, answer):
        return 1.0, {}


def test_a_task_a_reward_process_cannot_rebuild_is_scored_in_process():
    assert scorable_task(_LocalTask()).__class__ is _LocalTask  # importable from this test module

    class Inner(_LocalTask):  # a local class cannot be pickled
        pass

    wrapped = scorable_task(Inner())
    assert isinstance(wrapped, InProcessReward) and wrapped.isolate_reward is False
    assert wrapped.reward("2", "2") == (1.0, {})


def test_a_task_class_defined_in_a_script_main_gets_real_rewards(tiny_model_dir, tmp_path):
    """The reviewer's case: a Task defined in ``python -c`` (its ``__main__``) made every reward fail."""
    script = textwrap.dedent(f'''
        import json
        from dgg.config import load_config
        from dgg.tasks import Problem
        from dgg.trainer import GRPOTrainer

        class MyTask:
            name = "mine"
            def problem(self, split, index):
                return Problem(prompt=f"{{index % 7}}+1=", answer="", meta={{}})
            def split_size(self, split):
                return None if split == "train" else 4
            def reward(self, completion, answer):
                return sum(c.isdigit() for c in completion) / max(len(completion), 1), {{}}

        config = load_config(None, ["model.path={tiny_model_dir}", "output.dir={tmp_path / 'run'}",
                                    *{RUN[:-2]!r}, "train.max_batches=1"])
        trainer = GRPOTrainer(config, task=MyTask())
        trainer.train()
        print(json.dumps({{"errors": trainer.state.reward_errors, "scored_by": type(trainer.task).__name__}}))
    ''')
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"errors": 0, "scored_by": "InProcessReward"}
    assert "scored in this process" in done.stderr

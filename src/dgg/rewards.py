"""Rewards from the user's own code, scored where they can run.

``task.reward: "my_rewards:exact_match"`` names a function in a module importable from the run's working
directory (or installed). It replaces the task's reward and keeps the task's problems::

    def exact_match(completion: str, answer: str, problem: dgg.tasks.Problem) -> float | tuple[float, dict]:
        ...  # a reward in [0, 1]; the optional dict is logged beside it

The function runs in the task's reward process, so a crash or a hang costs one sample (``safe_reward``). A
Task object whose class a spawned process cannot import (defined in ``__main__`` of a notebook or ``python -c``,
or inside a function) is scored in the trainer's process instead, with a warning that no timeout then applies.
"""

from __future__ import annotations

import logging
import pickle

from dgg.errors import UserError
from dgg.named import REWARD_SPEC, check_reward_spec, import_named  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

def load_reward_function(spec: str):
    """The function named by ``module:function``; the working directory is importable, as for ``python -m``."""
    check_reward_spec(spec)
    function = import_named(spec, "task.reward")
    if not callable(function):
        raise UserError(f"task.reward {spec!r}: {spec.split(':')[0]} has no function {spec.split(':')[1]!r}")
    return function


class CustomReward:
    """A task whose reward is the user's function; problems, splits and name come from the wrapped task.
    Picklable by the spec string, so the reward process imports the function itself."""

    def __init__(self, task, spec: str):
        self.task, self.spec = task, spec
        self.name = f"{task.name}+{spec}"
        self.isolate_reward = True
        self._function = load_reward_function(spec)

    def __getstate__(self):
        return {"task": self.task, "spec": self.spec, "name": self.name, "isolate_reward": self.isolate_reward}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._function = load_reward_function(self.spec)

    def problem(self, split, index):
        return self.task.problem(split, index)

    def split_size(self, split):
        return self.task.split_size(split)

    def reward(self, completion, answer, problem=None):
        value = self._function(completion, answer, problem)
        return value if isinstance(value, tuple) else (value, {})


class InProcessReward:
    """A task scored in the trainer's own process (exceptions caught, no timeout): for Task objects that a
    spawned reward process could not rebuild."""

    isolate_reward = False

    def __init__(self, task):
        self.task, self.name = task, getattr(task, "name", type(task).__name__)

    def problem(self, split, index):
        return self.task.problem(split, index)

    def split_size(self, split):
        return self.task.split_size(split)

    def reward(self, completion, answer, problem=None):
        from dgg.tasks.sandbox import call_reward

        return call_reward(self.task, completion, answer, problem)


def spawnable(task) -> bool:
    """Whether a spawned process can rebuild ``task``: its class importable by name, and the object picklable."""
    if type(task).__module__ == "__main__":  # a notebook's or ``python -c``'s __main__ is not importable there
        return False
    try:
        pickle.dumps(task)
    except Exception:  # a local class, a lambda, an open handle...
        return False
    return True


def scorable_task(task):
    """``task`` as the trainer should score it: unchanged when it isolates its reward in a process that can
    rebuild it (or does not isolate at all); otherwise wrapped to score in-process, with a warning."""
    if not getattr(task, "isolate_reward", True) or spawnable(task):
        return task
    log.warning("task %s (%s) cannot be rebuilt in a reward process (defined in __main__ or not picklable): its "
                "rewards are scored in this process, without the timeout. Define the class in an importable "
                "module to get the timeout back.", getattr(task, "name", "?"), type(task).__qualname__)
    return InProcessReward(task)


def task_for_run(config, tokenizer, task=None):
    """The task a run trains on: ``task`` as given, or built from ``config.task`` (``prompt_format=auto`` resolved
    against the tokenizer's chat template and saved resolved in ``config``) with the user's ``task.reward``; in
    the form a reward process can rebuild (:func:`scorable_task`)."""
    if task is None:
        import dgg.agents  # noqa: F401  (registers the environments as a task family)
        from dgg.tasks import make_task, resolve_prompt_format

        config.task = resolve_prompt_format(config.task, bool(getattr(tokenizer, "chat_template", None)))
        task = make_task(config.task)
        if config.task.reward and not getattr(task, "is_environment", False):
            task = CustomReward(task, config.task.reward)
    return scorable_task(task)

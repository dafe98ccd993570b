"""Which task a config names: ``"math"`` or any reasoning-gym dataset, and how ``prompt_format=auto`` resolves."""

from __future__ import annotations

import dataclasses

from dgg.errors import UserError
from dgg.tasks.base import MATH_TASK_NAME, Task, TaskConfig
from dgg.tasks.math_task import MathTask
from dgg.tasks.reasoning_gym import ReasoningGymTask, _create_reasoning_gym_dataset, reasoning_gym_names


def resolve_prompt_format(config: TaskConfig, chat_template: bool) -> TaskConfig:
    """``prompt_format="auto"`` made concrete for a model whose tokenizer has (or lacks) a chat template."""
    if config.prompt_format != "auto":
        return config
    check_task_name(config.name)
    if chat_template:
        chosen = "chat"
    elif _is_environment(config.name):
        chosen = "instruct"  # an observation is shown as it is
    elif config.name == MATH_TASK_NAME:
        chosen = "bare"
    else:
        probe = _create_reasoning_gym_dataset(config.name, config.options, seed=0, size=1)
        chosen = "bare" if "expression" in probe[0].get("metadata", {}) else "instruct"
    return dataclasses.replace(config, prompt_format=chosen)


def _environment_names() -> list[str]:
    from dgg.agents.env import environment_names

    return environment_names()


def _is_environment(name: str) -> bool:
    from dgg.agents.env import is_environment_name

    return is_environment_name(name)


def check_task_name(name: str) -> None:
    if name != MATH_TASK_NAME and not _is_environment(name) and name not in reasoning_gym_names():
        names = reasoning_gym_names()
        raise UserError(
            f"unknown task.name {name!r}: valid names are {MATH_TASK_NAME!r}, the environments "
            f"({', '.join(_environment_names())}, or module:Class for your own) and the reasoning-gym datasets "
            f"({len(names)}, also listed by dgg.tasks.reasoning_gym_names()): {', '.join(names)}"
        )


def make_task(config: TaskConfig) -> Task:
    """The task named by ``config.name``: ``"math"``, an environment (``dgg.agents``), or any reasoning-gym
    dataset name.

    ``prompt_format="auto"`` is resolved as for a model without a chat template; a trainer that knows its
    tokenizer calls :func:`resolve_prompt_format` first."""
    check_task_name(config.name)
    config = resolve_prompt_format(config, chat_template=False)
    if config.name == MATH_TASK_NAME:
        return MathTask(config)
    if _is_environment(config.name):
        from dgg.agents.env import EnvironmentTask

        return EnvironmentTask(config.name, config.options, config.seed, config.test_size,
                               chat=config.prompt_format == "chat")
    return ReasoningGymTask(config)

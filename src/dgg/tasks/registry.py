"""Which task a config names: ``"math"``, any reasoning-gym dataset, or a name a registered task family claims
(``dgg.agents`` registers the environments when imported; this module imports no family), and how
``prompt_format=auto`` resolves."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from dgg.errors import UserError
from dgg.tasks.base import MATH_TASK_NAME, Task, TaskConfig
from dgg.tasks.math_task import MathTask
from dgg.tasks.reasoning_gym import ReasoningGymTask, _create_reasoning_gym_dataset, reasoning_gym_names


@dataclasses.dataclass(frozen=True)
class TaskFamily:
    """Tasks another package provides: which names it claims, how it lists them, how it builds one, and the
    prompt format ``auto`` resolves to for it without a chat template."""

    kind: str  # what the names are, for error messages ("environments")
    names: Callable[[], list[str]]
    claims: Callable[[str], bool]
    build: Callable[[TaskConfig], Task]
    prompt_format: str = "instruct"


TASK_FAMILIES: list[TaskFamily] = []


def register_task_family(family: TaskFamily) -> None:
    if all(f.kind != family.kind for f in TASK_FAMILIES):
        TASK_FAMILIES.append(family)


def _family(name: str) -> TaskFamily | None:
    return next((f for f in TASK_FAMILIES if f.claims(name)), None)


def resolve_prompt_format(config: TaskConfig, chat_template: bool) -> TaskConfig:
    """``prompt_format="auto"`` made concrete for a model whose tokenizer has (or lacks) a chat template."""
    if config.prompt_format != "auto":
        return config
    check_task_name(config.name)
    if chat_template:
        chosen = "chat"
    elif (family := _family(config.name)) is not None:
        chosen = family.prompt_format  # an environment's observation is shown as it is
    elif config.name == MATH_TASK_NAME:
        chosen = "bare"
    else:
        probe = _create_reasoning_gym_dataset(config.name, config.options, seed=0, size=1)
        chosen = "bare" if "expression" in probe[0].get("metadata", {}) else "instruct"
    return dataclasses.replace(config, prompt_format=chosen)


def check_task_name(name: str) -> None:
    if name != MATH_TASK_NAME and _family(name) is None and name not in reasoning_gym_names():
        names = reasoning_gym_names()
        families = "".join(f"the {f.kind} ({', '.join(f.names())}), " for f in TASK_FAMILIES)
        raise UserError(
            f"unknown task.name {name!r}: valid names are {MATH_TASK_NAME!r}, {families}and the reasoning-gym "
            f"datasets ({len(names)}, also listed by dgg.tasks.reasoning_gym_names()): {', '.join(names)}"
        )


def make_task(config: TaskConfig) -> Task:
    """The task named by ``config.name``: ``"math"``, a name a registered family claims (the environments, once
    ``dgg.agents`` is imported), or any reasoning-gym dataset name.

    ``prompt_format="auto"`` is resolved as for a model without a chat template; a trainer that knows its
    tokenizer calls :func:`resolve_prompt_format` first."""
    check_task_name(config.name)
    config = resolve_prompt_format(config, chat_template=False)
    if config.name == MATH_TASK_NAME:
        return MathTask(config)
    if (family := _family(config.name)) is not None:
        return family.build(config)
    return ReasoningGymTask(config)

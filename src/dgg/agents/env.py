"""The environment protocol of multi-turn agent tasks, and the adapter that lets the trainer see one as a task.

An environment is a text game: ``reset(seed)`` returns the first observation (the task, in words), and
``step(action)`` takes the policy's reply and returns the next observation, a reward, and whether the episode
ended. Everything is deterministic in the seed, so a group of G episodes starts from the same observation and
GRPO compares like with like.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from dgg.errors import UserError
from dgg.tasks.base import Problem, check_index, check_split, derive_seed
from dgg.tasks.registry import TaskFamily, register_task_family


@dataclass
class StepResult:
    observation: str
    reward: float = 0.0
    done: bool = False
    info: dict = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    def reset(self, seed: int) -> str:
        """Start a new episode; returns the first observation."""

    def step(self, action: str) -> StepResult:
        """Apply the policy's reply. A malformed action gets an observation that says so, never an exception."""


ENVIRONMENTS: dict[str, Callable[..., Environment]] = {}
USER_ENVIRONMENT = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def register_environment(name: str):
    """Make ``task.name: NAME`` train on this environment class (its keyword arguments come from task.options)."""
    def add(factory):
        ENVIRONMENTS[name] = factory
        return factory
    return add


# The bundled environments by name, each registered when its module is imported (on first use: this module
# imports none of them).
BUNDLED = {"alfworld": "dgg.agents.alfworld", "search_qa": "dgg.agents.search_qa", "webshop": "dgg.agents.webshop"}


def environment_names() -> list[str]:
    return sorted({*ENVIRONMENTS, *BUNDLED})


def is_environment_name(name: str) -> bool:
    """A bundled environment's name, or ``module:Class`` (your own, importable from the working directory)."""
    return name in environment_names() or bool(USER_ENVIRONMENT.fullmatch(name))


def make_environment(name: str, options: dict) -> Environment:
    if USER_ENVIRONMENT.fullmatch(name):
        from dgg.named import import_named

        factory = import_named(name, "task.name")
        if not callable(factory):
            raise UserError(f"task.name {name!r}: {name.split(':')[0]} has no environment class "
                            f"{name.split(':')[1]!r}")
    elif name in environment_names():
        if name not in ENVIRONMENTS:
            importlib.import_module(BUNDLED[name])  # registers it
        factory = ENVIRONMENTS[name]
    else:
        raise UserError(f"unknown environment {name!r}; valid names are: {', '.join(environment_names())}, "
                        "or module:Class for your own")
    try:
        return factory(**options)
    except TypeError as err:  # an option the environment does not take
        raise UserError(f"task.options for environment {name!r}: {err}") from err


class EnvironmentTask:
    """An environment seen as a task: problem ``(split, index)`` is the episode seeded from them, its prompt the
    first observation. Rewards come from the episode (``dgg.agents.episodes``), not from ``reward``."""

    is_environment = True
    isolate_reward = False  # no reward process: episodes are scored where they are played

    def __init__(self, name: str, options: dict, seed: int = 0, test_size: int = 256, chat: bool = True):
        self.name, self.options, self.seed, self.test_size, self.chat = name, dict(options), seed, test_size, chat
        self._probe = make_environment(name, self.options)  # fails early on a bad name or option

    def new_environment(self) -> Environment:
        return make_environment(self.name, self.options)

    def episode_seed(self, split: str, index: int) -> int:
        check_split(split)
        check_index(index)
        return derive_seed("env", self.name, self.seed, split, index)

    def problem(self, split: str, index: int) -> Problem:
        seed = self.episode_seed(split, index)
        return Problem(prompt=self._probe.reset(seed), answer="",
                       meta={"task": self.name, "split": split, "index": index, "env_seed": seed, "chat": self.chat})

    def split_size(self, split: str) -> int | None:
        check_split(split)
        return self.test_size if split == "test" else None

    def reward(self, completion: str, answer: str) -> tuple[float, dict]:
        raise UserError(f"{self.name} is an environment: its reward comes from playing the episode, so it is scored "
                        "by dgg.agents.episodes.run_episodes, not by a completion's text")


def _environment_task(config) -> EnvironmentTask:
    return EnvironmentTask(config.name, config.options, config.seed, config.test_size,
                           chat=config.prompt_format == "chat")


# Environments are tasks: make_task builds them once this module is imported (dgg.tasks imports no family).
register_task_family(TaskFamily("environments", lambda: [*environment_names(), "or module:Class for your own"],
                                is_environment_name, _environment_task, prompt_format="instruct"))

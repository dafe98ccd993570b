"""``module:name`` specs (``task.reward=my_rewards:score``, ``task.name=my_envs:Maze``): checking one, and
importing what it names with the working directory importable. Depends on nothing else in dgg, so a config can
check a spec without importing the code that uses it."""

from __future__ import annotations

import importlib
import os
import re
import sys

from dgg.errors import UserError

REWARD_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def check_reward_spec(spec: str) -> None:
    if not isinstance(spec, str) or not REWARD_SPEC.fullmatch(spec):
        raise UserError(f"task.reward must look like 'module:function' (got {spec!r}), e.g. my_rewards:exact_match")


def import_named(spec: str, field: str):
    """The attribute named by ``module:name`` (None if the module lacks it), with the working directory
    importable; a module that cannot be imported is a UserError naming ``field``."""
    module_name, name = spec.split(":")
    if os.getcwd() not in sys.path:  # spawned reward processes inherit sys.path, so they find it too
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"{field} {spec!r}: cannot import {module_name!r} ({err}); put {module_name}.py in "
                        "the working directory or install it") from None
    return getattr(module, name, None)

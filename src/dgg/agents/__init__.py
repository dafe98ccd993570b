"""Multi-turn agent RL: environments (``env``), episodes played in batches and laid out for the trainer
(``episodes``), and the bundled environments (``alfworld``, ``search_qa``, ``webshop``)."""

from dgg.agents.env import (
    ENVIRONMENTS,
    Environment,
    EnvironmentTask,
    StepResult,
    environment_names,
    make_environment,
    register_environment,
)
from dgg.agents.episodes import EpisodeLimits, EpisodeSampler, run_episodes

__all__ = ["ENVIRONMENTS", "Environment", "EnvironmentTask", "EpisodeLimits", "EpisodeSampler", "StepResult",
           "environment_names", "make_environment", "register_environment", "run_episodes"]

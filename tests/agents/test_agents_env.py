import re
from pathlib import Path

import pytest

from dgg.agents import EnvironmentTask, make_environment
from dgg.errors import UserError
from dgg.tasks import make_task
from dgg.tasks.base import TaskConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "agents.md"


@pytest.fixture()
def my_envs(tmp_path, monkeypatch):
    """The environment of docs/agents.md, saved as my_envs.py in the working directory."""
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL).group(1)
    (tmp_path / "my_envs.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_envs:GuessNumber"


def test_the_documented_environment_is_won_by_bisection_and_lost_by_nonsense(my_envs):
    env = make_environment(my_envs, {"turns": 7})
    for seed in range(20):
        env.reset(seed)
        low, high = 1, 100
        while True:
            guess = (low + high) // 2
            result = env.step(f"My guess is {guess}")
            if result.done:
                break
            low, high = (guess + 1, high) if result.observation == "Higher." else (low, guess - 1)
        assert result.reward == 1.0
    env.reset(0)
    assert env.step("no idea").observation == "Reply with a single number from 1 to 100."


def test_a_config_names_an_environment_and_its_problems_are_its_first_observations(my_envs):
    task = make_task(TaskConfig(name=my_envs, options={"turns": 3}))
    assert isinstance(task, EnvironmentTask)
    problem = task.problem("train", 5)
    assert problem.prompt.endswith("You have 3 guesses.") and problem.meta["env_seed"] == task.episode_seed("train", 5)
    assert task.episode_seed("train", 5) != task.episode_seed("test", 5)
    assert task.split_size("test") == 256 and task.split_size("train") is None
    with pytest.raises(UserError, match="scored by dgg.agents.episodes"):
        task.reward("50", "")


def test_unknown_or_broken_environment_names_are_clear_errors(my_envs):
    with pytest.raises(UserError, match="cannot import 'no_such_module'"):
        make_environment("no_such_module:Env", {})
    with pytest.raises(UserError, match="my_envs has no environment class 'Nope'"):
        make_environment("my_envs:Nope", {})
    with pytest.raises(UserError, match=r"unknown task.name .serch_qa.*search_qa.*or module:Class"):
        make_task(TaskConfig(name="serch_qa"))

import json
import random

import pytest
from agent_training import play, train_on_environment

from dgg.agents import make_environment
from dgg.errors import UserError

pytest.importorskip("alfworld")
pytest.importorskip("fast_downward")

from dgg.agents.alfworld import TASK_TYPES, closest_command, game_logic, generate_problem  # noqa: E402


@pytest.fixture(scope="module")
def env():
    return make_environment("alfworld", {})


def test_the_planner_expert_wins_every_task_type(env):
    plans = {}
    for task_type in TASK_TYPES:
        single = make_environment("alfworld", {"task_types": [task_type]})
        for seed in range(4):
            single.reset(seed)
            plan = single.expert_plan()
            result = None
            for command in plan:
                result = single.step(command)
            assert result is not None and result.done and result.reward == 1.0 and result.info["won"], (task_type, seed)
            assert single.task_type == task_type
            plans[task_type, seed] = plan
    assert any("heat" in c for c in plans["pick_heat_then_place_in_recep", 0])
    assert any(c.startswith("use desklamp") for c in plans["look_at_obj_in_light", 0])
    assert sum(c.startswith("take") for c in plans["pick_two_obj_and_place", 0]) == 2


def test_a_random_policy_mostly_loses(env):
    rng = random.Random(0)
    results = [play(env, lambda e, step: rng.choice(e.admissible()), seed, turns=10) for seed in range(30)]
    assert sum(r is not None and r.reward == 1.0 for r in results) <= 6


def test_the_first_observation_is_alfworlds_room_and_task(env):
    first = env.reset(3)
    assert "-= Welcome to TextWorld, ALFRED! =-" in first
    assert "You are in the middle of a room. Looking quickly around you, you see" in first
    assert "Your task is to: " in first and "UNKNOWN GOAL" not in first


def test_malformed_or_impossible_commands_get_an_observation_never_an_exception(env):
    env.reset(1)
    for reply in ["", "   ", "I think I should look for the apple first", "fly to the moon", "<|im_end|>"]:
        result = env.step(reply)
        assert result.observation.startswith("Nothing happens.") and "one command per reply" in result.observation
        assert result.info["invalid"] and not result.done and result.reward == 0.0
    result = env.step("go to moon 1")  # a command of the game's kind that does not apply: ALFWorld's own answer
    assert result.observation == "Nothing happens." and result.info["invalid"]
    with pytest.raises(RuntimeError):
        make_environment("alfworld", {}).step("look")


def test_replies_are_read_as_commands(env):
    env.reset(2)
    command = env.expert_plan()[0]
    assert env.read_command(f"> {command.upper()}.\nbecause that is where it is") == command
    assert env.read_command(f"Action: {command}") == command
    assert env.read_command(f"I will {command} now") != command  # strict by default
    lenient = make_environment("alfworld", {"lenient": True})
    lenient.reset(2)
    assert lenient.read_command(f"I will {command} now") == command
    assert not lenient.step(f"Let me {command}, then look around").info["invalid"]


def test_closest_reading_maps_free_text_onto_an_admissible_command():
    env = make_environment("alfworld", {"lenient": "closest", "task_types": "pick_and_place_simple",
                                        "receptacles": 2, "distractors": 0})
    env.reset(0)  # a countertop 1 and a sinkbasin 1
    assert env.read_command("I'm going to go to the sinkbasin now") == "go to sinkbasin 1"
    assert env.read_command("go to countertop 1, then look") == "go to countertop 1"  # a whole command still wins
    assert env.read_command("the golden hour") == "the golden hour"  # no shared word: still malformed
    assert env.step("the golden hour").info["invalid"]
    assert closest_command("take the soapbar", ["go to countertop 1", "take soapbar 1 from countertop 1"]) == \
        "take soapbar 1 from countertop 1"


def test_hints_name_the_experts_next_command():
    options = {"task_types": "pick_and_place_simple", "receptacles": 2, "distractors": 0}
    first, every = (make_environment("alfworld", {**options, "hint": h}) for h in ("first", "every"))
    opening = first.reset(0)
    plan = first.expert_plan()
    assert opening.endswith(f"Hint: {plan[0]}.") and every.reset(0) == opening
    assert "Hint:" not in first.step(plan[0]).observation
    assert every.step(plan[0]).observation.endswith(f"Hint: {plan[1]}.")
    assert "Hint:" not in make_environment("alfworld", options).reset(0)


def test_episodes_are_deterministic_in_the_seed(env):
    other = make_environment("alfworld", {})
    assert env.reset(7) == other.reset(7) and env.expert_plan() == other.expert_plan()
    assert len({env.reset(seed) for seed in range(12)}) == 12


def test_the_shared_logic_engine_plays_exactly_as_textworlds_own(env):
    # the engine parses a game's logic once per game; the stock PddlEnv re-parses it on every load
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    from textworld.envs.pddl import PddlEnv

    stock = AlfredDemangler(PddlEnv(textworld.EnvInfos(won=True, admissible_commands=True)))
    for seed in range(3):
        first = env.reset(seed)
        game = env._game(seed)
        game.pop("task_type")
        stock.load(game)
        state = stock.reset()
        assert first.endswith(state.feedback.strip())
        rng = random.Random(seed)
        for command in env.expert_plan()[:2] + [rng.choice(env.admissible()) for _ in range(4)]:
            assert sorted(env.admissible()) == sorted(c for c in state["admissible_commands"] if c != "help")
            ours = env.step(command)
            state, _, done = stock.step(command)
            assert ours.observation == state.feedback.strip() and ours.done == bool(done)


def test_room_size_and_distractors_are_options():
    def declared(problem, kind):
        return sum(line.endswith(f" - {kind}") for line in problem["pddl_problem"].splitlines())

    small, large = generate_problem(5, receptacles=3, distractors=0), generate_problem(5, receptacles=12, distractors=10)
    assert declared(small, "receptacle") == 3 and declared(large, "receptacle") == 12
    assert declared(small, "object") < declared(large, "object")


def test_admissible_commands_can_be_shown():
    env = make_environment("alfworld", {"show_admissible": True, "task_types": "pick_and_place_simple"})
    first = env.reset(0)
    assert "Admissible commands: " in first and "go to " in first.split("Admissible commands: ")[1]
    result = env.step(env.expert_plan()[0])
    assert "Admissible commands: " in result.observation


def test_bad_options_are_clear_errors():
    for options, field in [({"task_types": ["pick_and_fly"]}, "task_types"), ({"receptacles": 1}, "receptacles"),
                           ({"distractors": -1}, "distractors"), ({"games": "/nonexistent/alfworld"}, "games"),
                           ({"lenient": "fuzzy"}, "lenient"), ({"hint": "always"}, "hint")]:
        with pytest.raises(UserError, match=field):
            make_environment("alfworld", options)


def write_game(folder, seed, task_type, solvable=True):
    """A game in the layout of ALFWorld's json_2.1.1: game.tw-pddl (domain, grammar with the task, problem)
    beside traj_data.json."""
    domain, grammar = game_logic()
    problem = generate_problem(seed, [task_type])
    folder.mkdir(parents=True)
    (folder / "game.tw-pddl").write_text(json.dumps({
        "pddl_domain": domain, "grammar": grammar.replace("UNKNOWN GOAL", problem["task"]),
        "pddl_problem": problem["pddl_problem"], "solvable": solvable}))
    (folder / "traj_data.json").write_text(json.dumps({"task_type": task_type}))
    return problem["task"]


def test_alfworlds_own_game_files_are_collected_and_played(tmp_path):
    root = tmp_path / "json_2.1.1" / "train"
    task = write_game(root / "pick_and_place_simple-Apple-None-CounterTop-1" / "trial_1", 1, "pick_and_place_simple")
    write_game(root / "pick_heat_then_place_in_recep-Egg-None-Fridge-2" / "trial_1", 2, "pick_heat_then_place_in_recep")
    write_game(root / "pick_and_place_simple-Mug-None-Shelf-3" / "trial_1", 3, "pick_and_place_simple", solvable=False)
    write_game(root / "pick_and_place_with_movable_recep-Pen-Mug-Desk-4" / "trial_1", 4, "pick_and_place_simple")
    env = make_environment("alfworld", {"games": str(root), "task_types": ["pick_and_place_simple"]})
    assert len(env.games) == 1  # the heat task is filtered out, the unsolvable and the movable one skipped
    assert f"Your task is to: {task}." in env.reset(0)
    result = None
    for command in env.expert_plan():
        result = env.step(command)
    assert result.reward == 1.0 and result.done
    with pytest.raises(UserError, match="no game.tw-pddl"):
        make_environment("alfworld", {"games": str(root), "task_types": ["look_at_obj_in_light"]})


def test_the_trainer_runs_alfworld_episodes(tiny_model_dir, tmp_path):
    rollouts = train_on_environment(tiny_model_dir, tmp_path / "run", "alfworld", "{receptacles: 3, distractors: 1, lenient: true}")
    assert len(rollouts) == 2 and all(0 < r["agent/masked_token_fraction"] < 1 for r in rollouts)
    assert all(r["agent/env_errors"] == 0 and r["agent/turns_mean"] >= 1 for r in rollouts)


def test_the_behaviour_cloning_warm_start_learns_only_the_experts_replies(tiny_model_dir):
    import importlib.util
    from pathlib import Path

    from dgg.agents.env import EnvironmentTask
    from dgg.agents.episodes import TurnFormat
    from dgg.config import ModelConfig
    from dgg.loading import load_policy

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "alfworld_bc.py"
    spec = importlib.util.spec_from_file_location("alfworld_bc", script)
    bc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bc)
    _, tokenizer = load_policy(ModelConfig(path=str(tiny_model_dir)))
    tokenizer.chat_template = ("{% for m in messages %}({{ m.role }}){{ m.content }}<eos>{% endfor %}"
                               "{% if add_generation_prompt %}(assistant){% endif %}")
    task = EnvironmentTask("alfworld", {"task_types": "pick_and_place_simple", "receptacles": 2, "distractors": 0},
                           seed=5)
    env = task.new_environment()
    env.reset(task.problem("train", 0).meta["env_seed"])
    plan = env.expert_plan()
    turns = TurnFormat(tokenizer, chat=True)
    ids, labels = bc.expert_episode(task, tokenizer, turns, 0)
    learned = [i for i, label in enumerate(labels) if label != -100]
    assert [ids[i] for i in learned] == [labels[i] for i in learned]
    spans, start = [], learned[0]
    for before, after in zip(learned, learned[1:] + [None]):
        if after != before + 1:
            spans.append((start, before + 1))
            start = after
    assert [tokenizer.decode(ids[a:b]) for a, b in spans] == [f"{command}<eos>" for command in plan]
    # Between two replies lies the observation exactly as the episode engine tokenizes it, never learned.
    env.reset(task.problem("train", 0).meta["env_seed"])
    observation = turns.observation_ids(env.step(plan[0]).observation, reply_ended=True)
    assert ids[spans[0][1]:spans[1][0]] == observation
    assert labels[len(ids) - 1] != -100 and set(labels[:spans[0][0]]) == {-100}  # the prompt is context only

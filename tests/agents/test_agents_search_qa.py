import json
import random

import pytest

from dgg.agents import make_environment
from dgg.agents.search_qa import normalise, token_f1
from dgg.errors import UserError

pytest.importorskip("bm25s")


def play(env, policy, seed, turns=6):
    env.reset(seed)
    reward = 0.0
    for step in range(turns):
        result = env.step(policy(env, step))
        reward += result.reward
        if result.done:
            return reward, True
    return reward, False


@pytest.mark.parametrize("hops", [1, 2])
def test_the_expert_wins_every_episode(hops):
    env = make_environment("search_qa", {"hops": hops, "people": 50})
    outcomes = [play(env, lambda e, step: e.expert_action(step), seed) for seed in range(40)]
    assert all(done and reward == 1.0 for reward, done in outcomes)


def test_a_random_policy_mostly_loses():
    env = make_environment("search_qa", {"hops": 2, "people": 50})
    rng = random.Random(0)
    words = ["city", "born", "Labs", "country", "Kalo", "the"]

    def guess(e, step):
        return f"<search>{rng.choice(words)}</search>" if step < 2 else f"<answer>{rng.choice(words)}</answer>"

    wins = sum(play(env, guess, seed)[0] for seed in range(40))
    assert wins <= 2


def test_malformed_replies_get_an_observation_that_says_what_to_write():
    env = make_environment("search_qa", {"people": 20})
    env.reset(3)
    for reply in ["", "hello", "<search></search>", "<answer", "\x00\xff"]:
        result = env.step(reply)
        assert not result.done and result.reward == 0.0
        assert "<search>your query</search>" in result.observation and result.info["invalid"]
    assert env.step("<search>the of a</search>").observation == "<information>\nNo results.\n</information>"


def test_episodes_are_deterministic_in_the_seed_and_answers_compare_normalised():
    first, second = make_environment("search_qa", {"people": 30}), make_environment("search_qa", {"people": 30})
    assert [first.reset(s) for s in range(10)] == [second.reset(s) for s in range(10)]
    assert len({first.reset(s) for s in range(10)}) > 5
    first.reset(4)
    truth = first.question.answer
    assert first.step(f"I think <answer> the {truth.upper()}. </answer>").reward == 1.0
    assert normalise("The  Marlo Labs!") == "marlo labs"
    assert token_f1("Marlo Labs", "Marlo Works") == 0.5


def test_bad_options_and_own_data(tmp_path):
    with pytest.raises(UserError, match="hops must be 1 or 2"):
        make_environment("search_qa", {"hops": 3})
    with pytest.raises(UserError, match="search_qa.*unexpected keyword"):
        make_environment("search_qa", {"hop": 1})
    with pytest.raises(UserError, match="unknown environment 'nope'; valid names are: .*search_qa"):
        make_environment("nope", {})
    corpus, questions = tmp_path / "corpus.jsonl", tmp_path / "questions.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in
                                ["Paris is the capital of France.", "Rome is the capital of Italy."]) + "\n")
    questions.write_text(json.dumps({"question": "What is the capital of Italy?", "answer": "Rome"}) + "\n")
    env = make_environment("search_qa", {"corpus": str(corpus), "questions": str(questions), "top_k": 1, "reward": "f1"})
    assert env.reset(0).endswith("Question: What is the capital of Italy?")
    assert "Rome is the capital of Italy." in env.step("<search>capital Italy</search>").observation
    assert env.step("<answer>Rome</answer>").reward == 1.0
    questions.write_text('{"question": "no answer"}\n')
    with pytest.raises(UserError, match=r"questions.jsonl, line 1: missing field .answer."):
        make_environment("search_qa", {"questions": str(questions), "corpus": str(corpus)})


def test_easier_levels_show_results_first_and_accept_an_untagged_sentence():
    env = make_environment("search_qa", {"hops": 1, "people": 30, "first_search": True, "untagged": "answer",
                                         "reward": "contains", "example": True})
    first = env.reset(2)
    person = env.question.lookups[0]
    assert "Example." in first and "<information>" in first.split("Question:")[-1] and person in first
    result = env.step(f"{person} lives in {env.question.answer}, I believe.")
    assert result.done and result.reward == 1.0
    env.reset(2)
    assert env.step("I do not know").reward == 0.0
    env.reset(2)
    assert not env.step("<search>x").done  # a search tag is still a search
    with pytest.raises(UserError, match="untagged must be invalid or answer"):
        make_environment("search_qa", {"untagged": "maybe"})

import json
import random

import pytest
from agent_training import play, train_on_environment

from dgg.agents import make_environment
from dgg.agents.webshop import Goal, Product, purchase_reward, type_reward
from dgg.errors import UserError

pytest.importorskip("bm25s")


def test_the_expert_buys_the_right_product_with_the_right_options_every_time():
    env = make_environment("webshop", {"products_count": 60})
    results = [play(env, lambda e, step: e.expert_action(step), seed, turns=10) for seed in range(60)]
    assert all(r is not None and r.reward == 1.0 and r.info["success"] for r in results)
    assert len({r.info["bought"] for r in results}) > 20  # the seeds reach many different goals


def test_a_random_shopper_mostly_fails():
    env = make_environment("webshop", {"products_count": 60})
    rng = random.Random(0)

    def shopper(e, step):
        if not e.buttons():
            return f"search[{rng.choice(['shoes', 'mug', 'black', 'cable', 'lotion', 'shirt'])}]"
        return f"click[{rng.choice(e.buttons())}]"

    results = [play(env, shopper, seed, turns=6) for seed in range(60)]
    finished = [r for r in results if r is not None]
    assert sum(r.reward == 1.0 for r in finished) <= 1
    assert sum(r.reward for r in finished) / 60 < 0.2


def test_the_reward_is_webshops_formula():
    wanted = Product("B01", "Kalo Lightweight Running Shoes", "running shoes", "clothing › shoes › running shoes",
                     30.0, ("lightweight", "breathable", "wide fit"), {"color": ("black", "red"), "size": ("8", "9")})
    goal = Goal("B01", "...", ("lightweight", "breathable"), {"color": "red", "size": "9"}, 40.0)
    assert purchase_reward(wanted, wanted, goal, {"color": "red", "size": "9"})[0] == 1.0
    # one option wrong: (2 attributes + 1 option + price) / (2 + 2 + 1)
    assert purchase_reward(wanted, wanted, goal, {"color": "black", "size": "9"})[0] == pytest.approx(4 / 5)
    dearer = Product("B02", "Vato Wide Fit Running Shoes", "running shoes", wanted.category, 55.0, ("wide fit",),
                     wanted.options, ("Breathable mesh.",))
    score, info = purchase_reward(dearer, wanted, goal, {})  # "breathable" found in its text; over budget
    assert info == {"r_type": 1.0, "attributes_matched": 1, "options_matched": 0, "price_ok": False}
    assert score == pytest.approx(1 / 5)
    mug = Product("B03", "Tolo Insulated Coffee Mug", "coffee mug", "home › kitchen › coffee mug", 10.0, ())
    assert type_reward(mug, wanted) == 0.0 and purchase_reward(mug, wanted, goal, {})[0] == 0.0
    boots = Product("B04", "Rain Boots Lightweight", "rain boots", "clothing › shoes › rain boots", 10.0, ())
    assert type_reward(boots, wanted) == 1.0  # two category levels in common


def test_malformed_or_impossible_actions_get_an_observation_never_an_exception():
    env = make_environment("webshop", {"products_count": 30})
    env.reset(1)
    for reply in ["", "buy it", "click[buy now]", "search[]", "search[  ]", "\x00\xff", "click[nothing]"]:
        result = env.step(reply)
        assert not result.done and result.reward == 0.0 and result.info["invalid"]
        assert result.observation.startswith("Invalid action:") and "search[your query]" in result.observation
    env.step("search[shoes]")
    result = env.step("search[mug]")
    assert result.info["invalid"] and "click[back to search]" in result.observation
    assert env.step("I will CLICK [Back To Search] now").observation.startswith("[Search]")


def test_navigation_keeps_the_chosen_options_until_the_product_is_left():
    env = make_environment("webshop", {"products_count": 30, "results_per_page": 2})
    env.reset(5)
    env.step(env.expert_action(0))
    assert "next >" in env.buttons() and "< prev" not in env.buttons()
    env.step("click[next >]")
    assert "< prev" in env.buttons() and "Page 2 of" in env._render()
    env.step("click[< prev]")
    first = env._shown()[0]
    env.step(f"click[{first.asin}]")
    name, values = next(iter(first.options.items()))
    env.step(f"click[{values[0]}]")
    assert env.step("click[features]").observation.endswith("\n".join(first.features))
    assert f"{name}: {values[0]}" in env.step("click[< prev]").observation  # back on the product, choice kept
    assert "Chosen options" not in env.step("click[< prev]").observation  # back on the results
    assert env.chosen == {}


def test_episodes_are_deterministic_in_the_seed():
    first, second = make_environment("webshop", {"products_count": 40}), make_environment("webshop", {"products_count": 40})
    assert [first.reset(s) for s in range(10)] == [second.reset(s) for s in range(10)]
    assert len({first.reset(s) for s in range(10)}) > 5
    other = make_environment("webshop", {"products_count": 40, "catalogue_seed": 1})
    assert [other.reset(s) for s in range(5)] != [first.reset(s) for s in range(5)]


def test_bad_options_are_clear_errors():
    with pytest.raises(UserError, match="products_count must be an integer >= 6"):
        make_environment("webshop", {"products_count": 2})
    with pytest.raises(UserError, match="products and attributes come together"):
        make_environment("webshop", {"products": "items.json"})
    with pytest.raises(UserError, match="webshop.*unexpected keyword"):
        make_environment("webshop", {"product": 3})


def test_webshops_own_files_are_read_and_their_goals_built_like_its_synthetic_goals(tmp_path):
    items = [{"asin": "B000TEST01", "name": "Acme Noise Cancelling Wireless Earbuds", "query": "wireless earbuds",
              "product_category": "Electronics › Headphones › Earbuds", "pricing": "$24.99",
              "small_description": ["Noise cancelling.", "Up to 30 hours."], "full_description": "Small earbuds.",
              "customization_options": {"Color": [{"value": "Black"}, {"value": "White/Grey"}]}},
             {"asin": "B000TEST02", "name": "Acme Bluetooth Speaker", "query": "bluetooth speaker",
              "product_category": "Electronics › Speakers", "pricing": "$10.00 $20.00",
              "small_description": "Loud.", "full_description": "", "customization_options": None},
             {"asin": "B000TEST01", "name": "a duplicate, skipped as WebShop skips it"}]
    notes = {"B000TEST01": {"attributes": ["noise cancelling", "long battery life"],
                            "instruction": "i want noise cancelling earbuds.",
                            "instruction_attributes": ["noise cancelling"]},
             "B000TEST02": {"attributes": ["portable"]}}
    (tmp_path / "items.json").write_text(json.dumps(items))
    (tmp_path / "attrs.json").write_text(json.dumps(notes))
    env = make_environment("webshop", {"products": str(tmp_path / "items.json"),
                                       "attributes": str(tmp_path / "attrs.json"), "products_count": 6})
    assert [p.asin for p in env.catalogue] == ["B000TEST01", "B000TEST02"]
    assert env.catalogue[0].options == {"color": ("black", "white | grey")} and env.catalogue[1].price == 10.0
    assert sorted(g.instruction.split(" with ")[1].split(",")[0] for g in env.goals) == ["color: black",
                                                                                          "color: white | grey"]
    assert all(g.price_upper in (40.0, 50.0, 60.0) and "price lower than" in g.instruction for g in env.goals)
    result = play(env, lambda e, step: e.expert_action(step), seed=0, turns=10)
    assert result.reward == 1.0
    (tmp_path / "attrs.json").write_text(json.dumps({}))
    with pytest.raises(UserError, match="no goals in .*attrs.json"):
        make_environment("webshop", {"products": str(tmp_path / "items.json"), "attributes": str(tmp_path / "attrs.json")})
    (tmp_path / "attrs.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object keyed by asin"):
        make_environment("webshop", {"products": str(tmp_path / "items.json"), "attributes": str(tmp_path / "attrs.json")})


def test_the_easier_levels_open_on_results_read_untagged_replies_and_buy_on_open():
    env = make_environment("webshop", {"products_count": 60, "start_on_results": True, "untagged": "lenient",
                                       "options_in_goal": False, "buy_on_open": True})
    first = env.reset(2)
    assert first.count("Instruction:") == 1 and " with " not in env.goal.instruction and env.goal.options == {}
    assert env.page == "results" and env.buttons()[0] == "back to search"
    target = env.goal.asin
    if target not in env.buttons():  # the instruction's own search missed it: go back and search its title
        env.step("back to search, please")
        env.step(env.by_asin[target].title)
    result = env.step(f"I choose {target.lower()} since it matches")  # untagged, lower case: still a click
    assert result.done and result.reward == 1.0 and result.info["bought"] == target
    strict = make_environment("webshop", {"products_count": 60, "start_on_results": True})
    strict.reset(2)
    assert strict.step(f"I choose {target}").info["invalid"]  # the default level insists on click[...]
    with pytest.raises(UserError, match="untagged must be invalid or lenient"):
        make_environment("webshop", {"untagged": "yes"})


def test_the_trainer_runs_webshop_episodes(tiny_model_dir, tmp_path):
    rollouts = train_on_environment(tiny_model_dir, tmp_path / "run", "webshop", "{products_count: 12, start_on_results: true, untagged: lenient, results_per_page: 2}")
    assert len(rollouts) == 2 and all(0 < r["agent/masked_token_fraction"] < 1 for r in rollouts)
    assert all(r["agent/turns_mean"] >= 1 for r in rollouts)

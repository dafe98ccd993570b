import json
import threading
import time

import pytest

from dgg.errors import UserError
from dgg.tasks import (
    MATH_INSTRUCTION,
    Problem,
    Task,
    TaskConfig,
    gsm8k_ground_truth,
    last_boxed,
    last_number,
    lenient_answer,
    make_task,
    resolve_prompt_format,
    safe_reward,
)

SMALL_SUMS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # 10 * 2 * 10 = 200 prompts


@pytest.fixture(scope="module")
def chain_sum():
    return make_task(TaskConfig(name="chain_sum", test_size=64, seed=0))


# --- chain_sum, bare format -------------------------------------------------------------------------------


def test_chain_sum_bare_prompts_are_expressions_whose_value_is_the_answer(chain_sum):
    assert isinstance(chain_sum, Task)
    first = chain_sum.problem("train", 0)
    # Hand-checked: 89-24 = 65, 65-11 = 54, 54-42 = 12, 12+31 = 43.
    assert first.prompt == "89-24-11-42+31=" and first.answer == "43"
    assert first.meta["split"] == "train" and first.meta["index"] == 0 and first.meta["chat"] is False
    for split in ("train", "test"):
        for index in range(64):
            problem = chain_sum.problem(split, index)
            assert problem.prompt.endswith("=") and " " not in problem.prompt
            assert eval(problem.prompt[:-1]) == int(problem.answer)  # brute-force check of every answer
    json.dumps(first.meta)  # meta must be JSON-serialisable


@pytest.mark.parametrize(
    ("completion", "expected", "parsed"),
    [
        ("43", 1.0, "43"),
        ("43<eos>", 1.0, "43"),  # decoded with special tokens: stop at the EOS text
        (" 43\n57+1=58", 1.0, "43"),  # stop at the first whitespace
        ("043", 1.0, "043"),
        ("+43", 1.0, "+43"),
        ("44", 0.0, "44"),
        ("-43", 0.0, "-43"),
        ("4 3", 0.0, "4"),
        ("43abc", 0.0, "43abc"),  # garbled token: not a number
        ("=43", 0.0, "=43"),
        ("", 0.0, ""),
        ("<eos>", 0.0, ""),
    ],
)
def test_chain_sum_bare_reward_is_exact_numeric_match(chain_sum, completion, expected, parsed):
    reward, info = chain_sum.reward(completion, "43")
    assert reward == expected
    assert info == {"parsed": parsed, "correct": expected == 1.0}


def test_bare_reward_gives_no_partial_credit_unlike_the_dataset_scorer(chain_sum):
    # reasoning-gym's chain_sum scorer pays len("2")/len("12") = 0.5 for "12" when the answer is "2".
    assert chain_sum._scorer.score_answer(answer="12", entry={"answer": "2"}) == 0.5
    assert chain_sum.reward("12", "2")[0] == 0.0
    assert chain_sum.reward("-7", "-7")[0] == 1.0


def test_problems_are_deterministic_in_seed_split_and_index(chain_sum):
    indices = [0, 1, 511, 512, 5000, 3]  # crosses chunk boundaries, out of order
    again = make_task(TaskConfig(name="chain_sum", test_size=64, seed=0))
    for index in reversed(indices):  # a fresh task visited in a different order
        assert again.problem("train", index) == chain_sum.problem("train", index)
    for index in (0, 63):
        assert again.problem("test", index) == chain_sum.problem("test", index)
    other_seed = make_task(TaskConfig(name="chain_sum", test_size=64, seed=1))
    assert [other_seed.problem("train", i).prompt for i in range(8)] != [
        chain_sum.problem("train", i).prompt for i in range(8)
    ]
    assert chain_sum.split_size("train") is None and chain_sum.split_size("test") == 64
    with pytest.raises(IndexError, match="64 problems"):
        chain_sum.problem("test", 64)
    with pytest.raises(ValueError, match="split"):
        chain_sum.problem("valid", 0)


def test_train_never_shows_a_test_prompt_even_in_a_small_problem_space():
    task = make_task(TaskConfig(name="chain_sum", options=SMALL_SUMS, test_size=64, seed=0))
    test_prompts = {task.problem("test", i).prompt for i in range(64)}
    train_prompts = [task.problem("train", i).prompt for i in range(1024)]
    # Hand count of the space: a op b with a, b in 0..9 and op in {+, -}.
    all_prompts = {f"{a}{op}{b}=" for a in range(10) for b in range(10) for op in "+-"}
    assert test_prompts <= all_prompts and set(train_prompts) <= all_prompts
    assert len(test_prompts) > 40  # 64 draws of 200 hit ~54 distinct prompts, so overlap would be likely
    assert not test_prompts & set(train_prompts)


def test_a_problem_space_covered_by_the_test_set_leaves_no_train_problems():
    one_digit = {"min_terms": 1, "max_terms": 1, "min_digits": 1, "max_digits": 1}  # 10 prompts: "0=".."9="
    task = make_task(TaskConfig(name="chain_sum", options=one_digit, test_size=256))
    assert {task.problem("test", i).prompt for i in range(256)} == {f"{d}=" for d in range(10)}
    with pytest.raises(ValueError, match="lower TaskConfig.test_size or widen TaskConfig.options"):
        task.problem("train", 0)


def test_instruct_and_chat_formats_use_the_question_and_the_dataset_scorer():
    task = make_task(TaskConfig(name="chain_sum", prompt_format="instruct", test_size=8))
    problem = task.problem("test", 0)
    assert problem.prompt.startswith("State the final answer to the following arithmetic problem:")
    assert problem.prompt.endswith("<answer> and </answer> tags.")
    answer = problem.answer
    assert task.reward(f"thinking... <answer>{answer}</answer>", answer) == (
        1.0,
        {"parsed": answer, "correct": True},
    )
    assert task.reward(f"\\boxed{{{answer}}}", answer)[0] == 1.0  # boxed fallback
    assert task.reward(answer, answer) == (0.0, {"parsed": None, "correct": False})  # no tags, no box
    # The dataset scorer's partial credit: oracle "2" inside "12" -> 1/2.
    assert task.reward("<answer>12</answer>", "2") == (0.5, {"parsed": "12", "correct": False})
    assert (
        task.reward("<answer>12</answer>", "2", problem=Problem("", "2", {"split": "test", "index": 0}))[0]
        == 0.0
    )
    chat = make_task(TaskConfig(name="chain_sum", prompt_format="chat", test_size=8)).problem("test", 0)
    assert chat.meta["chat"] is True and chat.prompt == problem.prompt


def test_bare_format_needs_an_expression():
    with pytest.raises(ValueError, match="prompt_format='bare'.*'leg_counting'"):
        make_task(TaskConfig(name="leg_counting", prompt_format="bare"))


def test_auto_format_is_chat_with_a_template_else_bare_where_possible_else_instruct():
    assert resolve_prompt_format(TaskConfig(name="chain_sum"), chat_template=True).prompt_format == "chat"
    assert resolve_prompt_format(TaskConfig(name="chain_sum"), chat_template=False).prompt_format == "bare"
    assert resolve_prompt_format(TaskConfig(name="leg_counting"), False).prompt_format == "instruct"
    assert resolve_prompt_format(TaskConfig(name="chain_sum", prompt_format="instruct"), True).prompt_format \
        == "instruct"  # an explicit format is kept
    assert make_task(TaskConfig(name="leg_counting", test_size=4)).config.prompt_format == "instruct"


# Completions SmolLM2-135M-Instruct actually wrote for chain_sum questions + "Reply with just the number."
# (temperature 0.7), with what a reader would call its answer.
SMOLLM2_COMPLETIONS = [
    ("The final answer to this problem is 1.", "1"),
    ("The final answer to the arithmetic problem is 4 - 1 = 3", "3"),
    ("1 + 5 = 6", "6"),
    ("The answer to this arithmetic problem is 8.", "8"),
    ("5 - 9 = 1", "1"),
    ("43 and 14 are equal to 17.", "17"),
    ("The final answer to the specified arithmetic problem is 6.", "6"),
    ("The final answer to the given equation is 6 + 0 = 6", "6"),
    ("Improv: 58 + 26 = 84", "84"),
    ("4 is a positive integer.", "4"),
    ("A rational expression is a number that can be expressed as a ratio of integers.", None),
]


@pytest.mark.parametrize(("completion", "expected"), SMOLLM2_COMPLETIONS)
def test_lenient_answer_on_real_smollm2_completions(completion, expected):
    assert lenient_answer(completion) == expected


def test_lenient_answer_prefers_explicit_markers_and_handles_chatty_forms():
    assert lenient_answer("I think 3. <answer>7</answer> so") == "7"
    assert lenient_answer("so \\boxed{12} then 5") == "12"
    assert lenient_answer("The answer is 12, since 5 + 7 = 12 and not 13") == "12"
    assert lenient_answer("answer: -4. Check: 5 - 9") == "-4"
    assert lenient_answer("The result is 1,234.") == "1234"
    assert lenient_answer("The answer is 2.5 exactly") == "2.5"


def test_lenient_chat_task_uses_the_instruction_and_compares_numbers():
    config = TaskConfig(name="chain_sum", prompt_format="chat", instruction="Reply with just the number.",
                        answer_parser="lenient", test_size=8)
    task = make_task(config)
    problem = task.problem("test", 0)
    assert problem.prompt.endswith("=\nReply with just the number.") and problem.meta["chat"]
    answer = problem.answer
    assert task.reward(f"The answer is {answer}.", answer)[0] == 1.0
    assert task.reward(f"{answer}.0", answer)[0] == 1.0  # numbers compare as numbers
    assert task.reward(f"{int(answer) + 1}", answer) == (0.0, {"parsed": str(int(answer) + 1), "correct": False})
    assert task.reward("no idea", answer)[0] == 0.0
    strict = make_task(TaskConfig(name="chain_sum", prompt_format="chat", test_size=8))
    assert strict.reward(f"The answer is {answer}.", answer)[0] == 0.0  # tags only, as before


# --- registry and config validation -----------------------------------------------------------------------


def test_unknown_task_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as error:
        make_task(TaskConfig(name="chian_sum"))
    message = str(error.value)
    assert "'chian_sum'" in message and "'math'" in message and "chain_sum" in message
    assert "reasoning_gym_names()" in message


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"prompt_format": "xml"}, "prompt_format"),
        ({"answer_parser": "regex"}, "answer_parser"),
        ({"instruction": 3}, "instruction"),
        ({"test_size": 0}, "test_size"),
        ({"test_size": True}, "test_size"),
        ({"seed": -1}, "seed"),
        ({"reward_timeout_s": 0}, "reward_timeout_s"),
        ({"reward_timeout_s": float("inf")}, "reward_timeout_s"),
        ({"options": {"seed": 3}}, "options"),
        ({"options": ["min_terms"]}, "options"),
        ({"few_shot": -1}, "few_shot"),
        ({"few_shot": 65}, "few_shot"),
        ({"few_shot": True}, "few_shot"),
        ({"name": ""}, "name"),
        ({"name": "math"}, "path"),
        ({"name": "math", "path": "x.jsonl", "question_field": ""}, "question_field"),
    ],
)
def test_bad_config_fields_are_named(fields, named):
    with pytest.raises(ValueError, match=f"TaskConfig.{named}"):
        TaskConfig(**fields)


def test_few_shot_puts_the_same_solved_examples_before_every_expression_and_none_from_the_test_set():
    plain = make_task(TaskConfig(name="chain_sum", options=SMALL_SUMS, test_size=64, seed=0))
    shots = make_task(TaskConfig(name="chain_sum", options=SMALL_SUMS, test_size=64, seed=0, few_shot=4))
    test_expressions = {plain.problem("test", i).prompt for i in range(64)}
    prefixes = set()
    for split in ("train", "test"):
        for index in range(16):
            problem, bare = shots.problem(split, index), plain.problem(split, index)
            *examples, question = problem.prompt.split("\n")
            assert question == bare.prompt and problem.answer == bare.answer  # the problem itself is unchanged
            assert len(examples) == 4 and problem.meta["few_shot"] == 4
            for line in examples:
                expression, answer = line.split("=")
                assert eval(expression) == int(answer)  # every example is solved correctly
                assert f"{expression}=" not in test_expressions  # and never a held-out problem
            prefixes.add("\n".join(examples))
    assert len(prefixes) == 1  # the same examples for every problem
    assert shots.reward("7\n3+4=7", "7")[0] == 1.0  # the answer is still the completion's first token
    with pytest.raises(UserError, match="few_shot needs prompt_format 'bare'"):
        make_task(TaskConfig(name="chain_sum", prompt_format="instruct", few_shot=2))


def test_bad_reasoning_gym_options_are_named():
    with pytest.raises(ValueError, match="TaskConfig.options.*allowed keys.*min_terms"):
        make_task(TaskConfig(options={"num_terms": 3}))
    with pytest.raises(ValueError, match="TaskConfig.options.*max_terms must be >= min_terms"):
        make_task(TaskConfig(options={"min_terms": 3, "max_terms": 2}))


# --- math -------------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def math_file(tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(10)]
    rows.append({"question": "Half of one?", "answer": "\\frac{1}{2}"})
    rows.append({"question": "Sales total?", "answer": "She sold 1,200 + 34.\n#### 1,234"})
    return write_jsonl(tmp_path / "math.jsonl", rows)


def math_task(path, **fields):
    return make_task(TaskConfig(name="math", path=str(path), test_size=fields.pop("test_size", 4), **fields))


@pytest.mark.parametrize(
    ("completion", "answer", "expected", "parsed"),
    [
        ("So the answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0, "\\frac{1}{2}"),
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0, "0.5"),
        ("It is 1/2, i.e. 0.5", "\\frac{1}{2}", 1.0, "0.5"),  # no box: last number
        ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0, "\\frac{1}{3}"),
        ("First 7, finally \\boxed{3}. Check: 7", "3", 1.0, "3"),  # the box wins over the last number
        ("x = 5, so the total is 1,234 dollars", "1234", 1.0, "1234"),
        ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0, "(3, \\pi/2)"),
        ("I don't know", "4", 0.0, None),  # garbled: nothing to parse
        ("\\boxed{4", "4", 1.0, "4"),  # cut off inside the box: the last number still counts
        ("", "4", 0.0, None),
    ],
)
def test_math_reward_verifies_the_final_answer(math_file, completion, answer, expected, parsed):
    reward, info = math_task(math_file).reward(completion, answer)
    assert (reward, info) == (expected, {"parsed": parsed, "correct": expected == 1.0})


def test_gsm8k_ground_truth_and_extraction_helpers():
    assert gsm8k_ground_truth("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert gsm8k_ground_truth("#### 1,234") == "1234"
    assert gsm8k_ground_truth(" \\frac{1}{2} ") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("no box") is None and last_boxed("\\boxed{open") is None
    assert last_number("3 apples and -2.5 pears") == "-2.5" and last_number("none") is None


def test_math_splits_are_disjoint_deterministic_and_wrap(math_file):
    task = math_task(math_file)
    assert (
        task.split_size("test") == 4 and task.split_size("train") is None and task.unique_train_problems == 8
    )
    test = [task.problem("test", i) for i in range(4)]
    epoch0 = [task.problem("train", i) for i in range(8)]
    epoch1 = [task.problem("train", i) for i in range(8, 16)]
    assert not {p.prompt for p in test} & {p.prompt for p in epoch0}
    assert len({p.prompt for p in test} | {p.prompt for p in epoch0}) == 12  # every row is used exactly once
    assert {p.prompt for p in epoch1} == {p.prompt for p in epoch0} and epoch1 != epoch0  # reshuffled epoch
    assert epoch1[0].meta["epoch"] == 1
    assert [task.problem("train", i) for i in range(16)] == [
        math_task(math_file).problem("train", i) for i in range(16)
    ]
    sales = next(p for p in test + epoch0 if p.prompt == "Sales total?")
    assert sales.answer == "1234"  # GSM8K-style ground truth
    with pytest.raises(IndexError):
        task.problem("test", 4)


def test_math_drops_train_rows_that_repeat_a_test_question(tmp_path):
    rows = [{"question": f"Q{i % 5}", "answer": str(i % 5)} for i in range(10)]  # every question twice
    task = math_task(write_jsonl(tmp_path / "dup.jsonl", rows), test_size=2)
    test_questions = {task.problem("test", i).prompt for i in range(2)}
    train_questions = {task.problem("train", i).prompt for i in range(task.unique_train_problems)}
    assert not test_questions & train_questions
    # Brute force: of the 8 non-test rows, those whose question is held out are dropped.
    assert task.unique_train_problems + task.dropped_train_duplicates == 8
    assert task.dropped_train_duplicates == 2 * len(test_questions) - 2


def test_math_prompt_formats(math_file):
    bare = math_task(math_file).problem("test", 0)
    instruct = math_task(math_file, prompt_format="instruct").problem("test", 0)
    chat = math_task(math_file, prompt_format="chat").problem("test", 0)
    assert instruct.prompt == f"{bare.prompt}\n{MATH_INSTRUCTION}" and "\\boxed{}" in instruct.prompt
    assert chat.prompt == instruct.prompt and chat.meta["chat"] is True and bare.meta["chat"] is False


def test_math_file_errors_name_the_file_line_and_field(tmp_path):
    with pytest.raises(UserError, match="missing.jsonl"):
        math_task(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "1"}\n\n{"question": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 3: missing field 'answer'"):
        math_task(bad)
    custom = write_jsonl(
        tmp_path / "custom.jsonl", [{"problem": f"p{i}", "solution": str(i)} for i in range(6)]
    )
    task = math_task(custom, question_field="problem", answer_field="solution", test_size=2)
    assert task.problem("test", 0).prompt.startswith("p")
    with pytest.raises(ValueError, match="has 6 rows; holding out TaskConfig.test_size=6"):
        math_task(custom, question_field="problem", answer_field="solution", test_size=6)


class FakeHub:
    """Stands in for ``datasets.load_dataset`` (no hub access here) and records its calls."""

    def __init__(self, rows_per_split):
        self.rows_per_split = rows_per_split
        self.calls = []

    def __call__(self, *args, split):
        import datasets

        self.calls.append((args, split))
        return datasets.Dataset.from_list(self.rows_per_split[split])


def test_math_hub_datasets_are_loaded_with_the_right_arguments(monkeypatch):
    import datasets

    gsm8k = FakeHub(
        {
            "train": [{"question": f"t{i}", "answer": f"work\n#### {i}"} for i in range(20)],
            "test": [{"question": f"e{i}", "answer": f"work\n#### {i}"} for i in range(10)],
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", gsm8k)
    task = make_task(TaskConfig(name="math", path="openai/gsm8k", subset="main", test_size=5))
    assert gsm8k.calls == [(("openai/gsm8k", "main"), "train"), (("openai/gsm8k", "main"), "test")]
    assert task.split_size("test") == 5 and task.unique_train_problems == 20
    assert all(task.problem("test", i).prompt.startswith("e") for i in range(5))
    assert task.problem("test", 0).answer == task.problem("test", 0).prompt[1:]  # "#### i" extracted

    math500 = FakeHub({"test": [{"problem": f"p{i}", "answer": f"{i}"} for i in range(12)]})
    monkeypatch.setattr(datasets, "load_dataset", math500)
    task = make_task(
        TaskConfig(
            name="math",
            path="HuggingFaceH4/MATH-500",
            train_split="test",
            question_field="problem",
            test_size=4,
        )
    )
    assert math500.calls == [(("HuggingFaceH4/MATH-500",), "test")]  # one split, held out inside it
    assert task.split_size("test") == 4 and task.unique_train_problems == 8

    monkeypatch.setattr(datasets, "load_dataset", math500)
    with pytest.raises(ValueError, match="no field \\['question'\\]"):
        make_task(TaskConfig(name="math", path="HuggingFaceH4/MATH-500", train_split="test", test_size=4))


# --- safe_reward ------------------------------------------------------------------------------------------


class RaisingTask:
    name = "raising"

    def reward(self, completion, answer):
        raise RuntimeError(f"boom on {completion!r}")


class SleepingTask:
    name = "sleeping"

    def reward(self, completion, answer):
        if completion == "sleep":
            time.sleep(60)
        return (1.5 if completion == "too much" else 1.0), {"correct": True}


def test_safe_reward_turns_an_exception_into_zero_with_the_error():
    assert safe_reward(RaisingTask(), "x", "1", timeout_s=10) == (0.0, {"error": "RuntimeError: boom on 'x'"})


def test_safe_reward_times_out_kills_and_recovers():
    task = SleepingTask()
    assert safe_reward(task, "fine", "1", timeout_s=10) == (1.0, {"correct": True})
    started = time.monotonic()
    assert safe_reward(task, "sleep", "1", timeout_s=0.5) == (0.0, {"error": "timeout"})
    assert time.monotonic() - started < 5
    assert safe_reward(task, "fine", "1", timeout_s=10) == (1.0, {"correct": True})  # a fresh process
    reward, info = safe_reward(task, "too much", "1", timeout_s=10)
    assert reward == 0.0 and "outside [0, 1]" in info["error"]


def test_safe_reward_escapes_a_math_verify_hang_off_the_main_thread(math_file):
    task = math_task(math_file)
    results = []

    def score():  # as a trainer's reward thread would
        results.append(safe_reward(task, "\\boxed{\\frac{1}{2}}", "0.5", timeout_s=30))
        # sympy computes 9^(9^(9^9)) inside one C call holding the GIL: no thread or signal can stop it.
        started = time.monotonic()
        results.append(safe_reward(task, "\\boxed{9^{9^{9^{9}}}}", "1", timeout_s=1.0))
        results.append(time.monotonic() - started)

    thread = threading.Thread(target=score)
    thread.start()
    thread.join(120)
    assert not thread.is_alive()
    assert results[0] == (1.0, {"parsed": "\\frac{1}{2}", "correct": True})
    assert results[1] == (0.0, {"error": "timeout"}) and results[2] < 10


def test_safe_reward_runs_pure_rewards_in_process_and_still_catches_errors():
    class Pure:
        isolate_reward = False

        def reward(self, completion, answer):
            if completion == "boom":
                raise KeyError("x")
            return (2.0 if completion == "big" else float(completion == answer)), {}

    task = Pure()  # a local class cannot be pickled: this only works in-process
    assert safe_reward(task, "7", "7", timeout_s=1.0) == (1.0, {})
    reward, info = safe_reward(task, "boom", "7", timeout_s=1.0)
    assert reward == 0.0 and info["error"].startswith("KeyError")
    assert safe_reward(task, "big", "7", timeout_s=1.0)[0] == 0.0

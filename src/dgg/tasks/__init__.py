"""RL tasks with verifiable rewards: where prompts come from and how completions are scored.

The trainer sees one small interface, ``Task`` (``base``): ``problem(split, index)`` gives a formatted prompt
and its ground truth, ``reward(completion, answer)`` scores a completion in [0, 1]. Two families are built in:
any reasoning-gym procedural dataset (``reasoning_gym``, ``chain_sum`` by default) and ``"math"``
(``math_task``: JSONL or hub question/answer pairs, scored with math-verify). ``answers`` finds the final answer
in a completion; ``registry`` turns a config into a task; ``sandbox`` scores rewards in a separate process so
that a crash or a hang costs one sample, never the run.

Every public name is importable from ``dgg.tasks`` as before the split (objects pickled then still load).
"""

from dgg.tasks.answers import (
    bare_numeric_match,
    extract_tagged_answer,
    first_bare_token,
    first_number,
    gsm8k_ground_truth,
    last_boxed,
    last_number,
    lenient_answer,
    numeric_equal,
)
from dgg.tasks.base import (
    ANSWER_PARSERS,
    ANSWER_TAG_INSTRUCTION,
    MATH_INSTRUCTION,
    MATH_TASK_NAME,
    PROMPT_FORMATS,
    SPLITS,
    Problem,
    Task,
    TaskConfig,
    derive_seed,
)
from dgg.tasks.math_task import MathTask, load_hub_rows, read_jsonl_rows
from dgg.tasks.reasoning_gym import ReasoningGymTask, reasoning_gym_names
from dgg.tasks.registry import check_task_name, make_task, resolve_prompt_format
from dgg.tasks.sandbox import RewardProcess, call_reward, reward_process_for, safe_reward

__all__ = [
    "ANSWER_PARSERS", "ANSWER_TAG_INSTRUCTION", "MATH_INSTRUCTION", "MATH_TASK_NAME", "PROMPT_FORMATS", "SPLITS",
    "MathTask", "Problem", "ReasoningGymTask", "RewardProcess", "Task", "TaskConfig", "call_reward",
    "bare_numeric_match", "check_task_name", "derive_seed", "extract_tagged_answer", "first_bare_token",
    "first_number", "gsm8k_ground_truth", "last_boxed", "last_number", "lenient_answer", "load_hub_rows",
    "make_task", "numeric_equal", "read_jsonl_rows", "reasoning_gym_names", "reward_process_for",
    "resolve_prompt_format", "safe_reward",
]

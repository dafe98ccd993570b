"""RL tasks with verifiable rewards: where prompts come from and how completions are scored.

The trainer sees one small interface, ``Task``: ``problem(split, index)`` gives a formatted prompt and its
ground truth, ``reward(completion, answer)`` scores a completion in [0, 1]. Two families are built in:

- any procedural dataset of reasoning-gym (``chain_sum`` by default), scored by the dataset's own
  ``score_answer``, or, in the ``"bare"`` format for the tiny char-level model, by exact numeric match;
- ``"math"``: question/answer pairs from a local JSONL file or a ``datasets`` hub name (GSM8K, MATH-500, ...),
  scored with math-verify against the completion's final answer.

Rewards are computed through ``safe_reward``, which runs the task's reward in a separate process so that an
exception or a hang (math-verify/sympy can hang on pathological input, sometimes inside one C call that no
signal or thread can interrupt) costs that sample a reward of 0 and never stalls the trainer.

Over 450 lines for now: protocol, answer extraction, reasoning-gym, math and the reward sandbox share this
file; issue 12 splits it into a ``tasks/`` package (mind running reward workers, which unpickle by path).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import multiprocessing
import os
import random
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Protocol, runtime_checkable

from dgg.errors import UserError

SPLITS = ("train", "test")
PROMPT_FORMATS = ("auto", "bare", "instruct", "chat")
ANSWER_PARSERS = ("tags", "lenient")
MATH_TASK_NAME = "math"

# How many train problems one regenerated reasoning-gym chunk holds (random access stays O(1) per chunk).
TRAIN_CHUNK_SIZE = 512
# A chunk gives up after this many raw draws per kept problem (all others collided with the test set).
MAX_DRAWS_PER_KEPT_PROBLEM = 64
_CHUNK_CACHE_SIZE = 16

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
ANSWER_TAG_INSTRUCTION = "Give your final answer between <answer> and </answer> tags."


@dataclass(frozen=True)
class Problem:
    """One prompt the policy is asked to solve.

    prompt: the text fed to the model, already formatted for ``TaskConfig.prompt_format``.
    answer: the ground truth as a string (what ``Task.reward`` compares against).
    meta: JSON-serialisable extras: ``task``, ``split``, ``index``, ``prompt_format``, ``chat`` (True when
        the trainer should render ``prompt`` through ``tokenizer.apply_chat_template``) and source details.
    """

    prompt: str
    answer: str
    meta: dict


@runtime_checkable
class Task(Protocol):
    """What the trainer needs from a task."""

    name: str

    def problem(self, split: str, index: int) -> Problem: ...

    def split_size(self, split: str) -> int | None: ...

    def reward(self, completion: str, answer: str) -> tuple[float, dict]: ...


@dataclass
class TaskConfig:
    """Which task to train on and how its prompts look."""

    name: str = "chain_sum"
    """A reasoning-gym dataset name (``reasoning_gym.factory.DATASETS``), or ``"math"``."""
    options: dict = field(default_factory=dict)
    """reasoning-gym only: keyword arguments for ``reasoning_gym.create_dataset`` (e.g. ``min_terms``,
    ``max_terms``, ``min_digits``, ``max_digits`` for chain_sum). ``seed`` and ``size`` are set by the task."""
    prompt_format: str = "auto"
    """``"auto"`` (default): ``"chat"`` when the model's tokenizer has a chat template, else ``"bare"`` where the
    dataset supports it, else ``"instruct"``. ``"bare"``: the bare expression, e.g. ``"57-8="`` (reasoning-gym datasets whose entries carry
    ``metadata["expression"]``), or the raw question for math. ``"instruct"``: the dataset's question text
    plus an instruction saying where to put the final answer (``\\boxed{}`` for math, ``<answer>`` tags for
    reasoning-gym). ``"chat"``: the same text as instruct, with ``meta["chat"] = True`` so the trainer renders
    it through ``tokenizer.apply_chat_template``."""
    instruction: str | None = None
    """instruct/chat only: the sentence after the question that says how to answer. None: the family's default
    (``<answer>`` tags for reasoning-gym, ``\\boxed{}`` for math); e.g. ``"Reply with just the number."``."""
    answer_parser: str = "tags"
    """reasoning-gym instruct/chat only: how the answer is found in a completion. ``"tags"``: the last
    ``<answer>...</answer>``, else the last ``\\boxed{}`` (reasoning-gym's convention). ``"lenient"``: those,
    else the number after a final "the answer is", else the last number; numeric answers compare as numbers."""
    path: str | None = None
    """math only (required): a local JSONL file, or a ``datasets`` hub name such as ``"openai/gsm8k"``
    (with ``subset="main"``) or ``"HuggingFaceH4/MATH-500"`` (with ``question_field="problem"``)."""
    subset: str | None = None
    """math hub datasets only: the dataset configuration name passed to ``datasets.load_dataset``
    (GSM8K needs ``"main"``)."""
    train_split: str = "train"
    """math hub datasets only: the split that train problems come from."""
    test_split: str = "test"
    """math hub datasets only: the split that held-out problems come from. When it equals ``train_split``
    (e.g. MATH-500, which has only ``"test"``), ``test_size`` rows are held out of that split instead."""
    test_path: str | None = None
    """math only: a separate JSONL file or hub name for the held-out set. None: the test set comes from
    ``path`` (its ``test_split`` for a hub name; ``test_size`` held-out rows for a JSONL file)."""
    question_field: str = "question"
    """math only: the field of each row holding the question (MATH-500: ``"problem"``)."""
    answer_field: str = "answer"
    """math only: the field holding the ground truth; text after the last ``####`` is taken (GSM8K)."""
    test_size: int = 256
    """How many held-out test problems (fewer when a separate math test source has fewer rows)."""
    seed: int = 0
    """Seeds problem generation, the train/test split and the train order; everything is deterministic in
    (seed, split, index)."""
    reward_timeout_s: float = 5.0
    """``safe_reward`` gives a completion reward 0 and ``info["error"] = "timeout"`` after this many seconds."""
    reward: str | None = None
    """Your own reward instead of the task's: ``"module:function"``, importable from the working directory or
    installed, called as ``function(completion, answer, problem)`` and returning a float in [0, 1] or
    ``(float, dict)`` (see ``dgg.rewards``). The task still supplies the problems."""
    max_failed_batches: int = 3
    """Stop the run when every reward of this many consecutive batches failed (0: never); the last checkpoint
    is kept and ``reward_errors.jsonl`` says why."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise UserError(f"TaskConfig.name must be a non-empty string (got {self.name!r})")
        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            raise UserError(f"TaskConfig.options must be a dict with string keys (got {self.options!r})")
        reserved = sorted({"seed", "size"} & set(self.options))
        if reserved:
            raise UserError(f"TaskConfig.options must not set {reserved}: use TaskConfig.seed/test_size")
        if self.prompt_format not in PROMPT_FORMATS:
            raise UserError(
                f"TaskConfig.prompt_format must be one of {PROMPT_FORMATS} (got {self.prompt_format!r})"
            )
        if self.answer_parser not in ANSWER_PARSERS:
            raise UserError(
                f"TaskConfig.answer_parser must be one of {ANSWER_PARSERS} (got {self.answer_parser!r})"
            )
        if self.instruction is not None and not isinstance(self.instruction, str):
            raise UserError(f"TaskConfig.instruction must be a string or None (got {self.instruction!r})")
        for name in ("path", "subset", "test_path"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise UserError(f"TaskConfig.{name} must be None or a non-empty string (got {value!r})")
        for name in ("train_split", "test_split", "question_field", "answer_field"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise UserError(f"TaskConfig.{name} must be a non-empty string (got {value!r})")
        if self.name == MATH_TASK_NAME and self.path is None:
            raise UserError(
                "TaskConfig.path is required for the 'math' task (a JSONL file or a hub dataset name)"
            )
        if isinstance(self.test_size, bool) or not isinstance(self.test_size, int) or self.test_size < 1:
            raise UserError(f"TaskConfig.test_size must be an integer >= 1 (got {self.test_size!r})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"TaskConfig.seed must be an integer >= 0 (got {self.seed!r})")
        timeout = self.reward_timeout_s
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 0 < timeout < float("inf")
        ):
            raise UserError(f"TaskConfig.reward_timeout_s must be a finite number > 0 (got {timeout!r})")
        if self.reward is not None:
            from dgg.rewards import check_reward_spec

            check_reward_spec(self.reward)
        if isinstance(self.max_failed_batches, bool) or not isinstance(self.max_failed_batches, int) \
                or self.max_failed_batches < 0:
            raise UserError(f"TaskConfig.max_failed_batches must be an integer >= 0 (got {self.max_failed_batches!r})")


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from a tuple (stable across processes and Python versions, unlike ``hash``).

    Seeds land far apart on purpose: many reasoning-gym datasets draw item ``idx`` from
    ``Random(seed + idx)``, so neighbouring seeds would share items between splits or chunks.
    """
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**31 - 1)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (got {split!r})")


def _check_index(index: int) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be an integer >= 0 (got {index!r})")


# ---------------------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------------------

_BARE_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")
_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def first_bare_token(completion: str) -> str:
    """The bare-format answer: the text before the first whitespace or ``<`` (where ``<eos>`` etc. start)."""
    match = re.match(r"\s*([^\s<]*)", completion)
    return match.group(1) if match else ""


def bare_numeric_match(token: str, answer: str) -> bool:
    """Exact numeric equality of a plain number literal (``"-49"``, ``"049"``, ``"2.50"``) with the answer."""
    if not _BARE_NUMBER.fullmatch(token):
        return False
    try:
        return Decimal(token) == Decimal(answer)
    except InvalidOperation:
        return False


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    position = text.index("{", start) + 1
    depth = 1
    for offset, char in enumerate(text[position:]):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return text[position : position + offset]
    return None  # unbalanced: the completion was cut off inside the box


def last_number(text: str) -> str | None:
    """The last number in the text (commas as thousands separators dropped), or None."""
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def extract_tagged_answer(completion: str) -> str | None:
    """reasoning-gym's convention: the last ``<answer>...</answer>``; falls back to the last ``\\boxed{}``."""
    matches = re.findall(r"<answer>(.*?)</answer>", completion, flags=re.DOTALL)
    if matches:
        return matches[-1].strip()
    return last_boxed(completion)


_ANSWER_PHRASE = re.compile(r"\b(?:answer|result)\b(?:[^.\n=]*?\bis\b|\s*:)", flags=re.IGNORECASE)
_EXPRESSION_RESULT = re.compile(r"[-+*/×x÷()\d\s.,]*?=\s*(-?\d[\d,]*(?:\.\d+)?)")


def lenient_answer(completion: str) -> str | None:
    """The answer of a chatty instruct model: tags, else ``\\boxed{}``, else what follows the last "the
    answer is" / "answer:" / "the result is" (the value after "=" when an expression follows, as in "the
    answer is 4 - 1 = 3"; else the first number), else the last number in the text. None: no number at all."""
    tagged = extract_tagged_answer(completion)
    if tagged is not None:
        return tagged
    phrases = list(_ANSWER_PHRASE.finditer(completion))
    if phrases:
        rest = completion[phrases[-1].end():]
        expression = _EXPRESSION_RESULT.match(rest)
        number = expression.group(1).replace(",", "") if expression else first_number(rest)
        if number is not None:
            return number
    return last_number(completion)


def first_number(text: str) -> str | None:
    match = _LAST_NUMBER.search(text)
    return match.group(0).replace(",", "") if match else None


def numeric_equal(parsed: str, answer: str) -> bool | None:
    """Whether two numeric strings are equal as numbers; None when either is not a plain number."""
    try:
        return Decimal(parsed.strip().rstrip(".")) == Decimal(answer.strip())
    except (InvalidOperation, ValueError):
        return None


def gsm8k_ground_truth(answer: str) -> str:
    """GSM8K answers end with ``#### 1,234``: keep what follows the last ``####``, commas dropped."""
    if "####" not in answer:
        return answer.strip()
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


# ---------------------------------------------------------------------------------------------------------
# reasoning-gym tasks
# ---------------------------------------------------------------------------------------------------------


def reasoning_gym_names() -> list[str]:
    """Every dataset name reasoning-gym registers (importing it fills the registry)."""
    import reasoning_gym  # noqa: F401  (registers the datasets)
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def _create_reasoning_gym_dataset(name: str, options: dict, seed: int, size: int):
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    try:
        return reasoning_gym.create_dataset(name, seed=seed, size=size, **options)
    except TypeError as error:  # an option the dataset's config dataclass does not have
        allowed = sorted(
            f.name for f in dataclasses.fields(DATASETS[name][1]) if f.name not in ("seed", "size")
        )
        raise UserError(
            f"TaskConfig.options {options!r} do not fit {name!r}: {error}; allowed keys: {allowed}"
        ) from None
    except AssertionError as error:  # reasoning-gym validates configs with assert
        raise UserError(f"TaskConfig.options {options!r} are invalid for {name!r}: {error}") from None


class ReasoningGymTask:
    """A reasoning-gym procedural dataset as an unlimited train split plus a fixed test split.

    Test: ``test_size`` entries of one dataset seeded ``derive_seed(seed, "test")``.
    Train: index i lives in chunk ``i // TRAIN_CHUNK_SIZE``, regenerated on demand from seed
    ``derive_seed(seed, "train", chunk, draw)``; entries whose prompt is in the test set are dropped and
    replaced by further draws, so train and test never share a prompt (in small problem spaces, such as
    two 1-digit terms, most of the space may end up held out). Chunks are cached (LRU), so ~256
    ``problem()`` calls per batch cost one chunk generation per 512 problems.

    Reward: ``"bare"`` prompts are scored by exact numeric match of the completion's first token (the
    dataset scorers give partial credit to any answer containing the oracle as a substring, e.g. 0.5 to
    "12" for answer "2", which would pay a char-level model for padding digits). ``"instruct"``/``"chat"``
    prompts use the dataset's own ``score_answer`` on the last ``<answer>...</answer>`` (else last
    ``\\boxed{}``); pass ``problem=`` to ``reward`` for datasets whose scorer reads the entry's metadata.
    """

    def __init__(self, config: TaskConfig):
        self.name = config.name
        self.config = config
        # The bare-format reward is an exact string match: nothing to isolate, so it runs in-process.
        self.isolate_reward = config.prompt_format != "bare"
        self._scorer = _create_reasoning_gym_dataset(config.name, config.options, seed=0, size=1)
        if config.prompt_format == "bare" and "expression" not in self._scorer[0].get("metadata", {}):
            raise UserError(
                f"TaskConfig.prompt_format='bare' needs entries with metadata['expression'] "
                f"(e.g. chain_sum, basic_arithmetic, products); {config.name!r} has none: use 'instruct' or 'chat'"
            )
        test_dataset = _create_reasoning_gym_dataset(
            config.name, config.options, seed=derive_seed(config.seed, "test"), size=config.test_size
        )
        self._test_entries = [test_dataset[i] for i in range(config.test_size)]
        self._test_prompts = frozenset(self._format(entry) for entry in self._test_entries)
        self._chunks: OrderedDict[int, list[dict]] = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_chunks"] = OrderedDict()  # regenerated on demand; keeps pickling for the reward process cheap
        return state

    def split_size(self, split: str) -> int | None:
        _check_split(split)
        return None if split == "train" else len(self._test_entries)

    def problem(self, split: str, index: int) -> Problem:
        _check_split(split)
        _check_index(index)
        entry = self._entry(split, index)
        meta = {
            "task": self.name,
            "split": split,
            "index": index,
            "prompt_format": self.config.prompt_format,
            "chat": self.config.prompt_format == "chat",
            "source_dataset": entry["metadata"].get("source_dataset", self.name),
            "source_index": entry["metadata"].get("source_index"),
        }
        return Problem(prompt=self._format(entry), answer=str(entry["answer"]), meta=meta)

    def reward(self, completion: str, answer: str, problem: Problem | None = None) -> tuple[float, dict]:
        if self.config.prompt_format == "bare":
            parsed = first_bare_token(completion)
            correct = bare_numeric_match(parsed, answer)
            return float(correct), {"parsed": parsed, "correct": correct}
        lenient = self.config.answer_parser == "lenient"
        parsed = lenient_answer(completion) if lenient else extract_tagged_answer(completion)
        if lenient and parsed is not None and numeric_equal(parsed, answer) is not None:
            correct = bool(numeric_equal(parsed, answer))
            return float(correct), {"parsed": parsed, "correct": correct}
        if problem is not None:
            entry = self._entry(problem.meta["split"], problem.meta["index"])
        else:
            entry = {"question": "", "answer": answer, "metadata": {}}
        score = float(self._scorer.score_answer(answer=parsed, entry=entry)) if parsed is not None else 0.0
        return min(max(score, 0.0), 1.0), {"parsed": parsed, "correct": score == 1.0}

    def _format(self, entry: dict) -> str:
        if self.config.prompt_format == "bare":
            return entry["metadata"]["expression"].replace(" ", "") + "="
        instruction = ANSWER_TAG_INSTRUCTION if self.config.instruction is None else self.config.instruction
        return f"{entry['question']}\n{instruction}".rstrip("\n")

    def _entry(self, split: str, index: int) -> dict:
        if split == "test":
            if index >= len(self._test_entries):
                raise IndexError(
                    f"test index {index} out of range: the test split has {len(self._test_entries)} problems"
                )
            return self._test_entries[index]
        chunk, position = divmod(index, TRAIN_CHUNK_SIZE)
        return self._train_chunk(chunk)[position]

    def _train_chunk(self, chunk: int) -> list[dict]:
        if chunk in self._chunks:
            self._chunks.move_to_end(chunk)
            return self._chunks[chunk]
        kept: list[dict] = []
        for draw in range(MAX_DRAWS_PER_KEPT_PROBLEM):
            dataset = _create_reasoning_gym_dataset(
                self.name,
                self.config.options,
                seed=derive_seed(self.config.seed, "train", chunk, draw),
                size=TRAIN_CHUNK_SIZE,
            )
            for raw_index in range(TRAIN_CHUNK_SIZE):
                entry = dataset[raw_index]
                if self._format(entry) not in self._test_prompts:
                    kept.append(entry)
                    if len(kept) == TRAIN_CHUNK_SIZE:
                        break
            if len(kept) == TRAIN_CHUNK_SIZE:
                break
        else:
            raise UserError(
                f"{self.name} with options {self.config.options!r}: after {MAX_DRAWS_PER_KEPT_PROBLEM * TRAIN_CHUNK_SIZE} "
                f"draws only {len(kept)} train problems fall outside the {len(self._test_prompts)} held-out prompts; "
                "lower TaskConfig.test_size or widen TaskConfig.options"
            )
        self._chunks[chunk] = kept
        if len(self._chunks) > _CHUNK_CACHE_SIZE:
            self._chunks.popitem(last=False)
        return kept


# ---------------------------------------------------------------------------------------------------------
# math task
# ---------------------------------------------------------------------------------------------------------


def _looks_like_local_file(path: str) -> bool:
    return os.path.exists(path) or path.endswith((".jsonl", ".json")) or path.startswith((".", "/", "~"))


def read_jsonl_rows(path: str, question_field: str, answer_field: str) -> list[dict]:
    """``{"question", "answer"}`` rows of a JSONL file; errors name the file, the line and the field."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise UserError(f"math task file not found: {path} (task.path)")
    rows = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserError(f"{path}, line {line_number}: not UTF-8 text (byte {error.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}, line {line_number}: not valid JSON ({error})") from None
            if not isinstance(record, dict):
                raise UserError(
                    f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}"
                )
            for name in (question_field, answer_field):
                if name not in record:
                    raise UserError(
                        f"{path}, line {line_number}: missing field {name!r} (has {sorted(record)})"
                    )
            rows.append({"question": str(record[question_field]), "answer": str(record[answer_field])})
    if not rows:
        raise UserError(f"math task file {path} holds no rows")
    return rows


def load_hub_rows(
    path: str, subset: str | None, split: str, question_field: str, answer_field: str
) -> list[dict]:
    """Rows of a ``datasets`` hub dataset split (needs network access or a warm local cache)."""
    import datasets

    args = (path,) if subset is None else (path, subset)
    dataset = datasets.load_dataset(*args, split=split)
    missing = [name for name in (question_field, answer_field) if name not in dataset.column_names]
    if missing:
        raise UserError(
            f"dataset {path!r} split {split!r} has no field {missing} (has {dataset.column_names})"
        )
    return [
        {"question": str(q), "answer": str(a)}
        for q, a in zip(dataset[question_field], dataset[answer_field], strict=True)
    ]


@lru_cache(maxsize=4096)
def _parse_gold(answer: str) -> list:
    from math_verify import parse

    return parse(answer if "$" in answer or "\\boxed" in answer else f"${answer}$", parsing_timeout=None)


class MathTask:
    """Question/answer pairs scored with math-verify (``parse`` + ``verify``).

    Test: a fixed sample of ``test_size`` rows (seeded shuffle), from ``test_path``/``test_split`` when that is
    a different source, else held out of the train source. Train rows whose question (whitespace-normalised)
    is in the test set are dropped. Train is unlimited: index i is row ``perm_e[i % n]`` of epoch
    ``e = i // n``, each epoch with its own seeded permutation.

    Reward: the completion's last ``\\boxed{...}``, else its last number, parsed and verified against the
    ground truth (GSM8K's ``#### x`` is reduced to ``x``). math-verify's own timeouts use ``signal.alarm``,
    which only works on the main thread, so they are switched off here; ``safe_reward`` bounds the time.
    """

    def __init__(self, config: TaskConfig, rows_loader: Callable[..., list[dict]] | None = None):
        self.name = MATH_TASK_NAME
        self.config = config
        self.isolate_reward = True  # math-verify can hang on pathological input
        load = rows_loader or self._load_rows
        train_rows = load(config.path, config.train_split)
        test_source = (config.test_path or config.path, config.test_split)
        same_source = test_source == (config.path, config.train_split) or (
            config.test_path is None and _looks_like_local_file(config.path)
        )
        rng = random.Random(derive_seed(config.seed, "math-split"))
        if same_source:
            if len(train_rows) <= config.test_size:
                raise UserError(
                    f"{config.path} has {len(train_rows)} rows; holding out TaskConfig.test_size={config.test_size} "
                    "leaves none for training: lower test_size or give a separate test_path/test_split"
                )
            order = list(range(len(train_rows)))
            rng.shuffle(order)
            test_rows = [train_rows[i] for i in order[: config.test_size]]
            train_rows = [train_rows[i] for i in sorted(order[config.test_size :])]
        else:
            all_test_rows = load(*test_source)
            order = list(range(len(all_test_rows)))
            rng.shuffle(order)
            test_rows = [all_test_rows[i] for i in order[: config.test_size]]
        test_questions = {_normalise_question(row["question"]) for row in test_rows}
        self._test_rows = test_rows
        self._train_rows = [
            row for row in train_rows if _normalise_question(row["question"]) not in test_questions
        ]
        if not self._train_rows:
            raise UserError(f"every train row of {config.path} also appears in the test set")
        self.dropped_train_duplicates = len(train_rows) - len(self._train_rows)
        self._epoch_orders: OrderedDict[int, list[int]] = OrderedDict()

    def _load_rows(self, path: str, split: str) -> list[dict]:
        config = self.config
        if _looks_like_local_file(path):
            return read_jsonl_rows(path, config.question_field, config.answer_field)
        return load_hub_rows(path, config.subset, split, config.question_field, config.answer_field)

    @property
    def unique_train_problems(self) -> int:
        """How many distinct train rows one epoch of the (unlimited) train split cycles through."""
        return len(self._train_rows)

    def split_size(self, split: str) -> int | None:
        _check_split(split)
        return None if split == "train" else len(self._test_rows)

    def problem(self, split: str, index: int) -> Problem:
        _check_split(split)
        _check_index(index)
        if split == "test":
            if index >= len(self._test_rows):
                raise IndexError(
                    f"test index {index} out of range: the test split has {len(self._test_rows)} problems"
                )
            row, epoch = self._test_rows[index], 0
        else:
            epoch, position = divmod(index, len(self._train_rows))
            row = self._train_rows[self._epoch_order(epoch)[position]]
        prompt = row["question"]
        if self.config.prompt_format != "bare":
            instruction = MATH_INSTRUCTION if self.config.instruction is None else self.config.instruction
            prompt = f"{prompt}\n{instruction}".rstrip("\n")
        meta = {
            "task": self.name,
            "split": split,
            "index": index,
            "epoch": epoch,
            "prompt_format": self.config.prompt_format,
            "chat": self.config.prompt_format == "chat",
        }
        return Problem(prompt=prompt, answer=gsm8k_ground_truth(row["answer"]), meta=meta)

    def reward(self, completion: str, answer: str, problem: Problem | None = None) -> tuple[float, dict]:
        from math_verify import parse, verify

        boxed = last_boxed(completion)
        extracted = boxed if boxed is not None else last_number(completion)
        if extracted is None:
            return 0.0, {"parsed": None, "correct": False}
        predicted = parse(f"${extracted}$", parsing_timeout=None)
        correct = bool(verify(_parse_gold(answer), predicted, timeout_seconds=None))
        return float(correct), {"parsed": extracted, "correct": correct}

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._epoch_orders:
            order = list(range(len(self._train_rows)))
            random.Random(derive_seed(self.config.seed, "math-epoch", epoch)).shuffle(order)
            self._epoch_orders[epoch] = order
            if len(self._epoch_orders) > 4:
                self._epoch_orders.popitem(last=False)
        self._epoch_orders.move_to_end(epoch)
        return self._epoch_orders[epoch]


def _normalise_question(question: str) -> str:
    return " ".join(question.split())


# ---------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------


def resolve_prompt_format(config: TaskConfig, chat_template: bool) -> TaskConfig:
    """``prompt_format="auto"`` made concrete for a model whose tokenizer has (or lacks) a chat template."""
    if config.prompt_format != "auto":
        return config
    check_task_name(config.name)
    if chat_template:
        chosen = "chat"
    elif config.name == MATH_TASK_NAME:
        chosen = "bare"
    else:
        probe = _create_reasoning_gym_dataset(config.name, config.options, seed=0, size=1)
        chosen = "bare" if "expression" in probe[0].get("metadata", {}) else "instruct"
    return dataclasses.replace(config, prompt_format=chosen)


def check_task_name(name: str) -> None:
    if name != MATH_TASK_NAME and name not in reasoning_gym_names():
        names = reasoning_gym_names()
        raise UserError(
            f"unknown task.name {name!r}: valid names are {MATH_TASK_NAME!r} and the reasoning-gym datasets "
            f"({len(names)}, also listed by dgg.tasks.reasoning_gym_names()): {', '.join(names)}"
        )


def make_task(config: TaskConfig) -> Task:
    """The task named by ``config.name``: ``"math"`` or any reasoning-gym dataset name.

    ``prompt_format="auto"`` is resolved as for a model without a chat template; a trainer that knows its
    tokenizer calls :func:`resolve_prompt_format` first."""
    check_task_name(config.name)
    config = resolve_prompt_format(config, chat_template=False)
    if config.name == MATH_TASK_NAME:
        return MathTask(config)
    return ReasoningGymTask(config)


# ---------------------------------------------------------------------------------------------------------
# Safe reward: a crash or a hang costs one sample, never the run
# ---------------------------------------------------------------------------------------------------------


def _call_reward(task, completion: str, answer: str, problem: Problem | None):
    # ``problem`` goes only to rewards that declare it: the Task protocol's reward takes (completion, answer).
    if problem is None or "problem" not in inspect.signature(task.reward).parameters:
        return task.reward(completion, answer)
    return task.reward(completion, answer, problem=problem)


def _reward_worker(connection, task) -> None:
    """Child-process loop: score (completion, answer, problem) requests until the pipe closes."""
    connection.send("ready")
    while True:
        try:
            completion, answer, problem = connection.recv()
        except EOFError:
            return
        try:
            reward, info = _call_reward(task, completion, answer, problem)
            connection.send(("ok", float(reward), info))
        except Exception as error:  # the sample gets reward 0; the trainer counts info["error"]
            connection.send(("error", f"{type(error).__name__}: {error}", None))


class RewardProcess:
    """One spawned child process that scores rewards of one task, killed and restarted after a timeout.

    Why a process and not a thread or ``signal.alarm``: a hang inside a single C call that holds the GIL
    (sympy evaluating ``9^{9^{9^{9}}}``, say) blocks every thread of the interpreter and ignores signals
    until it returns; only killing a process frees the trainer. ``spawn`` (not fork) because the trainer
    may hold CUDA contexts and threads that must not be forked. Costs: ~1-2 s to start (imports), then one
    pipe round trip per reward (tens of microseconds).
    """

    def __init__(self, task, start_timeout_s: float = 120.0):
        self.task = task
        self.start_timeout_s = start_timeout_s
        self._process = None
        self._connection = None
        self._lock = threading.Lock()  # one request in flight per pipe

    def __call__(self, completion: str, answer: str, timeout_s: float, problem: Problem | None = None):
        with self._lock:
            if self._process is None or not self._process.is_alive():
                self._start()
            self._connection.send((completion, answer, problem))
            if not self._connection.poll(timeout_s):
                self.close()
                return 0.0, {"error": "timeout"}
            status, value, info = self._connection.recv()
        if status == "error":
            return 0.0, {"error": value}
        return value, info

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe()
        process = context.Process(target=_reward_worker, args=(child_end, self.task), daemon=True)
        process.start()
        child_end.close()
        if not parent_end.poll(self.start_timeout_s) or parent_end.recv() != "ready":
            process.kill()
            raise RuntimeError(
                f"the reward process for task {getattr(self.task, 'name', '?')!r} did not start"
            )
        self._process, self._connection = process, parent_end

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
            self._connection.close()
        self._process = self._connection = None


_REWARD_PROCESSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_REWARD_PROCESSES_BY_ID: dict[int, RewardProcess] = {}  # for tasks that cannot be weakly referenced


def reward_process_for(task) -> RewardProcess:
    """The (lazily started) reward process serving this task object; closed when the task is collected."""
    try:
        worker = _REWARD_PROCESSES.get(task)
        if worker is None:
            worker = _REWARD_PROCESSES[task] = RewardProcess(task)
            weakref.finalize(task, worker.close)
    except TypeError:
        worker = _REWARD_PROCESSES_BY_ID.setdefault(id(task), RewardProcess(task))
    return worker


def safe_reward(
    task, completion: str, answer: str, timeout_s: float, problem: Problem | None = None
) -> tuple[float, dict]:
    """``task.reward`` that never raises and never hangs.

    Runs in the task's reward process (see ``RewardProcess``). A reward that raises gives
    ``(0.0, {"error": "<type>: <message>"})``; one still running after ``timeout_s`` gives
    ``(0.0, {"error": "timeout"})`` and its process is killed (a fresh one starts on the next call). A reward
    outside [0, 1] or not finite is an error too. ``problem`` is forwarded to tasks whose scorer needs it.

    A task whose ``isolate_reward`` attribute is False (a pure, fast reward such as an exact match) is scored
    in this process: exceptions are still caught, but no timeout is enforced.
    """
    try:
        if getattr(task, "isolate_reward", True):
            reward, info = reward_process_for(task)(completion, answer, timeout_s, problem)
        else:
            reward, info = _call_reward(task, completion, answer, problem)
            reward = float(reward)
    except Exception as error:  # e.g. the task cannot be pickled for the reward process
        return 0.0, {"error": f"{type(error).__name__}: {error}"}
    if not 0.0 <= reward <= 1.0:  # also catches NaN
        return 0.0, {"error": f"ValueError: reward {reward!r} outside [0, 1]", **info}
    return reward, info

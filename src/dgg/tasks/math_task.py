"""``task.name=math``: question/answer pairs from a local JSONL file or a ``datasets`` hub name (GSM8K,
MATH-500, ...), scored with math-verify against the completion's final answer."""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache

from dgg.errors import UserError, jsonl_objects
from dgg.tasks.answers import gsm8k_ground_truth, last_boxed, last_number
from dgg.tasks.base import (
    MATH_INSTRUCTION,
    MATH_TASK_NAME,
    Problem,
    TaskConfig,
    check_index,
    check_split,
    derive_seed,
)


def _looks_like_local_file(path: str) -> bool:
    return os.path.exists(path) or path.endswith((".jsonl", ".json")) or path.startswith((".", "/", "~"))


def read_jsonl_rows(path: str, question_field: str, answer_field: str) -> list[dict]:
    """``{"question", "answer"}`` rows of a JSONL file; errors name the file, the line and the field."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise UserError(f"math task file not found: {path} (task.path)")
    rows = []
    for _, record in jsonl_objects(path, (question_field, answer_field)):
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
        if config.few_shot:
            raise UserError("TaskConfig.few_shot applies to reasoning-gym bare expressions only, not to math")
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
        check_split(split)
        return None if split == "train" else len(self._test_rows)

    def problem(self, split: str, index: int) -> Problem:
        check_split(split)
        check_index(index)
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

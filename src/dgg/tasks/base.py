"""The task interface: a ``Problem`` (prompt, ground truth, meta), the ``Task`` protocol the trainer sees, and
``TaskConfig``, the typed config of which task to train on and how its prompts look."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from dgg.errors import UserError

SPLITS = ("train", "test")
PROMPT_FORMATS = ("auto", "bare", "instruct", "chat")
ANSWER_PARSERS = ("tags", "lenient")
MATH_TASK_NAME = "math"


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
    few_shot: int = 0
    """reasoning-gym ``"bare"`` only: put this many solved examples before each expression, one per line
    (``"1+3=4\n6-4=2\n9+1="``), so that a base model sees the format it is asked for. The examples are drawn
    from their own seed, never from the held-out set, and are the same for every problem."""
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
        if not isinstance(self.few_shot, int) or isinstance(self.few_shot, bool) or not 0 <= self.few_shot <= 64:
            raise UserError(f"TaskConfig.few_shot must be an integer from 0 to 64 (got {self.few_shot!r})")
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
            from dgg.named import check_reward_spec

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


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (got {split!r})")


def check_index(index: int) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be an integer >= 0 (got {index!r})")

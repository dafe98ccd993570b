"""Any reasoning-gym procedural dataset as a task: an unlimited train split, a fixed test split, and the
dataset's own scorer (or exact numeric match in the bare format of the tiny char-level model)."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from dgg.errors import UserError
from dgg.tasks.answers import (
    bare_numeric_match,
    extract_tagged_answer,
    first_bare_token,
    lenient_answer,
    numeric_equal,
)
from dgg.tasks.base import (
    ANSWER_TAG_INSTRUCTION,
    Problem,
    TaskConfig,
    check_index,
    check_split,
    derive_seed,
)

# How many train problems one regenerated reasoning-gym chunk holds (random access stays O(1) per chunk).
TRAIN_CHUNK_SIZE = 512
# A chunk gives up after this many raw draws per kept problem (all others collided with the test set).
MAX_DRAWS_PER_KEPT_PROBLEM = 64
_CHUNK_CACHE_SIZE = 16


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
        self._test_prompts = frozenset(self._question(entry) for entry in self._test_entries)
        self._prefix = self._few_shot_prefix() if config.few_shot else ""
        self._chunks: OrderedDict[int, list[dict]] = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_chunks"] = OrderedDict()  # regenerated on demand; keeps pickling for the reward process cheap
        return state

    def split_size(self, split: str) -> int | None:
        check_split(split)
        return None if split == "train" else len(self._test_entries)

    def problem(self, split: str, index: int) -> Problem:
        check_split(split)
        check_index(index)
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
        if self.config.few_shot:
            meta["few_shot"] = self.config.few_shot
        return Problem(prompt=self._prefix + self._question(entry), answer=str(entry["answer"]), meta=meta)

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

    def _few_shot_prefix(self) -> str:
        """``few_shot`` solved examples, one per line, from their own seed and never from the held-out set."""
        if self.config.prompt_format != "bare":
            raise UserError(f"TaskConfig.few_shot needs prompt_format 'bare' (got {self.config.prompt_format!r}): "
                            "the examples are written as expression=answer lines")
        size = 4 * self.config.few_shot + 16
        dataset = _create_reasoning_gym_dataset(self.name, self.config.options,
                                                seed=derive_seed(self.config.seed, "few-shot"), size=size)
        shots = [dataset[i] for i in range(size) if self._question(dataset[i]) not in self._test_prompts]
        if len(shots) < self.config.few_shot:
            raise UserError(f"TaskConfig.few_shot={self.config.few_shot}: only {len(shots)} of {size} drawn "
                            f"{self.name} problems fall outside the held-out set; lower few_shot or test_size")
        return "".join(f"{self._question(entry)}{entry['answer']}\n" for entry in shots[:self.config.few_shot])

    def _question(self, entry: dict) -> str:
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
                if self._question(entry) not in self._test_prompts:
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

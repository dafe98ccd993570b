"""``search_qa``: questions answered by searching a corpus, in Search-R1's interaction format.

The policy replies ``<search>query</search>`` to retrieve passages (shown back between ``<information>`` tags)
and ``<answer>text</answer>`` to end the episode; the reward is exact match (or token F1) against the truth.
Offline by default: a generated world of people, cities, countries and companies, one fact per passage,
indexed with bm25s; ``hops: 2`` questions need two look-ups (the person's city, then the city's country).
Easier levels for small models: ``example: true`` adds one worked exchange to the instructions,
``first_search: true`` shows the question's own search results in the first observation, ``untagged: answer``
takes a reply with neither tag as the answer, and ``reward: contains`` accepts an answer whose words include
the truth's.
Bring your own corpus and questions with ``corpus`` (a JSONL file of {"text": ...}) and ``questions`` (JSONL of
{"question": ..., "answer": ...}).
"""

from __future__ import annotations

import logging
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

from dgg.agents.env import StepResult, register_environment
from dgg.errors import UserError, jsonl_objects

INSTRUCTIONS = ("Answer the question. To look something up, reply with <search>your query</search>; the results "
                "come back between <information> and </information>. When you know the answer, reply with "
                "<answer>the answer</answer>.")
EXAMPLE = ("Example. Question: In which city was Ada Stone born?\nYou: <search>Ada Stone</search>\n"
           "<information>\nDoc 1: Ada Stone was born in Lima.\n</information>\nYou: <answer>Lima</answer>")
SEARCH = re.compile(r"<search>(.*?)(?:</search>|$)", re.DOTALL)
ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    lookups: tuple[str, ...] = ()  # the queries an expert makes, in order (generated worlds only)


def _names(rng: random.Random, count: int, parts: int, capitalise_each: bool = False) -> list[str]:
    syllables = ["ka", "lo", "mi", "ren", "to", "va", "sel", "dor", "fi", "nu", "bra", "zen", "qui", "mar",
                 "tal", "os", "ve", "lin", "gar", "pe", "ru", "sha", "dim", "cor"]
    names: list[str] = []
    seen = set()
    while len(names) < count:
        name = "".join(rng.choice(syllables) for _ in range(parts)).capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def generated_world(seed: int, people: int) -> tuple[list[str], list[Question], list[Question]]:
    """(passages, one-hop questions, two-hop questions) of a world drawn from ``seed``."""
    rng = random.Random(seed)
    countries = _names(rng, max(4, people // 20), 3)
    cities = _names(rng, max(8, people // 5), 3)
    companies = [f"{name} {rng.choice(['Labs', 'Works', 'Group', 'Systems'])}" for name in _names(rng, max(6, people // 8), 2)]
    firsts, lasts = _names(rng, people, 2), _names(rng, people, 3)
    country_of = {city: rng.choice(countries) for city in cities}
    base_of = {company: rng.choice(cities) for company in companies}
    passages = [f"{city} is a city in {country}." for city, country in country_of.items()]
    passages += [f"{company} is based in {city}." for company, city in base_of.items()]
    one_hop, two_hop = [], []
    for first, last in zip(firsts, lasts):
        person, city, company = f"{first} {last}", rng.choice(cities), rng.choice(companies)
        passages += [f"{person} was born in {city}.", f"{person} works for {company}."]
        one_hop += [Question(f"In which city was {person} born?", city, (person,)),
                    Question(f"Which company does {person} work for?", company, (person,))]
        two_hop += [Question(f"In which country was {person} born?", country_of[city], (person, city)),
                    Question(f"In which city is the company that {person} works for based?", base_of[company],
                             (person, company))]
    rng.shuffle(passages)
    return passages, one_hop, two_hop


def normalise(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(word for word in text.split() if word not in ("a", "an", "the"))


def token_f1(prediction: str, truth: str) -> float:
    predicted, true = normalise(prediction).split(), normalise(truth).split()
    common = sum(min(predicted.count(w), true.count(w)) for w in set(predicted))
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(true)
    return 2 * precision * recall / (precision + recall)


class Retriever:
    """bm25s over the passages (``pip install 'dgg[agents]'``)."""

    def __init__(self, passages: list[str]):
        try:
            import bm25s
        except ImportError as err:
            raise UserError("the search_qa environment needs bm25s: pip install 'dgg[agents]'") from err
        logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs each index build at DEBUG
        self._bm25s, self.passages = bm25s, passages
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize(passages, stopwords="en", show_progress=False), show_progress=False)

    def ranked(self, query: str, k: int) -> list[int]:
        """Indices of the ``k`` best passages for ``query``, best first."""
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not tokens.vocab:  # only stop words
            return []
        ids, _ = self.index.retrieve(tokens, k=min(k, len(self.passages)), show_progress=False)
        return [int(i) for i in ids[0]]

    def search(self, query: str, k: int) -> list[str]:
        return [self.passages[i] for i in self.ranked(query, k)]


_WORLDS: dict[tuple, tuple[Retriever, list[Question], list[Question]]] = {}


def _load_jsonl(path: str, fields: tuple[str, ...]) -> list[dict]:
    if not Path(path).is_file():
        raise UserError(f"task.options: no file {path}")
    rows = []
    for number, row in jsonl_objects(path, fields):
        if not all(isinstance(row[f], str) for f in fields):
            raise UserError(f"{path}, line {number}: {', '.join(fields)} must be strings")
        rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no rows")
    return rows


def _world(world_seed: int, people: int, corpus: str | None, questions: str | None):
    def stamp(path):  # a file edited in place is read again
        return None if path is None or not Path(path).is_file() else (path, Path(path).stat().st_mtime_ns,
                                                                      Path(path).stat().st_size)

    key = (world_seed, people, corpus, questions, stamp(corpus), stamp(questions))
    if key not in _WORLDS:
        passages, one_hop, two_hop = generated_world(world_seed, people)
        if corpus is not None:
            passages = [row["text"] for row in _load_jsonl(corpus, ("text",))]
        if questions is not None:
            one_hop = two_hop = [Question(r["question"], r["answer"]) for r in _load_jsonl(questions, ("question", "answer"))]
        _WORLDS[key] = (Retriever(passages), one_hop, two_hop)
    return _WORLDS[key]


@register_environment("search_qa")
class SearchQA:
    """One question per episode, drawn from the seed; searches until an answer or the turn limit."""

    def __init__(self, hops: int = 2, people: int = 200, world_seed: int = 0, top_k: int = 3, reward: str = "em",
                 corpus: str | None = None, questions: str | None = None, example: bool = False,
                 first_search: bool = False, untagged: str = "invalid"):
        if hops not in (1, 2):
            raise UserError(f"task.options.hops must be 1 or 2 (got {hops!r})")
        if reward not in ("em", "f1", "contains"):
            raise UserError(f"task.options.reward must be em, f1 or contains (got {reward!r})")
        if untagged not in ("invalid", "answer"):
            raise UserError(f"task.options.untagged must be invalid or answer (got {untagged!r})")
        if not isinstance(top_k, int) or top_k < 1:
            raise UserError(f"task.options.top_k must be an integer >= 1 (got {top_k!r})")
        if not isinstance(people, int) or people < 2:
            raise UserError(f"task.options.people must be an integer >= 2 (got {people!r})")
        self.retriever, one_hop, two_hop = _world(world_seed, people, corpus, questions)
        self.questions = one_hop if hops == 1 else two_hop
        self.top_k, self.reward_kind, self.first_search, self.untagged = top_k, reward, first_search, untagged
        self.instructions = f"{INSTRUCTIONS}\n{EXAMPLE}" if example else INSTRUCTIONS  # a worked exchange helps small models
        self.question: Question | None = None
        self.searches = 0

    def reset(self, seed: int) -> str:
        self.question = self.questions[random.Random(seed).randrange(len(self.questions))]
        self.searches = 0
        first = f"{self.instructions}\nQuestion: {self.question.text}"
        if self.first_search:  # the question's own results, as if it had been searched once
            first += "\n" + self._information(self.question.text)
        return first

    def step(self, action: str) -> StepResult:
        if self.question is None:
            raise RuntimeError("step before reset")
        answer, search = ANSWER.search(action), SEARCH.search(action)
        if answer is not None and (search is None or answer.start() < search.start()):
            return self._score(answer.group(1).strip())
        if search is not None and search.group(1).strip():
            self.searches += 1
            return StepResult(self._information(search.group(1).strip()))
        if self.untagged == "answer" and search is None and action.strip():
            return self._score(action.strip())
        return StepResult("Invalid reply: write <search>your query</search> to look something up, or "
                          "<answer>the answer</answer> to finish.", 0.0, False, {"invalid": True})

    def _information(self, query: str) -> str:
        found = self.retriever.search(query, self.top_k)
        listing = "\n".join(f"Doc {i}: {text}" for i, text in enumerate(found, 1)) or "No results."
        return f"<information>\n{listing}\n</information>"

    def _score(self, given: str) -> StepResult:
        truth = self.question.answer
        if self.reward_kind == "f1":
            score = token_f1(given, truth)
        elif self.reward_kind == "contains":  # the truth's words appear in order, e.g. in a whole sentence
            score = float(f" {normalise(truth)} " in f" {normalise(given)} ")
        else:
            score = float(normalise(given) == normalise(truth))
        return StepResult("", score, True, {"answer": given, "searches": self.searches})

    def expert_action(self, step: int) -> str:
        """The next reply of a policy that knows the look-ups (generated worlds only): search each, then answer."""
        assert self.question is not None and self.question.lookups, "no expert plan for this question"
        if step < len(self.question.lookups):
            return f"<search>{self.question.lookups[step]}</search>"
        return f"<answer>{self.question.answer}</answer>"

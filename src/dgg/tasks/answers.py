"""Finding the final answer in a completion: ``<answer>`` tags, ``\\boxed{}``, "the answer is X", the last number;
and comparing numbers as numbers."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

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

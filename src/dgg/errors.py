"""The one kind of error a user can fix: a bad config value, a missing or malformed file, an unknown name.

Every ``dgg`` command turns a :class:`UserError` (and an operating-system error such as a permission or a full
disk) into one line that names the field or file, and exits 2; ``dgg --debug ...`` shows the traceback instead.
Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import json
from pathlib import Path


class UserError(ValueError):
    """Something the user can fix; the message names the field, file or value and what is allowed."""


def utf8_lines(path: str | Path):
    """``(line number, text)`` of each non-blank line of a text file, the newline kept (a line without one is
    the last, perhaps torn); a line that is not UTF-8 is a UserError naming the file and the line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{path}, line {number}: not UTF-8 text (byte {err.start})") from None
            if line.strip():
                yield number, line


def jsonl_objects(path: str | Path, required: tuple[str, ...] = ()):
    """``(line number, object)`` of each non-blank line of a JSONL file; a line that is not a JSON object, or that
    lacks a ``required`` field, is a UserError naming the file and the line."""
    for number, line in utf8_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}, line {number}: not valid JSON ({error})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        for name in required:
            if name not in record:
                raise UserError(f"{path}, line {number}: missing field {name!r} (has {sorted(record)})")
        yield number, record


def read_json_file(path: str | Path, what: str) -> object:
    """A JSON file's content, or a UserError that names the file (missing, not UTF-8, or not JSON)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{what} {path} is not valid JSON ({err})") from None

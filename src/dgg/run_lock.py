"""One writer per run directory: an OS lock (``flock``) held for the life of the process that trains it.

The kernel drops an ``flock`` when its holder exits, however it exits (kill -9 included), so a lock is never
stale. The lock file also records who holds it (PID and command line), so that a refused launch can name them.
The lock is re-entrant within one process: ``dgg bench`` takes it for an arm, and the trainer it starts inside
that arm takes it again without deadlocking on itself.

Files that several runs share (a ``dgg bench`` directory's experiment.json and report) have a second, short lock,
:func:`shared_files`, which waits its turn instead of refusing.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dgg.errors import UserError

LOCK_FILE = ".running.lock"
SHARED_LOCK_FILE = ".shared.lock"

_held: dict[Path, list] = {}  # resolved run dir -> [open lock file, depth]


class RunDirBusy(UserError):
    """Another process holds the run directory's lock."""


def holder(run_dir: Path) -> str:
    """Who holds ``run_dir``'s lock, as the lock file records it ("PID 123: dgg train ..."), or "unknown"."""
    try:
        record = json.loads((Path(run_dir) / LOCK_FILE).read_text() or "{}")
        return f"PID {record['pid']}: {record['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def try_lock(run_dir: Path) -> bool:
    """Take ``run_dir``'s lock for this process (creating the directory); False if another process holds it."""
    key = Path(run_dir).resolve()
    if key in _held:
        _held[key][1] += 1
        return True
    try:
        import fcntl
    except ImportError:  # no flock (Windows): nothing to enforce
        _held[key] = [None, 1]
        return True
    key.mkdir(parents=True, exist_ok=True)
    handle = open(key / LOCK_FILE, "a+", encoding="utf-8")  # "a+": opening never truncates the holder's record
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return False
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv)}))
    handle.flush()
    _held[key] = [handle, 1]
    return True


def unlock(run_dir: Path) -> None:
    key = Path(run_dir).resolve()
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        if entry[0] is not None:
            entry[0].close()  # closing the last descriptor releases the flock


def lock_or_refuse(run_dir: Path) -> None:
    """Take the lock or raise :class:`RunDirBusy` naming the holder; the directory is left as it was."""
    if not try_lock(run_dir):
        raise RunDirBusy(f"{run_dir} is in use by another run ({holder(run_dir)}); wait for it to end or stop "
                         "it, or choose another output directory")


@contextmanager
def held(run_dir: Path) -> Iterator[bool]:
    """``with held(d) as mine:`` mine is False when another process holds ``d``; released on exit."""
    mine = try_lock(run_dir)
    try:
        yield mine
    finally:
        if mine:
            unlock(run_dir)


@contextmanager
def shared_files(directory: Path) -> Iterator[None]:
    """``with shared_files(d):`` this process alone reads and rewrites the files that runs in ``d`` share; another
    process (a second ``dgg bench`` on the same --out) waits here until the holder leaves the block."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): nothing to enforce
        yield
        return
    with open(directory / SHARED_LOCK_FILE, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        yield

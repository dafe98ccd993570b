"""SIGTERM and SIGINT as a request to stop, the way a preempted cluster job needs them.

A scheduler (Slurm, Kubernetes, a spot instance) sends SIGTERM and allows a grace period. The first SIGTERM or
SIGINT only raises a flag; the trainer looks at it between update attempts, finishes the one in flight, writes a
checkpoint there and raises :class:`RunStopped`, which ``dgg`` turns into one line and exit code 128 + the
signal's number (143 for SIGTERM, 130 for SIGINT), as a shell reports a job ended by that signal. A second
signal aborts at once with the default action; the checkpoint written last stays intact, since checkpoints
are written to a temporary folder and renamed.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """Set by the first stop signal; ``signum`` is that signal's number, None while none has arrived."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


STOP = StopFlag()  # the process's one flag: every trainer in it stops on the same request


class RunStopped(Exception):
    """A run stopped at a signal's request after checkpointing; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, run_dir, message: str):
        super().__init__(message)
        self.run_dir = run_dir
        self.exit_code = 128 + signum


_installed = 0  # depth of nested stop_signals() blocks in this process


def stop_requested() -> bool:
    """Whether a stop signal has come inside the stop_signals() block running now."""
    return bool(_installed) and STOP.requested


@contextmanager
def stop_signals() -> Iterator[StopFlag]:
    """Within the block, the first SIGTERM or SIGINT sets the process's :data:`STOP` flag; a second one of either
    ends the process at once. The outermost block clears the flag and installs the handlers (from the main thread
    only: Python allows no other), and restores the previous ones after; inner blocks share them. So a `dgg`
    command that wraps its whole run also covers model loading and the moments between two bench arms."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        yield STOP
        return
    if _installed:
        _installed += 1
        try:
            yield STOP
        finally:
            _installed -= 1
        return

    def request_stop(signum, _frame):
        if STOP.requested:  # the second signal: abort now, with the signal's own default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        STOP.signum = signum

    STOP.signum = None
    previous = {signum: signal.signal(signum, request_stop) for signum in STOP_SIGNALS}
    _installed = 1
    try:
        yield STOP
    finally:
        _installed = 0
        for signum, handler in previous.items():
            signal.signal(signum, handler)

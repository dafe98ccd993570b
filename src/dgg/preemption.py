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


class RunStopped(Exception):
    """A run stopped at a signal's request after checkpointing; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, run_dir, message: str):
        super().__init__(message)
        self.run_dir = run_dir
        self.exit_code = 128 + signum


@contextmanager
def stop_signals(flag: StopFlag) -> Iterator[StopFlag]:
    """Within the block, the first SIGTERM or SIGINT sets ``flag``; a second one of either ends the process at
    once. Handlers are only installed from the main thread (Python allows no other) and are restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def request_stop(signum, _frame):
        if flag.requested:  # the second signal: abort now, with the signal's own default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        flag.signum = signum

    previous = {signum: signal.signal(signum, request_stop) for signum in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

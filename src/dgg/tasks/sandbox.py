"""``safe_reward``: a task's reward run in a separate process, so that an exception or a hang (math-verify and
sympy can hang inside one C call that no signal or thread interrupts) costs one sample a reward of 0 and never
stalls the trainer."""

from __future__ import annotations

import inspect
import multiprocessing
import threading
import weakref

from dgg.tasks.base import Problem


def call_reward(task, completion: str, answer: str, problem: Problem | None):
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
            reward, info = call_reward(task, completion, answer, problem)
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
            reward, info = call_reward(task, completion, answer, problem)
            reward = float(reward)
    except Exception as error:  # e.g. the task cannot be pickled for the reward process
        return 0.0, {"error": f"{type(error).__name__}: {error}"}
    if not 0.0 <= reward <= 1.0:  # also catches NaN
        return 0.0, {"error": f"ValueError: reward {reward!r} outside [0, 1]", **info}
    return reward, info

"""A process pool for rewards whose tasks can be killed when they overrun.

`concurrent.futures` cannot stop a stuck task; here every worker is a process of its own (a fresh
interpreter, never a fork: the parent may be a multi-threaded JAX process) and a task that exceeds
its hard deadline gets its worker killed and replaced. Math runs in the worker's main thread, so
its interval-timer limit works; code tasks only drive sandbox subprocesses, which die with the
worker. One `run` at a time per pool (a lock), so a pool may be shared between threads. Workers are
started as fresh interpreters, so the pool can be created from any script, test or notebook.

The pool does not import what it runs: a worker serves the task kinds its entry point
(`_worker.py`) names, so the rewards that use the pool may import it without a cycle.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from g2rpo_jax.rewards.outcome import RewardOutcome

logger = logging.getLogger(__name__)

# Slack on top of a task's own limit before its worker is declared stuck and killed.
MATH_HARD_SLACK_S = 10.0
CODE_HARD_SLACK_S = 10.0
WORKER_START_TIMEOUT_S = 180.0


@dataclasses.dataclass(frozen=True)
class TaskFailure:
    """A task that did not return a result: its worker overran ("timeout") or died/raised."""

    reason: str  # "timeout" or "error"
    detail: str = ""


def _die_with_parent() -> None:
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def failure_outcome(failure: TaskFailure) -> RewardOutcome:
    """The outcome of a scoring task that returned nothing: reward 0, the event counted."""
    return RewardOutcome(0.0, timeouts=int(failure.reason == "timeout"),
                         sandbox_errors=int(failure.reason == "error"), detail=failure.detail)


def worker_main(fd: int, handlers: Mapping[str, Callable[..., Any]],
                warm_up: Callable[[], None] | None, die_with_parent: bool) -> None:
    """Entry point of a worker process (see _worker.py): serve tasks until told to stop or
    until the parent's end of the connection closes. A task (id, kind, args) is answered with
    `handlers[kind](*args)`; `warm_up` runs once, before the worker says it is ready."""
    if die_with_parent:
        _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    conn = multiprocessing.connection.Connection(fd)
    if warm_up is not None:
        warm_up()  # e.g. pay the sympy import before the first deadline starts
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, kind, args = message
        try:
            if kind not in handlers:
                raise ValueError(f"task kind={kind!r}; valid: {tuple(handlers)}")
            result = handlers[kind](*args)
        except Exception as e:  # noqa: BLE001 (reported to the parent as a task failure)
            result = TaskFailure("error", f"{type(e).__name__}: {e}"[:500])
        conn.send((task_id, result))


class _Worker:
    """A worker started as a fresh interpreter (`python -m g2rpo_jax.rewards._worker`), not
    through multiprocessing's spawn, which would re-import the caller's __main__ module."""

    def __init__(self, warm_up: bool):
        parent_sock, child_sock = socket.socketpair()
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "g2rpo_jax.rewards._worker", str(child_sock.fileno()),
             "1" if warm_up else "0",
             # The parent-death signal follows the creating *thread*; only the main thread is
             # sure to live as long as the pool. Otherwise the closed socket ends the worker.
             "1" if threading.current_thread() is threading.main_thread() else "0"],
            pass_fds=[child_sock.fileno()], env=env, stdin=subprocess.DEVNULL)
        child_sock.close()
        self.conn = multiprocessing.connection.Connection(parent_sock.detach())
        self.ready = False
        self.task: tuple[int, float] | None = None  # (task index, hard deadline)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.conn.close()


class RewardPool:
    """`num_workers` reward processes. Use as a context manager or call `close()`."""

    def __init__(self, num_workers: int = 2, *, warm_up: bool = True):
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers!r}; must be >= 1")
        self.num_workers = num_workers
        self._warm_up = warm_up
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        atexit.register(self.close)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "RewardPool":
        with self._lock:
            self._start_locked()
        return self

    def _start_locked(self) -> None:
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._warm_up))
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        for worker in self._workers:
            if worker.ready:
                continue
            if not worker.conn.poll(max(deadline - time.monotonic(), 0)):
                raise RuntimeError("a reward worker did not start in time")
            if worker.conn.recv() != "ready":
                raise RuntimeError("a reward worker sent an unexpected greeting")
            worker.ready = True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for worker in self._workers:
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
            for worker in self._workers:
                try:
                    worker.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                worker.kill()
            self._workers = []

    def __enter__(self) -> "RewardPool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running ----------------------------------------------------------------------------
    def run(self, tasks: Sequence[tuple[str, tuple, float]]) -> list[Any]:
        """Run (kind, args, hard_timeout_s) tasks; results in order. A task whose worker
        overruns or dies yields a TaskFailure (its worker is replaced)."""
        with self._lock:
            self._start_locked()
            return self._run_locked(list(tasks))

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        index = self._workers.index(worker)
        self._workers[index] = _Worker(self._warm_up)

    def _run_locked(self, tasks: list[tuple[str, tuple, float]]) -> list[Any]:
        results: list[Any] = [None] * len(tasks)
        waiting = collections.deque(range(len(tasks)))
        while waiting or any(w.task for w in self._workers):
            for worker in self._workers:
                if waiting and worker.task is None and self._ensure_ready(worker):
                    index = waiting.popleft()
                    kind, args, hard_timeout_s = tasks[index]
                    worker.conn.send((index, kind, args))
                    worker.task = (index, time.monotonic() + hard_timeout_s)
            busy = [w for w in self._workers if w.task]
            if not busy:
                continue
            next_deadline = min(w.task[1] for w in busy)
            ready = multiprocessing.connection.wait(
                [w.conn for w in busy], timeout=max(next_deadline - time.monotonic(), 0))
            for worker in busy:
                index = worker.task[0]
                if worker.conn in ready:
                    try:
                        task_id, result = worker.conn.recv()
                        results[task_id] = result
                        worker.task = None
                    except (EOFError, OSError):
                        results[index] = TaskFailure("error", "reward worker died")
                        self._replace(worker)
                elif time.monotonic() >= worker.task[1]:
                    logger.warning("reward task %s (%s) overran its hard limit; restarting "
                                   "its worker", index, tasks[index][0])
                    results[index] = TaskFailure("timeout", "worker killed after hard limit")
                    self._replace(worker)
        return results

    def _ensure_ready(self, worker: _Worker) -> bool:
        if worker.ready:
            return True
        if worker.conn.poll(WORKER_START_TIMEOUT_S) and worker.conn.recv() == "ready":
            worker.ready = True
            return True
        raise RuntimeError("a replacement reward worker did not start in time")

    # -- typed helpers ----------------------------------------------------------------------
    def score_math(self, pairs: Sequence[tuple[str, str]], settings) -> list:
        """RewardOutcomes for (completion, answer) pairs."""
        hard = settings.timeout_s + MATH_HARD_SLACK_S
        results = self.run([("math", (c, a, settings), hard) for c, a in pairs])
        return [failure_outcome(r) if isinstance(r, TaskFailure) else r for r in results]


_helper: RewardPool | None = None
_helper_lock = threading.Lock()


def helper_pool() -> RewardPool:
    """A one-worker pool for callers outside the main thread (created on first use)."""
    global _helper
    with _helper_lock:
        if _helper is None or _helper._closed:
            _helper = RewardPool(1)
        return _helper

"""Running one execution in the sandbox: start `_launcher.py` with the spec, collect its pipes
under the caps and deadlines, kill the whole tree at the end, and report an `ExecutionResult`.

The wall-clock limit and the stdout cap are enforced here, outside the sandbox: the whole tree is
killed with SIGKILL through its process group (and, with namespaces, by tearing down its PID
namespace, which `execute` waits for), so the program can neither ignore them nor leave anything
running behind. stderr is drained and all but its start discarded.
"""

from __future__ import annotations

import dataclasses
import marshal
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Mapping

from g2rpo_jax.rewards.sandbox.limits import SandboxLimits
from g2rpo_jax.rewards.sandbox.spec import NAMESPACE_WORKDIR, build_spec

LAUNCHER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_launcher.py")
RESOLVED_MODES = ("namespaces", "rlimits")
# stderr is not judged: its first bytes are kept (the start of a traceback, for the logs), the rest
# is read and discarded, so a program may write any amount there without failing or filling memory.
STDERR_KEEP_BYTES = 8192


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
    """What happened to one execution.

    status: "exited" (the program ended by itself; see exit_code), "timeout", "output_limit"
    (stdout over the cap) or "sandbox_error" (the sandbox failed, not the program).
    stderr: its first STDERR_KEEP_BYTES bytes; the rest was discarded.
    exit_code: like `subprocess` (negative: killed by that signal); None unless "exited".
    """

    status: str
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    result_channel: bytes
    wall_s: float
    error: str = ""
    notes: str = ""

    @property
    def clean_exit(self) -> bool:
        return self.status == "exited" and self.exit_code == 0


def _memfd_with(data: bytes, name: str) -> int:
    fd = os.memfd_create(name, 0)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class _Collector:
    """Reads the launcher's pipes with caps, tracking the status protocol and the deadlines."""

    def __init__(self, proc, status_r: int, result_r: int, limits: SandboxLimits):
        self.limits = limits
        self.buffers = {"stdout": bytearray(), "stderr": bytearray(), "status": bytearray(),
                        "result": bytearray()}
        self.selector = selectors.DefaultSelector()
        self.selector.register(proc.stdout, selectors.EVENT_READ, "stdout")
        self.selector.register(proc.stderr, selectors.EVENT_READ, "stderr")
        self.selector.register(status_r, selectors.EVENT_READ, "status")
        if result_r >= 0:
            self.selector.register(result_r, selectors.EVENT_READ, "result")
        self.open_streams = len(self.selector.get_map())
        self.started_at = None  # when the program was exec'd ("ready" on the status pipe)
        self.overflow = False
        self.init_pidfd = None  # PID 1 of the sandbox's PID namespace, once announced

    def _watch_init(self) -> None:
        for line in self.buffers["status"].split(b"\n")[:-1]:
            if line.startswith(b"init "):
                try:
                    self.init_pidfd = os.pidfd_open(int(line.split()[1]))
                except (OSError, ValueError, AttributeError):
                    self.init_pidfd = -1  # already gone, or no pidfds: nothing to wait for
                return

    def wait_for_namespace_teardown(self, timeout_s: float = 10.0) -> None:
        """After a kill: PID 1 exits only once every process of its namespace is gone."""
        if self.init_pidfd is not None and self.init_pidfd >= 0:
            watcher = selectors.DefaultSelector()
            watcher.register(self.init_pidfd, selectors.EVENT_READ)
            watcher.select(timeout=timeout_s)
            watcher.close()
            os.close(self.init_pidfd)
            self.init_pidfd = -1

    def _read(self, key) -> None:
        fileobj, name = key.fileobj, key.data
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        try:
            chunk = os.read(fd, 1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            self.selector.unregister(fileobj)
            self.open_streams -= 1
            return
        if name == "stderr":
            room = STDERR_KEEP_BYTES - len(self.buffers["stderr"])
            self.buffers["stderr"] += chunk[:max(room, 0)]
            return
        self.buffers[name] += chunk
        if name == "stdout" and len(self.buffers["stdout"]) > self.limits.max_output_bytes:
            self.overflow = True
        if name == "result" and len(self.buffers["result"]) > 4096:
            self.overflow = True  # only a short token is ever written there legitimately
        if name == "status":
            if self.started_at is None and b"ready" in self.buffers["status"]:
                self.started_at = time.monotonic()
            if self.init_pidfd is None:
                self._watch_init()

    def run(self, launched_at: float) -> str:
        """Pump until every stream closes; returns "done", "timeout", "setup_timeout" or
        "output_limit"."""
        while self.open_streams > 0:
            now = time.monotonic()
            if self.started_at is None:
                deadline = launched_at + self.limits.setup_timeout_s
            else:
                deadline = self.started_at + self.limits.timeout_s
            if now >= deadline:
                return "timeout" if self.started_at is not None else "setup_timeout"
            for key, _ in self.selector.select(timeout=deadline - now):
                self._read(key)
                if self.overflow:
                    return "output_limit"
        return "done"

    def close(self) -> None:
        self.selector.close()


def _parse_status(text: str) -> tuple[str, int | None, str, str]:
    """(kind, exit_code, error, notes) from the launcher's status lines."""
    notes, exit_code, error = "", None, ""
    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        if word == "ready":
            notes = rest
        elif word == "exit":
            exit_code = None if rest == "None" else os.waitstatus_to_exitcode(int(rest))
        elif word == "error":
            error = rest
    if error:
        return "sandbox_error", None, error, notes
    if exit_code is None:
        return "sandbox_error", None, "the sandbox ended without reporting the program's exit", notes
    return "exited", exit_code, "", notes


def _kill_tree(proc) -> None:
    # The launcher has not been reaped yet, so its process group id cannot have been reused.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _kill_processes_with_token(token: str) -> int:
    """rlimits fallback: SIGKILL the processes whose environment carries `token` (this finds
    those that left the process group, like setsid daemons); how many were found."""
    marker = f"G2RPO_SANDBOX_TOKEN={token}".encode()
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read():
                    os.kill(int(entry), signal.SIGKILL)
                    killed += 1
        except OSError:
            continue
    return killed


def _launch(spec: dict, stdin: bytes, result_channel: bool):
    """Start the launcher on `spec`; (process, status pipe, result pipe or -1, start time).
    Raises OSError with every descriptor closed when it cannot start."""
    spec_fd = _memfd_with(marshal.dumps(spec), "sandbox-spec")
    stdin_fd = _memfd_with(stdin, "sandbox-stdin")
    status_r, status_w = os.pipe()
    result_r, result_w = os.pipe() if result_channel else (-1, -1)
    pass_fds = [spec_fd, status_w] + ([result_w] if result_channel else [])
    launched_at = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", LAUNCHER_PATH, str(spec_fd), str(status_w),
             str(result_w)],
            stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds,
            env={}, cwd="/", start_new_session=True)
    except OSError:
        _close_all(status_r, result_r)
        raise
    finally:
        _close_all(spec_fd, stdin_fd, status_w, result_w)  # the launcher holds its own copies
    return proc, status_r, result_r, launched_at


def _close_all(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def _end_tree(proc, collector: _Collector, isolation: str, token: str) -> None:
    """Kill whatever is left of the execution and wait until it is gone."""
    _kill_tree(proc)
    collector.wait_for_namespace_teardown()
    if isolation != "namespaces":
        # Until no marked process is left: killed ones still show up while they exit, and a
        # forking daemon may need a few passes.
        deadline = time.monotonic() + 10.0
        while _kill_processes_with_token(token) and time.monotonic() < deadline:
            time.sleep(0.01)


def _result(outcome: str, collector: _Collector, launched_at: float) -> ExecutionResult:
    """The ExecutionResult of a finished collection (`outcome` as `_Collector.run` returns)."""
    wall_s = time.monotonic() - (collector.started_at or launched_at)
    buffers = collector.buffers
    kind, exit_code, error, notes = _parse_status(buffers["status"].decode("utf-8", "replace"))
    if outcome == "timeout":
        kind, exit_code = "timeout", None
    elif outcome == "output_limit":
        kind, exit_code = "output_limit", None
    elif outcome == "setup_timeout":
        kind, exit_code, error = "sandbox_error", None, "the sandbox did not start in time"
    if kind == "sandbox_error":
        launcher_stderr = bytes(buffers["stderr"][-2000:]).decode("utf-8", "replace")
        error = error or launcher_stderr
    else:
        error = ""  # e.g. a killed tree never reports an exit status; that is not an error
    return ExecutionResult(kind, exit_code, bytes(buffers["stdout"]), bytes(buffers["stderr"]),
                           bytes(buffers["result"]), wall_s, error, notes)


def execute(files: Mapping[str, str], main_file: str, *, limits: SandboxLimits,
            stdin: bytes = b"", result_channel: bool = False,
            compile_main: bool = False) -> ExecutionResult:
    """`run_python` with the isolation mode already resolved (not "auto")."""
    limits = limits.validate()
    isolation = limits.isolation
    if isolation not in RESOLVED_MODES:
        raise ValueError(f"code.isolation={isolation!r} is not resolved; valid: {RESOLVED_MODES}")
    token = os.urandom(16).hex()
    host_workdir = None
    if isolation == "namespaces":
        workdir = NAMESPACE_WORKDIR
    else:
        host_workdir = workdir = tempfile.mkdtemp(prefix="g2rpo_sandbox_")
    spec = build_spec(files, main_file, limits, isolation, workdir, token, compile_main)
    try:
        proc, status_r, result_r, launched_at = _launch(spec, stdin, result_channel)
    except OSError as e:
        if host_workdir:
            shutil.rmtree(host_workdir, ignore_errors=True)
        return ExecutionResult("sandbox_error", None, b"", b"", b"", 0.0, f"launch failed: {e}")
    collector = _Collector(proc, status_r, result_r, limits)
    try:
        outcome = collector.run(launched_at)
    finally:
        _end_tree(proc, collector, isolation, token)
        collector.close()
        proc.stdout.close()
        proc.stderr.close()
        _close_all(status_r, result_r)
        if host_workdir:
            shutil.rmtree(host_workdir, ignore_errors=True)
    return _result(outcome, collector, launched_at)

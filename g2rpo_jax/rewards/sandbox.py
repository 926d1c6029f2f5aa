"""Host side of the code sandbox: run an untrusted Python program in a separate process tree.

Each execution starts `_launcher.py` in a new session with an empty environment. With Linux
namespaces (used when the host allows them: root, or unprivileged user namespaces) the program
gets a fresh user namespace without capabilities (and a distinct unprivileged uid when the host
is root), no network (a new network namespace whose loopback is down), its own PID namespace
(every process it starts dies with it), a read-only view of the file system with a private
size-capped tmpfs as working directory, private /tmp and /dev/shm, the host user's home
directory hidden, no nested user namespaces, and rlimits (address space, CPU time, processes,
file size, open files). Without namespaces it falls back to rlimits, the scrubbed environment,
a private directory, no capabilities, and a subreaper plus an environment-token scan that kill
descendants; that fallback cannot block the network or writes elsewhere, and a root host ignores
RLIMIT_NPROC. `sandbox_protections()` reports what is active, as observed from inside a probe.

The wall-clock limit and the stdout cap are enforced here, outside the sandbox: the whole tree is
killed with SIGKILL through its process group (and, with namespaces, by tearing down its PID
namespace, which `run_python` waits for), so the program can neither ignore them nor leave
anything running behind. stderr is drained and all but its start discarded.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import marshal
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Mapping

logger = logging.getLogger(__name__)

LAUNCHER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_launcher.py")
NAMESPACE_WORKDIR = "/tmp/sandbox"  # inside the sandbox's private /tmp
ISOLATION_MODES = ("auto", "namespaces", "rlimits")
# stderr is not judged: its first bytes are kept (the start of a traceback, for the logs), the rest
# is read and discarded, so a program may write any amount there without failing or filling memory.
STDERR_KEEP_BYTES = 8192


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits of one execution. Every field is a config key of the `code` rewards section."""

    timeout_s: float = 10.0  # wall clock, from the moment the program starts
    memory_mb: int = 2048  # address-space limit (RLIMIT_AS) of each process
    cpu_time_s: float = 0.0  # RLIMIT_CPU; 0 means timeout_s + 1
    max_processes: int = 64  # RLIMIT_NPROC (threads count too)
    max_output_bytes: int = 1 << 20  # stdout; more kills the program (stderr is discarded)
    max_file_mb: int = 16  # RLIMIT_FSIZE
    max_open_files: int = 256  # RLIMIT_NOFILE
    workdir_mb: int = 64  # size of the private tmpfs working directory (namespaces mode)
    isolation: str = "auto"  # auto | namespaces | rlimits
    python_executable: str = ""  # "" means the interpreter running this code
    site_packages: bool = False  # let programs import installed packages (numpy, ...); slower
    sandbox_uid: int = 65534  # uid/gid the program runs as when the host is root
    setup_timeout_s: float = 20.0  # for the sandbox itself to start (load can slow it down)
    hide_home: bool = True  # hide the host user's home directory (namespaces mode)

    def validate(self) -> "SandboxLimits":
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"code.isolation={self.isolation!r}; valid: {ISOLATION_MODES}")
        for name in ("timeout_s", "memory_mb", "max_processes", "max_output_bytes",
                     "max_file_mb", "max_open_files", "workdir_mb", "setup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"code.{name}={getattr(self, name)!r}; must be > 0")
        if self.cpu_time_s < 0:
            raise ValueError(f"code.cpu_time_s={self.cpu_time_s!r}; must be >= 0 (0: auto)")
        return self


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


# ----------------------------------------------------------------------------------------------
# Spec construction.

def _python_paths(python: str) -> list[str]:
    """Directories the interpreter needs at run time (kept visible inside hidden paths)."""
    if python == sys.executable:
        candidates = [sys.base_prefix, sys.prefix, sys.exec_prefix, os.path.dirname(python)]
    else:
        candidates = [os.path.dirname(os.path.dirname(os.path.realpath(python))),
                      os.path.dirname(python)]
    paths = sorted({os.path.realpath(p) for p in candidates} | set(candidates))
    # Binding a directory already bound through its parent is redundant.
    return [p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/")
                                        for q in paths)]


def _rlimits(limits: SandboxLimits) -> dict:
    cpu = limits.cpu_time_s or limits.timeout_s + 1.0
    cpu_s = max(1, int(cpu + 0.999))
    return {
        "RLIMIT_AS": limits.memory_mb << 20,
        "RLIMIT_CPU": [cpu_s, cpu_s + 1],  # SIGXCPU first, SIGKILL one second later
        "RLIMIT_NPROC": limits.max_processes,
        "RLIMIT_FSIZE": limits.max_file_mb << 20,
        "RLIMIT_NOFILE": limits.max_open_files,
        "RLIMIT_CORE": 0,
        "RLIMIT_MEMLOCK": 0,
    }


def _program_env(workdir: str, token: str) -> dict:
    """The program's whole environment: nothing is inherited from the host. `token` (rlimits
    mode only) lets the host find processes that left the process group."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    if token:
        env["G2RPO_SANDBOX_TOKEN"] = token
    return env


@functools.lru_cache(maxsize=8)
def _pyc_image(source: str, filename: str) -> bytes:
    """`source` compiled for this interpreter, as a .pyc file that `python file.pyc` runs
    (header: magic number, flags, and an unused source timestamp and size)."""
    code = compile(source, filename, "exec", dont_inherit=True)
    return importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(code)


def _precompile_main(files: Mapping[str, str], main_file: str,
                     python: str) -> tuple[dict, str]:
    """Ship a .py main file compiled when the sandbox runs this interpreter: compiling a large
    script (the assert harness) would otherwise cost every execution ~10 ms of CPU. Only for
    library code: a program is never compiled on the host."""
    files = dict(files)
    if python != sys.executable or not main_file.endswith(".py") or main_file + "c" in files:
        return files, main_file
    files[main_file + "c"] = _pyc_image(files.pop(main_file), main_file)
    return files, main_file + "c"


def _build_spec(files: Mapping[str, str], main_file: str, limits: SandboxLimits,
                isolation: str, workdir: str, token: str, compile_main: bool = False) -> dict:
    python = limits.python_executable or sys.executable
    if compile_main:
        files, main_file = _precompile_main(files, main_file, python)
    argv = [python, "-I", "-B"] + ([] if limits.site_packages else ["-S"]) + [main_file]
    hide = []
    home = os.path.expanduser("~")
    if limits.hide_home and home not in ("", "/") and os.path.isdir(home):
        hide.append(os.path.realpath(home))
    return {
        "isolation": isolation,
        "workdir": workdir,
        "files": dict(files),
        "argv": argv,
        "env": _program_env(workdir, token if isolation != "namespaces" else ""),
        "rlimits": _rlimits(limits),
        "sandbox_uid": limits.sandbox_uid,
        "sandbox_gid": limits.sandbox_uid,
        "hide_paths": hide,
        "keep_paths": _python_paths(python),
        "workdir_bytes": limits.workdir_mb << 20,
        "wall_limit_s": limits.timeout_s + limits.setup_timeout_s + 5.0,
    }


def _memfd_with(data: bytes, name: str) -> int:
    fd = os.memfd_create(name, 0)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


# ----------------------------------------------------------------------------------------------
# Running.

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


def run_python(files: Mapping[str, str], main_file: str, *, limits: SandboxLimits,
               stdin: bytes = b"", result_channel: bool = False,
               compile_main: bool = False) -> ExecutionResult:
    """Run `python main_file` in a fresh sandbox whose working directory holds `files`.

    With `result_channel`, descriptor 3 of the program is a pipe whose bytes are returned in
    `ExecutionResult.result_channel` (used by the test harness to prove it ran to the end).
    `compile_main`: main_file is library code (a harness, never a program); it is compiled here
    once and shipped as bytecode when the sandbox runs this interpreter.
    """
    limits = resolve_isolation(limits.validate())
    isolation = limits.isolation
    token = os.urandom(16).hex()
    host_workdir = None
    if isolation == "namespaces":
        workdir = NAMESPACE_WORKDIR
    else:
        host_workdir = workdir = tempfile.mkdtemp(prefix="g2rpo_sandbox_")
    spec = _build_spec(files, main_file, limits, isolation, workdir, token, compile_main)
    spec_fd = _memfd_with(marshal.dumps(spec), "sandbox-spec")
    stdin_fd = _memfd_with(stdin, "sandbox-stdin")
    status_r, status_w = os.pipe()
    result_r, result_w = os.pipe() if result_channel else (-1, -1)
    pass_fds = [spec_fd, status_w] + ([result_w] if result_channel else [])
    launched_at = time.monotonic()
    proc = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", LAUNCHER_PATH, str(spec_fd), str(status_w),
             str(result_w)],
            stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds,
            env={}, cwd="/", start_new_session=True)
    except OSError as e:
        for fd in (spec_fd, stdin_fd, status_r, status_w, result_r, result_w):
            if fd >= 0:
                os.close(fd)
        if host_workdir:
            shutil.rmtree(host_workdir, ignore_errors=True)
        return ExecutionResult("sandbox_error", None, b"", b"", b"", 0.0, f"launch failed: {e}")
    for fd in (spec_fd, stdin_fd, status_w, result_w):
        if fd >= 0:
            os.close(fd)
    collector = _Collector(proc, status_r, result_r, limits)
    try:
        outcome = collector.run(launched_at)
    finally:
        _kill_tree(proc)
        collector.wait_for_namespace_teardown()
        if isolation != "namespaces":
            # Until no marked process is left: killed ones still show up while they exit, and a
            # forking daemon may need a few passes.
            deadline = time.monotonic() + 10.0
            while _kill_processes_with_token(token) and time.monotonic() < deadline:
                time.sleep(0.01)
        collector.close()
        proc.stdout.close()
        proc.stderr.close()
        os.close(status_r)
        if result_r >= 0:
            os.close(result_r)
        if host_workdir:
            shutil.rmtree(host_workdir, ignore_errors=True)
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


# ----------------------------------------------------------------------------------------------
# Detecting and reporting the protections.

_PROBE_PROGRAM = r'''
import json, os, resource, socket
facts = {"uid": os.getuid(), "pid": os.getpid()}
with open("/proc/self/status") as f:
    status = dict(line.split(":", 1) for line in f if ":" in line)
facts["capabilities_effective"] = status["CapEff"].strip()
facts["capabilities_bounding"] = status["CapBnd"].strip()
facts["no_new_privs"] = status.get("NoNewPrivs", "0").strip() == "1"
facts["network_interfaces"] = sorted(name for _, name in socket.if_nameindex())
facts["visible_processes"] = sum(entry.isdigit() for entry in os.listdir("/proc"))
writable = []
with open("/proc/self/mountinfo") as f:
    for line in f:
        fields = line.split()
        if "rw" in fields[5].split(","):
            writable.append(fields[4])
facts["writable_mounts"] = writable
facts["cwd"] = os.getcwd()
facts["env"] = sorted(os.environ)
names = ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_NOFILE"]
facts["rlimits"] = {n: resource.getrlimit(getattr(resource, n))[0] for n in names}
print(json.dumps(facts))
'''

_resolved_lock = threading.Lock()
_resolved_isolation: dict[tuple, str] = {}
_reports: dict[tuple, dict] = {}


def _probe(limits: SandboxLimits, isolation: str) -> tuple[ExecutionResult, dict | None]:
    probe_limits = dataclasses.replace(limits, isolation=isolation, timeout_s=max(limits.timeout_s,
                                                                                 10.0))
    result = run_python({"probe.py": _PROBE_PROGRAM}, "probe.py", limits=probe_limits)
    if not result.clean_exit:
        return result, None
    try:
        return result, json.loads(result.stdout)
    except ValueError:
        return result, None


def _describe(isolation: str, result: ExecutionResult, facts: dict, limits: SandboxLimits) -> dict:
    notes = result.notes.split()
    namespaced = isolation == "namespaces"
    host_root = os.geteuid() == 0
    report = {
        "isolation": isolation,
        "user_namespace": namespaced,
        "program_uid": facts["uid"] if not namespaced else (
            f"{limits.sandbox_uid} (distinct unprivileged user)" if host_root
            else "host user, as root of its own user namespace"),
        "capabilities": "none" if int(facts["capabilities_effective"], 16) == 0 else
                        facts["capabilities_effective"],
        "no_new_privs": facts["no_new_privs"],
        "network": ("isolated: own network namespace, interfaces " +
                    ",".join(facts["network_interfaces"]) + " (down)")
                   if namespaced and facts["network_interfaces"] == ["lo"] else "host network",
        "pid_namespace": namespaced and facts["pid"] == 2,
        "visible_processes": facts["visible_processes"],
        "writable_mounts": facts["writable_mounts"],
        "filesystem": ("read-only except the private working directory tmpfs and /dev/shm"
                       if namespaced and "root:read-only" in notes
                       else "host file system writable with the host user's permissions"),
        "hidden_paths": [n.split(":", 1)[1] for n in notes if n.startswith("hidden:")],
        "nested_user_namespaces": "blocked" if "nested_userns:blocked" in notes else "allowed",
        "environment": facts["env"],
        "rlimits": facts["rlimits"],
        "kill_whole_tree": ("PID namespace teardown + process group SIGKILL" if namespaced
                            else "process group SIGKILL + subreaper + token scan"),
        "wall_clock_timeout": "enforced by the host (SIGKILL)",
        "output_cap_bytes": limits.max_output_bytes,
    }
    return report


def resolve_isolation(limits: SandboxLimits) -> SandboxLimits:
    """Turn isolation="auto" into the strongest mode that works here (probed once per process)."""
    if limits.isolation != "auto":
        return limits
    key = (limits.python_executable, limits.site_packages, limits.sandbox_uid, limits.hide_home)
    with _resolved_lock:
        if key not in _resolved_isolation:
            chosen = "rlimits"
            result, facts = _probe(limits, "namespaces")
            if facts is not None:
                chosen = "namespaces"
                _reports[key + (chosen,)] = _describe(chosen, result, facts, limits)
            else:
                logger.warning("sandbox: Linux namespaces unavailable (%s %s); falling back to "
                               "rlimits only: no network or file-system isolation",
                               result.status, (result.error or result.stderr[-300:]))
            _resolved_isolation[key] = chosen
    return dataclasses.replace(limits, isolation=_resolved_isolation[key])


_logged_keys: set[tuple] = set()


def log_protections_once(limits: SandboxLimits) -> None:
    """Log the active protections the first time code is scored with these limits."""
    key = (limits.isolation, limits.python_executable, limits.site_packages, limits.sandbox_uid,
           limits.hide_home)
    with _resolved_lock:
        if key in _logged_keys:
            return
        _logged_keys.add(key)
    sandbox_protections(limits, log=True)


def sandbox_protections(limits: SandboxLimits | None = None, *, log: bool = True) -> dict:
    """The protections active for `limits`, observed from inside a probe execution."""
    limits = (limits or SandboxLimits()).validate()
    resolved = resolve_isolation(limits)
    key = (limits.python_executable, limits.site_packages, limits.sandbox_uid, limits.hide_home,
           resolved.isolation)
    with _resolved_lock:
        report = _reports.get(key)
    if report is None:
        result, facts = _probe(resolved, resolved.isolation)
        if facts is None:
            raise RuntimeError(f"the sandbox cannot run programs ({result.status}): "
                               f"{result.error or result.stderr[-500:]!r}")
        report = _describe(resolved.isolation, result, facts, resolved)
        with _resolved_lock:
            _reports[key] = report
    if log:
        logger.info("sandbox protections: %s", json.dumps(report, sort_keys=True))
    return report

"""Hostile programs: each must score 0 and leave the host unchanged.

Targets are owned by the tests: temporary files they create, a server socket they open on a free
127.0.0.1 port, an environment variable they set, processes recognisable by a unique token in
their command line. Protections that only Linux namespaces provide (network, read-only file
system, hidden host processes) are checked when the host offers namespaces and skipped with the
reason otherwise; the rest also runs in the rlimits-only fallback.
"""

import os
import socket
import tempfile
import textwrap
import time

import pytest

from g2rpo_jax import rewards
from g2rpo_jax.rewards.sandbox import STDERR_KEEP_BYTES, SandboxLimits, resolve_isolation, run_python
from tests.process_probe import processes_with

TIMEOUT_S = 1.5
LIMITS = SandboxLimits(timeout_s=TIMEOUT_S)
ACTIVE = resolve_isolation(LIMITS).isolation
needs_namespaces = pytest.mark.skipif(
    ACTIVE != "namespaces", reason=f"host offers no Linux namespaces (isolation={ACTIVE!r})")
# The fallback is exercised too, except as root: root ignores RLIMIT_NPROC and may write anywhere.
MODES = ["namespaces", "rlimits"] if ACTIVE == "namespaces" else ["rlimits"]

PASSING_TESTS = {"kind": "assert", "test": "assert True\n", "entry_point": ""}
ADD_TESTS = {"kind": "assert", "entry_point": "add",
             "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}


def score(program: str, tests=PASSING_TESTS, isolation: str = ACTIVE, **limit_overrides):
    limits = SandboxLimits(timeout_s=TIMEOUT_S, isolation=isolation, **limit_overrides)
    completion = "```python\n" + textwrap.dedent(program) + "\n```"
    return rewards.code_outcome(completion, tests, limits)


def unique_token() -> str:
    """A sleep duration nobody else uses, recognisable in /proc/*/cmdline."""
    return f"{1000 + time.time_ns() % 10**9 / 1e9 + os.getpid() % 1000:.9f}"


# --------------------------------------------------------------------------------------------
# Leaving early or faking success.

EARLY_EXITS = {
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "exit()": "exit()",
    "quit()": "quit()",
    "os._exit(0)": "import os\nos._exit(0)",
    "raise SystemExit": "raise SystemExit",
    "SIGKILL itself": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "exit inside the entry point": "import sys\ndef add(a, b):\n    sys.exit(0)",
    "atexit + exit": "import atexit, os\natexit.register(lambda: print('OK'))\nos._exit(0)",
}


@pytest.mark.parametrize("isolation", MODES)
@pytest.mark.parametrize("name", list(EARLY_EXITS))
def test_early_exit_scores_zero(name, isolation):
    outcome = score(EARLY_EXITS[name], ADD_TESTS, isolation)
    assert outcome.value == 0.0 and outcome.sandbox_errors == 0


@pytest.mark.parametrize("isolation", MODES)
def test_fake_success_output_scores_zero(isolation):
    program = """
        print("All tests passed!\\nOK\\n.....\\n----\\nRan 5 tests in 0.001s\\n\\nOK")
        import sys
        sys.stdout.flush()
        import os
        os._exit(0)
    """
    assert score(program, ADD_TESTS, isolation).value == 0.0


def test_forged_completion_token_scores_zero():
    program = """
        import os
        os.write(3, os.urandom(16).hex().encode())
        os._exit(0)
    """
    assert score(program, ADD_TESTS).value == 0.0


# --------------------------------------------------------------------------------------------
# Passing the tests without solving the task: the program and the tests share a process.

# HumanEval style (an entry point) and MBPP style (asserts naming the function); the honest
# program below passes both.
ENTRY_POINT_TESTS = {"kind": "assert", "entry_point": "add",
                     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"
                             "    assert abs(candidate(1, 1) - 2) < 1e-9\n    assert str(candidate(0, 1)) == '1'\n"}
NAMED_FUNCTION_TESTS = {"kind": "assert", "entry_point": "",
                        "test": "import math\nassert add(2, 3) == 5\nassert set([add(1, 1)]) == set([2])\n"
                                "assert math.isclose(add(0.5, 0.25), 0.75)\n"}
ALWAYS_EQUAL = "class Anything:\n    def __eq__(self, other):\n        return True\n"
GAMING_PROGRAMS = {
    "rebinding exec skips the tests": "import builtins\nbuiltins.exec = lambda *args: None\ndef add(a, b):\n    return 0",
    "rebinding compile": "import builtins\nbuiltins.compile = lambda *args: compile('', 'x', 'exec')\n"
                         "def add(a, b):\n    return 0",
    "an object equal to everything": ALWAYS_EQUAL + "    def __sub__(self, other):\n        return 0\n"
                                     "    def __str__(self):\n        return '1'\n    def __hash__(self):\n        return 0\n"
                                     "def add(a, b):\n    return Anything()",
    "inside a list": ALWAYS_EQUAL + "def add(a, b):\n    return [Anything()]",
    "an int subclass": "class Int(int):\n    def __eq__(self, other):\n        return True\n"
                       "def add(a, b):\n    return Int(0)",
    "a str subclass borrowing __ne__ as __eq__": "class Str(str):\n    __eq__ = str.__ne__\n    __hash__ = str.__hash__\n"
                                                 "def add(a, b):\n    return Str('x')",
    "yielded from a generator": ALWAYS_EQUAL + "def add(a, b):\n    yield Anything()",
    "rebinding builtins the tests use": "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.set = lambda x: 0\n"
                                        "builtins.str = lambda x: '1'\ndef add(a, b):\n    return 0",
    "shadowing builtins": "def abs(x):\n    return 0\ndef set(x):\n    return 0\ndef str(x):\n    return '1'\n"
                          "def add(a, b):\n    return 0",
    "patching math on every call": "import math\ndef add(a, b):\n    math.isclose = lambda *args, **kwargs: True\n    return 0",
}


# Without an entry point a function may be named like a builtin (MBPP asks for one called `sum`),
# so shadowing is only ruled out where the tests name their entry point.
GAMING_CASES = [(name, tests) for name in GAMING_PROGRAMS for tests in (ENTRY_POINT_TESTS, NAMED_FUNCTION_TESTS)
                if name != "shadowing builtins" or tests["entry_point"]]


@pytest.mark.parametrize("name, tests", GAMING_CASES,
                         ids=[f"{name}, {'entry point' if t['entry_point'] else 'named function'}" for name, t in GAMING_CASES])
def test_gaming_the_tests_scores_zero(name, tests):
    assert score("def add(a, b):\n    return a + b", tests).value == 1.0
    assert score(GAMING_PROGRAMS[name], tests).value == 0.0


# Tests that only compare with ==, which an object equal to everything passes unless the harness
# decides every comparison itself; each member below scored 1.0 when only plain functions of the
# program's globals had their results checked (or, for the token, when tests and program shared
# a process).
EQUALITY_TESTS = [
    {"kind": "assert", "entry_point": "add",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(1, 1) == 2\n"},
    {"kind": "assert", "entry_point": "", "test": "assert add(2, 3) == 5\nassert add(1, 1) == 2\n"},
]
TOKEN_FROM_FRAMES = """import os, sys
def add(a, b):
    frame = sys._getframe()
    while frame is not None:
        for value in list(frame.f_locals.values()):
            if isinstance(value, (bytes, str)) and len(value) == 32:
                os.write(3, value if isinstance(value, bytes) else value.encode())
                os._exit(0)
        frame = frame.f_back
    return 0
"""
ANY_CALLABLE_PROGRAMS = {
    # Callables other than plain functions of the program's globals, each returning Anything.
    "a callable instance": ALWAYS_EQUAL + "class Adder:\n    def __call__(self, a, b):\n        return Anything()\n"
                           "add = Adder()",
    "a function made by exec in other globals": ALWAYS_EQUAL + "space = {'Anything': Anything}\n"
                                                "exec('def add(a, b):\\n    return Anything()', space)\n"
                                                "add = space['add']",
    "functools.partial": ALWAYS_EQUAL + "import functools\ndef _add(unused, a, b):\n    return Anything()\n"
                         "add = functools.partial(_add, None)",
    "an lru_cache wrapper": ALWAYS_EQUAL + "import functools\n@functools.lru_cache(None)\n"
                            "def add(a, b):\n    return Anything()",
    "a class standing in for the function": ALWAYS_EQUAL + "class add:\n    def __new__(cls, a, b):\n"
                                            "        return Anything()",
    "a bound method": ALWAYS_EQUAL + "class Helper:\n    def add(self, a, b):\n        return Anything()\n"
                      "add = Helper().add",
    # Values whose type is a standard one, or a class, claiming equality.
    "a Fraction subclass": "from fractions import Fraction\nclass F(Fraction):\n    def __eq__(self, other):\n"
                           "        return True\n    __hash__ = Fraction.__hash__\ndef add(a, b):\n    return F(0)",
    "a namedtuple subclass": "from collections import namedtuple\nclass P(namedtuple('P', 'x')):\n"
                             "    def __eq__(self, other):\n        return True\n    __hash__ = tuple.__hash__\n"
                             "def add(a, b):\n    return P(0)",
    "a class whose metaclass says equal": "class Meta(type):\n    def __eq__(cls, other):\n        return True\n"
                                         "    __hash__ = type.__hash__\nclass Anything(metaclass=Meta):\n    pass\n"
                                         "def add(a, b):\n    return Anything",
    # Taking the completion token instead of passing, from the frames of the process.
    "the token from the harness's frames": TOKEN_FROM_FRAMES,
}


@pytest.mark.parametrize("tests", EQUALITY_TESTS, ids=["entry point", "named function"])
@pytest.mark.parametrize("name", list(ANY_CALLABLE_PROGRAMS))
def test_any_callable_or_value_claiming_equality_scores_zero(name, tests):
    assert score("def add(a, b):\n    return a + b", tests).value == 1.0
    assert score(ANY_CALLABLE_PROGRAMS[name], tests).value == 0.0


@pytest.mark.parametrize("program, test", [
    ("import re\ndef starts_with_vowel(s):\n    return re.match('[aeiou]', s)",
     "assert starts_with_vowel('apple')\nassert not starts_with_vowel('pear')"),
    ("from collections import Counter\ndef letters(s):\n    return Counter(s)", "assert letters('aab') == {'a': 2, 'b': 1}"),
    ("from fractions import Fraction\ndef half(x):\n    return Fraction(x, 2)", "assert half(3) == 1.5"),
    ("def squares(n):\n    return (i * i for i in range(n))", "assert list(squares(3)) == [0, 1, 4]"),
    ("class Box:\n    def __init__(self, v):\n        self.v = v\ndef box(v):\n    return Box(v)", "assert box(3).v == 3"),
    ("def sum(a, b):\n    return a + b", "assert sum(2, 3) == 5"),
])
def test_standard_values_and_builtin_named_functions_still_pass(program, test):
    assert score(program, {"kind": "assert", "entry_point": "", "test": test}).value == 1.0


@pytest.mark.parametrize("isolation", MODES)
def test_the_judge_is_out_of_the_programs_reach(isolation):
    """The tests run in the program's parent (the judge), which holds the token. Tracing it,
    reading its memory or opening its descriptors would give the token away; all are refused
    (it is non-dumpable), so this honest-looking program passes only if every attempt fails."""
    program = """
        import ctypes, os
        def add(a, b):
            judge, reached = os.getppid(), []
            for path, mode in ((f"/proc/{judge}/mem", "rb"), (f"/proc/{judge}/fd/3", "wb")):
                try:
                    open(path, mode).close()
                    reached.append(path)
                except PermissionError:
                    pass
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.ptrace(16, judge, 0, 0) == 0:  # PTRACE_ATTACH
                os.waitpid(judge, 0x40000000)  # __WALL
                libc.ptrace(17, judge, 0, 0)  # PTRACE_DETACH
                reached.append("ptrace")
            return a + b if not reached else 0
    """
    assert score(program, ADD_TESTS, isolation).value == 1.0


# The result of a call as the program's process sends it, forged from inside the call: the judge
# accepts only well-formed plain data, ends the run (no token) on anything else, and compares
# what it accepts itself.
FORGED_REPLIES = {
    "a code object": "compile('5', 'forged', 'eval')",
    "a function by name": "('named', 'builtins', 'print')",
    "a module outside the standard library": "('module', 'g2rpo_jax')",
    "a reference to a value the tests never passed": "('ref', 'judge', 7)",
    "an unknown tag": "('anything', 5)",
    "a value nested beyond the limit": "eval('(\"list\", [' * 300 + '1' + '])' * 300)",
    "a standard value with wrong arguments": "('value', 'Fraction', ('tuple', ['5', 1]))",
    "the judge's own os module": "('module', 'os')",
}


@pytest.mark.parametrize("name", list(FORGED_REPLIES))
def test_forged_replies_score_zero(name):
    program = f"""
        import gc, sys
        def add(a, b):
            side = next(o for o in gc.get_objects() if type(o) is sys.modules["__main__"].ProgramSide)
            send = side.pipe.send
            side.pipe.send = lambda reply: send(("ok", ({FORGED_REPLIES[name]}, [])))
            return a + b
    """
    assert score(program, ADD_TESTS).value == 0.0


def test_garbage_on_the_channel_scores_zero():
    program = """
        import gc, os, sys
        side = next(o for o in gc.get_objects() if type(o) is sys.modules["__main__"].ProgramSide)
        def add(a, b):
            os.write(side.pipe.write_fd, (100).to_bytes(8, "little") + b"\xff" * 100)
            return a + b
    """
    assert score(program, ADD_TESTS).value == 0.0


@needs_namespaces
def test_signals_to_the_supervisor_change_nothing():
    """PID 1 of the sandbox is the supervisor; a program signalling it must neither end the
    sandbox early nor turn its own result into a sandbox error. (Namespaces only: elsewhere
    PID 1 is the host's init.) The program's own parent is the assert harness's judge, whose
    parent is the supervisor."""
    program = """
        import os, signal
        with open(f"/proc/{os.getppid()}/stat") as f:
            supervisor = int(f.read().rsplit(")", 1)[1].split()[1])
        for target in {1, supervisor}:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM,
                        signal.SIGUSR1, signal.SIGCHLD, signal.SIGKILL, signal.SIGSTOP):
                try:
                    os.kill(target, sig)
                except OSError:
                    pass
        def add(a, b):
            return a + b
    """
    outcome = score(program, ADD_TESTS)
    assert outcome.value == 1.0 and outcome.sandbox_errors == 0


# --------------------------------------------------------------------------------------------
# Time, memory, output, recursion, processes.

@pytest.mark.parametrize("isolation", MODES)
def test_infinite_loop_ignoring_signals_is_killed(isolation):
    program = """
        import signal
        for s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGXCPU, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        signal.alarm(0)
        while True:
            pass
    """
    started = time.monotonic()
    outcome = score(program, isolation=isolation)
    elapsed = time.monotonic() - started
    assert outcome.value == 0.0 and outcome.timeouts == 1
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 5


@pytest.mark.parametrize("isolation", MODES)
def test_six_gib_allocation_fails(isolation):
    program = """
        block = bytearray(6 * 2**30)
        block[-1] = 1
        assert block[-1] == 1
    """
    outcome = score(program, isolation=isolation)
    assert outcome.value == 0.0 and outcome.timeouts == 0


def test_stdout_flood_is_cut_off():
    program = """
        import sys
        while True:
            sys.stdout.write("x" * 65536)
    """
    started = time.monotonic()
    result = run_python({"main.py": textwrap.dedent(program)}, "main.py", limits=LIMITS)
    assert result.status == "output_limit"
    assert len(result.stdout) <= LIMITS.max_output_bytes + (1 << 16)
    assert time.monotonic() - started < TIMEOUT_S + 5
    assert score(program).value == 0.0


def test_stderr_flood_is_drained_and_discarded():
    """stderr is not judged: a flood neither fails the run early nor fills the host's memory;
    the endless writer below ends at the time limit like any endless loop."""
    program = """
        import sys
        while True:
            sys.stderr.write("x" * 65536)
    """
    started = time.monotonic()
    result = run_python({"main.py": textwrap.dedent(program)}, "main.py", limits=LIMITS)
    assert result.status == "timeout"
    assert len(result.stderr) <= STDERR_KEEP_BYTES
    assert time.monotonic() - started < TIMEOUT_S + 5


def test_deep_recursion_scores_zero():
    program = """
        import sys
        sys.setrecursionlimit(10**9)
        def down(n):
            return down(n + 1) + 1
        down(0)
    """
    assert score(program).value == 0.0


@pytest.mark.parametrize("isolation", MODES)
def test_fork_and_exec_children_do_not_survive(isolation):
    token = unique_token()
    program = f"""
        import os, subprocess, sys
        children = [subprocess.Popen(["/bin/sleep", "{token}"]) for _ in range(3)]
        if os.fork() == 0:
            os.execv("/bin/sleep", ["sleep", "{token}"])
        sys.exit(0)
    """
    assert score(program, isolation=isolation).value == 0.0
    assert processes_with(token) == []


@pytest.mark.parametrize("isolation", MODES)
def test_double_forked_daemon_does_not_survive_or_write(isolation, tmp_path):
    token = unique_token()
    target = tmp_path / "daemon_target.txt"
    target.write_text("original")
    program = f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(0.5)
                try:
                    with open({str(target)!r}, "w") as f:
                        f.write("written by the daemon")
                except OSError:
                    pass
                os.execv("/bin/sleep", ["sleep", "{token}"])
            os._exit(0)
        time.sleep(0.1)
        raise SystemExit(0)
    """
    assert score(program, isolation=isolation).value == 0.0
    assert processes_with(token) == []
    time.sleep(1.0)  # the daemon would have written by now
    assert processes_with(token) == []
    assert target.read_text() == "original"


@pytest.mark.parametrize("isolation", MODES)
def test_children_of_a_killed_program_do_not_survive(isolation):
    token = unique_token()
    program = f"""
        import os, subprocess
        children = [subprocess.Popen(["/bin/sleep", "{token}"]) for _ in range(3)]
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/bin/sleep", ["sleep", "{token}"])
            os._exit(0)
        while True:
            pass
    """
    outcome = score(program, isolation=isolation)
    assert outcome.value == 0.0 and outcome.timeouts == 1
    assert processes_with(token) == []  # at once: the call waits for the tree to be gone


@needs_namespaces
def test_fork_bomb_is_capped_and_cleaned_up():
    token = unique_token()
    program = f"""
        import os, time
        made = 0
        while True:
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                os.execv("/bin/sleep", ["sleep", "{token}"])
            made += 1
        assert made > 1000, made
    """
    outcome = score(program, max_processes=32)
    assert outcome.value == 0.0
    assert processes_with(token) == []


# --------------------------------------------------------------------------------------------
# File system, network, environment (need namespaces for the first two).

@pytest.fixture
def owned_files(tmp_path):
    """Files this test owns: one under pytest's tmp dir, one under /var/tmp (not under /tmp).
    All are world-writable, so that only the sandbox (not file permissions) protects them."""
    directories = [tmp_path]
    var_tmp = None
    if os.path.isdir("/var/tmp") and os.access("/var/tmp", os.W_OK):
        var_tmp = tempfile.mkdtemp(prefix="g2rpo_sandbox_test_", dir="/var/tmp")
        directories.append(var_tmp)
    files = []
    for directory in directories:
        os.chmod(directory, 0o777)
        for name in ("overwrite_me.txt", "delete_me.txt"):
            path = os.path.join(directory, name)
            with open(path, "w") as f:
                f.write(f"owned by the test: {name}")
            os.chmod(path, 0o666)
            files.append(path)
    yield directories, files
    if var_tmp:
        for name in os.listdir(var_tmp):
            os.unlink(os.path.join(var_tmp, name))
        os.rmdir(var_tmp)


def snapshot(directories):
    return {d: sorted((n, open(os.path.join(d, n)).read()) for n in os.listdir(d))
            for d in map(str, directories)}


@needs_namespaces
def test_writing_or_deleting_outside_the_working_directory_fails(owned_files):
    directories, files = owned_files
    before = snapshot(directories)
    program = f"""
        import os
        files = {files!r}
        for path in files:
            if "overwrite" in path:
                with open(path, "w") as f:
                    f.write("pwned")
            else:
                os.unlink(path)
        for directory in {[str(d) for d in directories]!r}:
            with open(os.path.join(directory, "new_file.txt"), "w") as f:
                f.write("pwned")
    """
    assert score(program).value == 0.0
    for path in files:  # one at a time too, so that an early failure cannot hide a later success
        assert score(f"open({path!r}, 'a').write('pwned')").value == 0.0
        assert score(f"import os\nos.unlink({path!r})").value == 0.0
    assert snapshot(directories) == before


@needs_namespaces
def test_only_the_private_working_directory_is_writable():
    report = rewards.sandbox_protections(LIMITS, log=False)
    assert set(report["writable_mounts"]) <= {"/tmp/sandbox", "/dev/shm"}
    program = """
        import os
        with open("scratch.txt", "w") as f:
            f.write("fine")
        assert open("scratch.txt").read() == "fine"
    """
    assert score(program).value == 1.0  # the working directory itself is usable


@needs_namespaces
def test_connecting_to_a_local_server_fails():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        program = f"""
            import socket
            connection = socket.create_connection(("127.0.0.1", {port}), timeout=1)
            connection.sendall(b"exfiltrated")
        """
        assert score(program).value == 0.0
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


@pytest.mark.parametrize("isolation", MODES)
def test_parent_environment_is_not_visible(isolation, monkeypatch):
    secret = f"secret-{unique_token()}"
    monkeypatch.setenv("G2RPO_TEST_PARENT_SECRET", secret)
    program = f"""
        import os
        found = any({secret!r} in value for value in os.environ.values())
        with open("/proc/self/environ", "rb") as f:
            found = found or {secret!r}.encode() in f.read()
        if {isolation!r} == "namespaces":  # other processes are invisible there; check anyway
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{{pid}}/environ", "rb") as f:
                        found = found or {secret!r}.encode() in f.read()
                except OSError:
                    pass
        assert found
    """
    assert score(program, isolation=isolation).value == 0.0


@needs_namespaces
def test_host_processes_and_home_are_hidden():
    program = """
        import os
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        assert len(pids) > 10, pids
    """
    assert score(program).value == 0.0
    report = rewards.sandbox_protections(LIMITS, log=False)
    assert report["pid_namespace"] and report["capabilities"] == "none"
    assert report["network"].startswith("isolated")


def test_protections_report_names_the_active_mode():
    report = rewards.sandbox_protections(LIMITS, log=False)
    assert report["isolation"] == ACTIVE
    assert report["rlimits"]["RLIMIT_AS"] == LIMITS.memory_mb << 20
    assert report["rlimits"]["RLIMIT_NPROC"] == LIMITS.max_processes
    # Nothing of the host environment reaches the program.
    assert "G2RPO_TEST_PARENT_SECRET" not in report["environment"]
    assert set(report["environment"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL",
                                          "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                          "MKL_NUM_THREADS", "G2RPO_SANDBOX_TOKEN"}

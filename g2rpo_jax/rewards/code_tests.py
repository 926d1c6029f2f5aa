"""Code reward: extract a program from a completion and run it against its tests in the sandbox.

Test formats (DESIGN.md):
  {"kind": "assert", "test": str, "entry_point": str}   program, then the test code, then
      `check(<entry_point>)` when an entry point is given (HumanEval); MBPP style asserts work
      with an empty entry point. Reward 1 only if the harness proves every line ran: it writes a
      per-execution token to a private pipe after the last test, so leaving early (sys.exit,
      os._exit, exit(), a crash, a signal) or printing success-looking text earns 0, and the
      program cannot change what the tests compute (see _ASSERT_HARNESS).
  {"kind": "stdio", "cases": [{"input": str, "output": str}, ...]}   each case runs the program
      with the input on stdin; its full stdout must equal the expected output after stripping
      trailing whitespace on every line and trailing blank lines, and the program must exit with
      status 0. Reward = fraction of cases passed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping, Sequence

from g2rpo_jax.rewards.outcome import RewardOutcome
from g2rpo_jax.rewards.sandbox import (ExecutionResult, SandboxLimits, log_protections_once,
                                       resolve_isolation, run_python)

TEST_KINDS = ("assert", "stdio")
EXTRACT_MODES = ("last_block", "whole")
PYTHON_FENCE_TAGS = ("python", "py", "python3", "")

# A fenced block: opening fence at a line start with an optional language tag, body, closing
# fence at a line start. Unclosed blocks (truncated generations) do not match.
_FENCE_RE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)^[ \t]*```", re.M | re.S)

# Shared prelude of both runners. Programs run with `python -I -S` by default (site processing
# dominates start-up time), which leaves out the `exit`/`quit` builtins that `site` adds; they
# are put back so that programs ending with `exit()` behave as under a normal interpreter.
_PRELUDE = r'''import builtins, os, sys

class _Exit:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return "Use %s() to exit" % self.name

    def __call__(self, code=None):
        raise SystemExit(code)

if not hasattr(builtins, "exit"):
    builtins.exit, builtins.quit = _Exit("exit"), _Exit("quit")

def _load(name):
    with open(name, "rb") as f:
        data = f.read()
    os.unlink(name)
    return data.decode("utf-8")

def _fresh_module(name, filename):
    module = type(sys)(name)
    module.__file__ = os.path.abspath(filename)
    module.__builtins__ = builtins
    sys.modules[name] = module
    return module
'''

# The assert harness. It reads and deletes the token and the tests before the program runs, so
# the program can neither read the expected values from disk nor learn the token from a file;
# the token is written to descriptor 3 only after the last test ran.
#
# Tests and program share a process, so the harness keeps what the tests rely on out of the
# program's reach:
# - exec, compile and os.write are bound before the program runs (rebinding them in `builtins`
#   would otherwise skip the tests and still write the token);
# - the tests run in their own namespace with a copy of the original builtins. When they name an
#   entry point (HumanEval), they see none of the program's names that shadow a builtin, so a
#   program defining `set` or `abs` cannot change what they compute. Without one (MBPP), such a
#   name stays visible if it is a function, because the task may ask for a function called `sum`;
# - the attributes of every module loaded before the program (math included) are put back after
#   the program runs and after each call the tests make into it (`math.isclose = ...`);
# - what a program function returns to the tests (and everything inside it) must behave as
#   standard: no class in its type's MRO may define a special method (`__eq__`, `__bool__`,
#   `__str__`, ...) in the program's own code, so an object whose `__eq__` always says True, or an
#   `int` subclass overriding it, fails the call. Standard-library classes (re.Match, Counter,
#   Fraction) and the program's plain classes pass.
# What this does not stop: a program that inspects the harness itself (its frames, or the garbage
# collector's objects) can find the token. Closing that needs the tests in a separate process.
_ASSERT_HARNESS = _PRELUDE + r"""
import math, types

def _run(exec=exec, compile=compile, write=os.write, exit_now=os._exit):
    token = _load("token").encode()
    test_stages = [("tests.py", _load("tests.py"))]
    has_entry_point = os.path.exists("check.py")
    if has_entry_point:
        test_stages.append(("check.py", _load("check.py")))
    program = _load("solution.py")
    pristine_builtins = dict(builtins.__dict__)
    modules = {module: dict(vars(module)) for module in list(sys.modules.values())
               if isinstance(module, types.ModuleType)}
    check_returned = _standard_value_checker()

    def restore_modules():
        for module, attributes in modules.items():
            namespace = vars(module)
            for name in [name for name in namespace if name not in attributes]:
                del namespace[name]
            namespace.update(attributes)

    def checked(function):
        def call(*args, **kwargs):
            try:
                return check_returned(function.__name__, function(*args, **kwargs))
            finally:
                restore_modules()
        return call

    solution = _fresh_module("solution", "solution.py").__dict__
    exec(compile(program, "solution.py", "exec"), solution)
    restore_modules()
    tests = {"__name__": "tests", "__builtins__": dict(pristine_builtins)}
    for name, value in solution.items():
        is_program_function = isinstance(value, types.FunctionType) and value.__globals__ is solution
        if name not in pristine_builtins or (is_program_function and not has_entry_point):
            tests[name] = checked(value) if is_program_function else value
    for filename, source in test_stages:
        exec(compile(source, filename, "exec"), tests)
    sys.stdout.flush()
    sys.stderr.flush()
    write(3, token)
    exit_now(0)

def _standard_value_checker():
    stdlib = os.path.dirname(os.__file__) + os.sep
    constructors = {"__init__", "__new__", "__init_subclass__", "__class_getitem__"}
    trusted = {int, float, complex, bool, str, bytes, type(None), list, tuple, dict, set, frozenset, object}

    def standard_code(cls, name, impl):
        if isinstance(impl, (classmethod, staticmethod)):
            impl = impl.__func__
        if isinstance(impl, types.FunctionType):
            return impl.__code__.co_filename.startswith(stdlib)
        c_level = (types.WrapperDescriptorType, types.MethodDescriptorType, types.BuiltinFunctionType,
                   types.GetSetDescriptorType, types.MemberDescriptorType, types.ClassMethodDescriptorType)
        return (isinstance(impl, c_level) and getattr(impl, "__objclass__", cls) is cls
                and getattr(impl, "__name__", name) == name)

    def check_type(function_name, kind):
        for cls in kind.__mro__:
            for name, impl in vars(cls).items():
                special_method = name.startswith("__") and name.endswith("__") and name not in constructors and (
                    callable(impl) or isinstance(impl, (classmethod, staticmethod)))
                if special_method and not standard_code(cls, name, impl):
                    raise TypeError("%s() returned a %s, whose %s is the program's own code; tests compare "
                                    "only values with standard behaviour" % (function_name, kind.__qualname__, name))
        trusted.add(kind)

    def check(function_name, value, depth=0):
        kind = type(value)
        if kind not in trusted:
            check_type(function_name, kind)
        if depth >= 50:
            return value
        if isinstance(value, dict):
            for key, item in value.items():
                check(function_name, key, depth + 1)
                check(function_name, item, depth + 1)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for item in value:
                check(function_name, item, depth + 1)
        elif hasattr(kind, "__next__"):
            return (check(function_name, item, depth + 1) for item in value)
        return value
    return check

_run()
"""

# The stdio runner: the program runs as the __main__ module, like `python main.py`.
_STDIO_RUNNER = _PRELUDE + r'''
def _run():
    source = _load("main.py")
    sys.argv = ["main.py"]
    namespace = _fresh_module("__main__", "main.py").__dict__
    exec(compile(source, "main.py", "exec"), namespace)

_run()
'''


@dataclasses.dataclass(frozen=True)
class ExecutionJob:
    """One program run and how to judge it. `token` (assert harness) never leaves the host
    except through the file the harness deletes; `expected_output` is for stdio cases."""

    files: Mapping[str, str]
    main_file: str
    stdin: bytes = b""
    token: bytes = b""
    expected_output: str | None = None


@dataclasses.dataclass(frozen=True)
class JobResult:
    passed: bool
    status: str  # ExecutionResult.status
    detail: str = ""


def extract_program(completion: str, mode: str = "last_block") -> str | None:
    """The last fenced python block (or the whole completion); None when there is none.

    Blocks tagged python/py/python3 win; an untagged block is used only when no block is tagged
    (an untagged block after the code is more often sample output than a program)."""
    if mode == "whole":
        return completion if completion.strip() else None
    if mode != "last_block":
        raise ValueError(f"code.extract={mode!r}; valid: {EXTRACT_MODES}")
    blocks = [(tag.lower(), body) for tag, body in _FENCE_RE.findall(completion)]
    tagged = [body for tag, body in blocks if tag in PYTHON_FENCE_TAGS and tag]
    untagged = [body for tag, body in blocks if not tag]
    candidates = tagged or untagged
    if not candidates or not candidates[-1].strip():
        return None
    return candidates[-1]


def normalize_output(text: str) -> str:
    """Strip trailing whitespace on each line and trailing blank lines."""
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def validate_tests(tests: Mapping) -> None:
    kind = tests.get("kind") if isinstance(tests, Mapping) else None
    if kind not in TEST_KINDS:
        raise ValueError(f"tests['kind']={kind!r}; valid: {TEST_KINDS}")
    if kind == "assert":
        if not isinstance(tests.get("test"), str):
            raise ValueError(f"tests['test'] must be a string of test code, got "
                             f"{type(tests.get('test')).__name__}")
        entry_point = tests.get("entry_point") or ""
        if entry_point and not entry_point.isidentifier():
            raise ValueError(f"tests['entry_point']={entry_point!r}; must be a Python "
                             "identifier or empty")
    else:
        cases = tests.get("cases")
        if not isinstance(cases, Sequence) or not cases:
            raise ValueError("tests['cases'] must be a non-empty list of {'input', 'output'}")
        for i, case in enumerate(cases):
            if not (isinstance(case, Mapping) and isinstance(case.get("input"), str)
                    and isinstance(case.get("output"), str)):
                raise ValueError(f"tests['cases'][{i}] must be {{'input': str, 'output': str}}")


def build_jobs(program: str, tests: Mapping) -> list[ExecutionJob]:
    """The executions that score `program` against `tests`."""
    validate_tests(tests)
    if tests["kind"] == "assert":
        token = os.urandom(16).hex()
        files = {"harness.py": _ASSERT_HARNESS, "solution.py": program, "tests.py": tests["test"],
                 "token": token}
        entry_point = tests.get("entry_point") or ""
        if entry_point:
            files["check.py"] = f"check({entry_point})\n"
        return [ExecutionJob(files, "harness.py", token=token.encode())]
    return [ExecutionJob({"runner.py": _STDIO_RUNNER, "main.py": program}, "runner.py",
                         stdin=case["input"].encode("utf-8"), expected_output=case["output"])
            for case in tests["cases"]]


def judge(job: ExecutionJob, result: ExecutionResult) -> JobResult:
    if not result.clean_exit:
        if result.status == "exited":
            detail = f"exit code {result.exit_code}"
        else:
            detail = result.error or result.status
        return JobResult(False, result.status, detail)
    if job.token:
        passed = result.result_channel == job.token
        return JobResult(passed, result.status, "" if passed else "tests did not run to the end")
    actual = normalize_output(result.stdout.decode("utf-8", "replace"))
    passed = actual == normalize_output(job.expected_output or "")
    return JobResult(passed, result.status, "" if passed else "wrong output")


def run_job(job: ExecutionJob, limits: SandboxLimits) -> JobResult:
    result = run_python(job.files, job.main_file, limits=limits, stdin=job.stdin,
                        result_channel=bool(job.token))
    return judge(job, result)


def combine(results: Sequence[JobResult]) -> RewardOutcome:
    """Fraction of passed executions, with the events counted."""
    passed = sum(r.passed for r in results)
    timeouts = sum(r.status == "timeout" for r in results)
    errors = sum(r.status == "sandbox_error" for r in results)
    details = sorted({r.detail for r in results if r.detail})
    return RewardOutcome(value=passed / len(results), timeouts=timeouts, sandbox_errors=errors,
                         executions=len(results), detail="; ".join(details)[:500])


def code_outcome(completion: str, tests: Mapping, limits: SandboxLimits | None = None, *,
                 extract: str = "last_block") -> RewardOutcome:
    """`code_reward` with the events (parse failure, timeouts, sandbox errors) kept."""
    limits = resolve_isolation((limits or SandboxLimits()).validate())
    log_protections_once(limits)
    validate_tests(tests)
    program = extract_program(completion, extract)
    if program is None:
        return RewardOutcome(0.0, parse_failure=True, detail="no python code block")
    return combine([run_job(job, limits) for job in build_jobs(program, tests)])


def code_reward(completion: str, tests: Mapping, timeout_s: float | None = None, *,
                limits: SandboxLimits | None = None, extract: str = "last_block") -> float:
    """Fraction of tests passed by the program in `completion` (see module docstring).

    `timeout_s` is the wall-clock limit of each execution (default: `limits.timeout_s`, 10 s);
    `limits` sets the others (memory, processes, output, isolation, ...).
    """
    limits = limits or SandboxLimits()
    if timeout_s is not None:
        limits = dataclasses.replace(limits, timeout_s=timeout_s)
    return code_outcome(completion, tests, limits, extract=extract).value

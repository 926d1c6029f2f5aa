"""Code reward: extract a program from a completion and run it against its tests in the sandbox.

Test formats (DESIGN.md):
  {"kind": "assert", "test": str, "entry_point": str}   program, then the test code, then
      `check(<entry_point>)` when an entry point is given (HumanEval); MBPP style asserts work
      with an empty entry point. Reward 1 only if the harness proves every line ran: it writes a
      per-execution token to a private pipe after the last test, so leaving early (sys.exit,
      os._exit, exit(), a crash, a signal) or printing success-looking text earns 0. The tests
      run in a process of their own that never executes program code, and every value the
      program hands them crosses as plain data (see the harness package), so the program decides
      nothing but the values it returns.
  {"kind": "stdio", "cases": [{"input": str, "output": str}, ...], "abs_tol": float,
   "rel_tol": float}   each case runs the program with the input on stdin; the program must exit
      with status 0 and its stdout match the expected output (see `outputs_match`): line by line
      after stripping trailing whitespace and trailing blank lines, whitespace within a line
      exactly, and each token exactly or, when both are decimal numbers, by value (1.0 == 1,
      1.50 == 1.5), within the optional tolerances (defaults: the `rewards.code.abs_tol` /
      `rel_tol` settings, 0 = exact). stderr is not judged. Reward = fraction of cases passed.
"""

from __future__ import annotations

import dataclasses
import decimal
import math
import os
import re
from typing import Mapping, Sequence

from g2rpo_jax.rewards import harness
from g2rpo_jax.rewards.outcome import RewardOutcome
from g2rpo_jax.rewards.sandbox import (ExecutionResult, SandboxLimits, log_protections_once,
                                       resolve_isolation, run_python)
from g2rpo_jax.task_format import TEST_KINDS, after_thinking, is_stdio_case

EXTRACT_MODES = ("last_block", "whole")
PYTHON_FENCE_TAGS = ("python", "py", "python3", "")

# A fenced block: opening fence at a line start with an optional language tag, body, closing
# fence at a line start. Unclosed blocks (truncated generations) do not match.
_FENCE_RE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)^[ \t]*```", re.M | re.S)

# A decimal number token of a stdio output: sign, digits with an optional point, exponent. Other
# spellings Decimal accepts (inf, nan, 1_000) stay text and compare exactly.
_NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_WHITESPACE_RE = re.compile(r"(\s+)")
# Arithmetic for tolerances: exponents of any size without overflow errors.
_TOLERANCE_CONTEXT = decimal.Context(prec=60, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)


@dataclasses.dataclass(frozen=True)
class ExecutionJob:
    """One program run and how to judge it. `token` (assert harness) never leaves the host
    except through the file the harness deletes; `expected_output` and the tolerances are for
    stdio cases."""

    files: Mapping[str, str]
    main_file: str
    stdin: bytes = b""
    token: bytes = b""
    expected_output: str | None = None
    abs_tol: float = 0.0
    rel_tol: float = 0.0


@dataclasses.dataclass(frozen=True)
class JobResult:
    passed: bool
    status: str  # ExecutionResult.status
    detail: str = ""


def extract_program(completion: str, mode: str = "last_block") -> str | None:
    """The last fenced python block (or the whole completion); None when there is none.

    Blocks tagged python/py/python3 win; an untagged block is used only when no block is tagged
    (an untagged block after the code is more often sample output than a program). Only the
    text after the reasoning counts: None while a <think> is still open (see `after_thinking`)."""
    completion = after_thinking(completion)
    if completion is None:
        return None
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


def numbers_match(actual: str, expected: str, abs_tol: float = 0.0, rel_tol: float = 0.0) -> bool:
    """Both tokens are decimal numbers and `actual` equals `expected` exactly as decimals
    (1.0 == 1, 1.50 == 1.5, 1e3 == 1000), or lies within abs_tol of it or within rel_tol times
    its magnitude. Decimals, not floats: 0.30000000000000004 != 0.3 unless a tolerance says so."""
    if not (_NUMBER_RE.fullmatch(actual) and _NUMBER_RE.fullmatch(expected)):
        return False
    context = _TOLERANCE_CONTEXT
    try:
        actual_value, expected_value = decimal.Decimal(actual), decimal.Decimal(expected)
        if actual_value == expected_value:
            return True
        difference = context.abs(context.subtract(actual_value, expected_value))
        return (difference <= decimal.Decimal(repr(abs_tol))
                or difference <= context.multiply(decimal.Decimal(repr(rel_tol)),
                                                  context.abs(expected_value)))
    except decimal.DecimalException:  # an exponent beyond what decimal represents
        return False


def lines_match(actual: str, expected: str, abs_tol: float = 0.0, rel_tol: float = 0.0) -> bool:
    """Same whitespace between tokens, and each token equal or a matching number."""
    if actual == expected:
        return True
    # Splitting on a captured group: tokens at even positions, whitespace runs at odd ones.
    actual_parts, expected_parts = _WHITESPACE_RE.split(actual), _WHITESPACE_RE.split(expected)
    return len(actual_parts) == len(expected_parts) and all(
        a == e or (i % 2 == 0 and numbers_match(a, e, abs_tol, rel_tol))
        for i, (a, e) in enumerate(zip(actual_parts, expected_parts)))


def outputs_match(actual: str, expected: str, abs_tol: float = 0.0, rel_tol: float = 0.0) -> bool:
    """A stdio program's output against the expected one (see the module docstring)."""
    actual_lines = normalize_output(actual).split("\n")
    expected_lines = normalize_output(expected).split("\n")
    return len(actual_lines) == len(expected_lines) and all(
        lines_match(a, e, abs_tol, rel_tol) for a, e in zip(actual_lines, expected_lines))


def validate_tolerance(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value!r}; must be a finite number >= 0")
    return float(value)


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
            if not is_stdio_case(case):
                raise ValueError(f"tests['cases'][{i}] must be {{'input': str, 'output': str}}")
        for key in ("abs_tol", "rel_tol"):
            if key in tests:
                validate_tolerance(f"tests[{key!r}]", tests[key])


def build_jobs(program: str, tests: Mapping, *, abs_tol: float = 0.0,
               rel_tol: float = 0.0) -> list[ExecutionJob]:
    """The executions that score `program` against `tests`. `abs_tol` / `rel_tol`: numeric
    tolerances of stdio outputs for tasks whose tests give none."""
    validate_tests(tests)
    if tests["kind"] == "assert":
        token = os.urandom(16).hex()
        files = {"harness.py": harness.script("assert_main"), "solution.py": program,
                 "tests.py": tests["test"], "token": token}
        entry_point = tests.get("entry_point") or ""
        if entry_point:
            files["check.py"] = f"check({entry_point})\n"
        return [ExecutionJob(files, "harness.py", token=token.encode())]
    abs_tol = validate_tolerance("abs_tol", tests.get("abs_tol", abs_tol))
    rel_tol = validate_tolerance("rel_tol", tests.get("rel_tol", rel_tol))
    runner = harness.script("stdio_main")
    return [ExecutionJob({"runner.py": runner, "main.py": program}, "runner.py",
                         stdin=case["input"].encode("utf-8"), expected_output=case["output"],
                         abs_tol=abs_tol, rel_tol=rel_tol)
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
    passed = outputs_match(result.stdout.decode("utf-8", "replace"), job.expected_output or "",
                           job.abs_tol, job.rel_tol)
    return JobResult(passed, result.status, "" if passed else "wrong output")


def run_job(job: ExecutionJob, limits: SandboxLimits) -> JobResult:
    result = run_python(job.files, job.main_file, limits=limits, stdin=job.stdin,
                        result_channel=bool(job.token), compile_main=True)
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
                 extract: str = "last_block", abs_tol: float = 0.0,
                 rel_tol: float = 0.0) -> RewardOutcome:
    """`code_reward` with the events (parse failure, timeouts, sandbox errors) kept."""
    limits = resolve_isolation((limits or SandboxLimits()).validate())
    log_protections_once(limits)
    validate_tests(tests)
    program = extract_program(completion, extract)
    if program is None:
        return RewardOutcome(0.0, parse_failure=True, detail="no python code block")
    jobs = build_jobs(program, tests, abs_tol=abs_tol, rel_tol=rel_tol)
    return combine([run_job(job, limits) for job in jobs])


def code_reward(completion: str, tests: Mapping, timeout_s: float | None = None, *,
                limits: SandboxLimits | None = None, extract: str = "last_block",
                abs_tol: float = 0.0, rel_tol: float = 0.0) -> float:
    """Fraction of tests passed by the program in `completion` (see module docstring).

    `timeout_s` is the wall-clock limit of each execution (default: `limits.timeout_s`, 10 s);
    `limits` sets the others (memory, processes, output, isolation, ...); `abs_tol` / `rel_tol`
    are the numeric tolerances of stdio outputs for tests that give none.
    """
    limits = limits or SandboxLimits()
    if timeout_s is not None:
        limits = dataclasses.replace(limits, timeout_s=timeout_s)
    return code_outcome(completion, tests, limits, extract=extract, abs_tol=abs_tol,
                        rel_tol=rel_tol).value

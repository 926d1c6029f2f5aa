"""Code reward: program extraction, the assert harness, stdio judging (against a plain-Python
reference), batch scoring with and without the process pool, and the pool's hard limits."""

import os
import time

import numpy as np
import pytest

from g2rpo_jax import rewards
from g2rpo_jax.rewards import code_tests
from g2rpo_jax.rewards.code_tests import build_jobs, extract_program, normalize_output
from g2rpo_jax.rewards.pool import RewardPool, TaskFailure
from tests.reference.rewards_reference import ref_normalize_output, ref_weighted_sum
from tests.process_probe import processes_with

LIMITS = rewards.SandboxLimits(timeout_s=3.0)


def fenced(code: str, tag: str = "python") -> str:
    return f"Here is my solution.\n```{tag}\n{code}\n```\nDone."


# --------------------------------------------------------------------------------------------
# Extraction and normalisation.

def test_extracts_the_last_python_block():
    completion = ("```python\nx = 1\n```\nthinking...\n```bash\nls\n```\n```py\ny = 2\n```\n"
                  "Sample output:\n```\n3\n```\ntext")
    assert extract_program(completion) == "y = 2\n"  # tagged blocks win over untagged ones
    assert extract_program("```\nz = 3\n```\n```text\nhi\n```") == "z = 3\n"  # no tagged block
    assert extract_program("```Python3\nq = 1\n```") == "q = 1\n"
    assert extract_program("```python\nx = 1\n```\n```python\nunfinished") == "x = 1\n"
    assert extract_program("no code at all") is None
    assert extract_program("```python\n\n```") is None
    assert extract_program("print(1)", mode="whole") == "print(1)"
    with pytest.raises(ValueError, match="code.extract"):
        extract_program("x", mode="first")


def test_output_normalisation_matches_reference():
    rng = np.random.default_rng(0)
    alphabet = list("ab \t\r\n") + ["\n\n", "  \n"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 30))))
        assert normalize_output(text) == ref_normalize_output(text), repr(text)


@pytest.mark.parametrize("tests,message", [
    ({"kind": "unit"}, "tests\\['kind'\\]"),
    ({"kind": "assert"}, "tests\\['test'\\]"),
    ({"kind": "assert", "test": "", "entry_point": "not valid"}, "entry_point"),
    ({"kind": "stdio", "cases": []}, "tests\\['cases'\\]"),
    ({"kind": "stdio", "cases": [{"input": "1"}]}, "tests\\['cases'\\]\\[0\\]"),
])
def test_malformed_tests_raise_naming_the_field(tests, message):
    with pytest.raises(ValueError, match=message):
        rewards.code_reward(fenced("pass"), tests)


# --------------------------------------------------------------------------------------------
# assert tests.

HUMANEVAL_STYLE = {
    "kind": "assert",
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
}


def test_assert_tests_pass_and_fail():
    assert rewards.code_reward(fenced("def add(a, b):\n    return a + b"), HUMANEVAL_STYLE) == 1.0
    assert rewards.code_reward(fenced("def add(a, b):\n    return a - b"), HUMANEVAL_STYLE) == 0.0
    assert rewards.code_reward(fenced("def add(a, b):\n    return a +"), HUMANEVAL_STYLE) == 0.0
    mbpp_style = {"kind": "assert", "entry_point": "",
                  "test": "assert square(3) == 9\nassert square(-2) == 4"}
    assert rewards.code_reward(fenced("def square(x):\n    return x * x"), mbpp_style) == 1.0
    assert rewards.code_reward(fenced("def square(x):\n    return 9"), mbpp_style) == 0.0


def test_main_guard_of_the_program_does_not_run_and_exit_is_defined():
    program = ("def add(a, b):\n    return a + b\n\nif __name__ == '__main__':\n"
               "    print(add(int(input()), 1))\n")
    assert rewards.code_reward(fenced(program), HUMANEVAL_STYLE) == 1.0


def test_redefining_check_does_not_skip_the_tests():
    program = "def check(candidate):\n    pass\n\ndef add(a, b):\n    return 0\n"
    assert rewards.code_reward(fenced(program), HUMANEVAL_STYLE) == 0.0


def test_timeout_argument_bounds_each_execution():
    started = time.monotonic()
    assert rewards.code_reward(fenced("while True:\n    pass"), HUMANEVAL_STYLE, timeout_s=0.5) == 0.0
    assert time.monotonic() - started < 0.5 + 4


def test_missing_code_block_is_a_parse_failure():
    outcome = rewards.code_outcome("I would write a function that adds.", HUMANEVAL_STYLE)
    assert outcome.value == 0.0 and outcome.parse_failure and outcome.executions == 0


# --------------------------------------------------------------------------------------------
# stdio tests, against a plain-Python reference of the same program.

def doubled_lines(stdin: str) -> str:
    """Reference for DOUBLING_PROGRAM: each input integer doubled, one per line."""
    return "".join(f"{2 * int(token)}\n" for token in stdin.split())


DOUBLING_PROGRAM = "import sys\nfor token in sys.stdin.read().split():\n    print(2 * int(token))\n"


def test_stdio_fraction_matches_reference():
    cases = [
        {"input": "1 2 3", "output": "2\n4\n6\n"},
        {"input": "5", "output": "10   \n\n\n"},      # trailing spaces and blank lines ignored
        {"input": "7", "output": "15\n"},              # wrong expectation: fails
        {"input": "1 2", "output": "2\n"},             # program prints more lines: fails
        {"input": "1", "output": "2\n4\n"},            # program prints fewer lines: fails
        {"input": "4", "output": "  8"},               # leading spaces matter: fails
    ]
    expected = sum(ref_normalize_output(doubled_lines(c["input"])) == ref_normalize_output(c["output"])
                   for c in cases) / len(cases)
    outcome = rewards.code_outcome(fenced(DOUBLING_PROGRAM), {"kind": "stdio", "cases": cases}, LIMITS)
    assert outcome.value == pytest.approx(expected)
    assert outcome.executions == len(cases) and outcome.timeouts == 0


def test_stdio_crash_after_correct_output_fails_but_clean_exit_passes():
    cases = [{"input": "3", "output": "6"}]
    crash = DOUBLING_PROGRAM + "raise RuntimeError('late crash')\n"
    assert rewards.code_reward(fenced(crash), {"kind": "stdio", "cases": cases}) == 0.0
    exits = DOUBLING_PROGRAM + "import sys\nsys.exit(0)\n"
    assert rewards.code_reward(fenced(exits), {"kind": "stdio", "cases": cases}) == 1.0
    exits_builtin = DOUBLING_PROGRAM + "exit()\n"
    assert rewards.code_reward(fenced(exits_builtin), {"kind": "stdio", "cases": cases}) == 1.0


def test_stdio_program_runs_as_main():
    program = ("def main():\n    print(int(input()) + 1)\n\nif __name__ == '__main__':\n    main()\n")
    assert rewards.code_reward(fenced(program), {"kind": "stdio", "cases": [
        {"input": "41\n", "output": "42\n"}]}) == 1.0


def test_the_program_cannot_read_the_tests_or_the_token():
    program = ("import os\nleft = sorted(os.listdir('.'))\nprint(left)\n"
               "def add(a, b):\n    return open('tests.py').read() and a + b\n")
    assert rewards.code_reward(fenced(program), HUMANEVAL_STYLE) == 0.0
    job = build_jobs("pass", HUMANEVAL_STYLE)[0]
    assert job.token and job.token.decode() in job.files["token"]


# --------------------------------------------------------------------------------------------
# Batch scoring with the pool.

def batch():
    completions = [
        fenced("def add(a, b):\n    return a + b"),
        fenced("def add(a, b):\n    return a * b"),
        "no code",
        fenced(DOUBLING_PROGRAM),
        fenced("while True:\n    pass"),
        "<think>x</think>\\boxed{12}",
    ]
    stdio = {"kind": "stdio", "cases": [{"input": "1", "output": "2"}, {"input": "2", "output": "5"}]}
    examples = [{"tests": HUMANEVAL_STYLE}, {"tests": HUMANEVAL_STYLE}, {"tests": HUMANEVAL_STYLE},
                {"tests": stdio}, {"tests": stdio}, {"answer": "12"}]
    return completions, examples


def test_score_batch_with_and_without_pool_agree_and_match_reference():
    completions, examples = batch()
    settings = rewards.RewardSettings(code_limits=rewards.SandboxLimits(timeout_s=1.0))
    weights = {"accuracy": 2.0, "format": 0.5}
    with RewardPool(2) as pool:
        pooled = rewards.score_batch(completions, examples, weights, pool, settings=settings)
    inline = rewards.score_batch(completions, examples, weights, None, settings=settings)
    for total, per_kind, stats in (pooled, inline):
        np.testing.assert_array_equal(per_kind["accuracy"], [1.0, 0.0, 0.0, 0.5, 0.0, 1.0])
        np.testing.assert_array_equal(per_kind["format"], [1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
        np.testing.assert_allclose(total, ref_weighted_sum(per_kind, weights, len(completions)))
        # 2 assert runs + 2 stdio cases + 2 timed-out stdio cases; "no code" is a parse failure.
        assert stats == {"parse_failures": 1, "timeouts": 2, "sandbox_errors": 0, "executions": 6}


def test_score_batch_accepts_example_records():
    class Record:  # like g2rpo_jax.data.Example: attributes, the unused one None
        def __init__(self, answer=None, tests=None):
            self.answer, self.tests = answer, tests

    _, per_kind, _ = rewards.score_batch(
        [fenced("def add(a, b):\n    return a + b"), "\\boxed{3}"],
        [Record(tests=HUMANEVAL_STYLE), Record(answer="3")])
    np.testing.assert_array_equal(per_kind["accuracy"], [1.0, 1.0])


def test_pool_kills_an_overrunning_task_with_its_sandbox_and_recovers():
    token = f"{time.time_ns() % 10**9 + 10**9}.25"
    stuck = code_tests.ExecutionJob({"main.py": f"import os\nos.execv('/bin/sleep', ['sleep', '{token}'])"},
                                    "main.py")
    limits = rewards.SandboxLimits(timeout_s=60.0)
    with RewardPool(1) as pool:
        started = time.monotonic()
        [failure] = pool.run([("job", (stuck, limits), 1.0)])
        assert isinstance(failure, TaskFailure) and failure.reason == "timeout"
        assert time.monotonic() - started < 10
        deadline = time.monotonic() + 5  # parent-death signals are delivered asynchronously
        while processes_with(token) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with(token) == []
        [outcome] = pool.score_math([("\\boxed{2}", "2")], rewards.MathSettings())
        assert outcome.value == 1.0


def test_pool_is_usable_from_threads_one_run_at_a_time():
    import threading

    results = []
    with RewardPool(2) as pool:
        def work(i):
            results.append(pool.score_math([(f"\\boxed{{{i}}}", str(i))] * 3, rewards.MathSettings()))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert sorted(o.value for group in results for o in group) == [1.0] * 9

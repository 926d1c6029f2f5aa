"""Code reward: program extraction, the assert harness (values crossing between its two
processes, honest programs whatever they return), stdio judging (against a plain-Python
reference; numbers compared as decimals, tolerances, stderr ignored), batch scoring with and
without the process pool, and the pool's hard limits. Hostile programs: test_rewards_sandbox.py."""

import collections
import datetime
import decimal
import enum
import fractions
import marshal
import os
import sys
import time

import numpy as np
import pytest

from g2rpo_jax import rewards
from g2rpo_jax.rewards import _assert_harness, code_tests
from g2rpo_jax.rewards.code_tests import build_jobs, extract_program, normalize_output, outputs_match
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
# The assert harness's values: what crosses between the program's process and the tests'.

class LoopbackCodec(_assert_harness.Codec):
    """Both ends in one process: references resolve to the very objects."""

    def __init__(self):
        self.objects = []

    def encode_own(self, value):
        return None

    def reference(self, value):
        self.objects.append(value)
        return ("ref", "program", len(self.objects) - 1)

    def resolve_reference(self, owner, index):
        return self.objects[index]


def across(value):
    """`value` sent through the wire format (marshal included) and rebuilt."""
    codec = LoopbackCodec()
    return codec.decode(marshal.loads(marshal.dumps(codec.encode(value))))


class Color(enum.IntEnum):
    RED = 1


class Money(int):
    pass


Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize("value, rebuilt", [
    ([1, (2.5, "a", b"b"), {3: None, "k": {True, 4j}}, frozenset({...})],) * 2,
    (fractions.Fraction(3, 4),) * 2,
    (decimal.Decimal("1.50"),) * 2,
    (collections.Counter("aab"),) * 2,
    (collections.OrderedDict([("b", 1), ("a", 2)]),) * 2,
    (collections.defaultdict(int, {"a": 1}),) * 2,
    (collections.deque([1, 2], maxlen=5),) * 2,
    (bytearray(b"xy"),) * 2,
    (range(1, 10, 3),) * 2,
    ({"a": 1}.keys(),) * 2,
    ({"a": 1}.items(),) * 2,
    (datetime.date(2024, 2, 29),) * 2,
    (datetime.datetime(2024, 2, 29, 12, 30),) * 2,
    (datetime.timedelta(days=1, seconds=3),) * 2,
    (Money(5), 5),  # subclasses of builtins cross as their base value
    (Color.RED, 1),
    (int, int),  # standard classes by name
    (os, os),
])
def test_values_cross_as_plain_data_of_the_same_kind(value, rebuilt):
    result = across(value)
    assert result == rebuilt and type(result) is type(rebuilt)
    if isinstance(value, collections.deque):
        assert result.maxlen == value.maxlen
    if isinstance(value, collections.defaultdict):
        assert result.default_factory is int


def test_namedtuples_cross_as_a_namedtuple_of_the_receiver():
    result = across(Point(1, 2))
    assert result == (1, 2) and result.y == 2
    assert type(result).__name__ == "Point" and type(result)._fields == ("x", "y")
    assert type(across(Point(3, 4))) is type(result)  # one class per name and fields


def test_other_objects_cross_as_references():
    class Box:
        pass

    box = Box()
    codec = LoopbackCodec()
    assert codec.encode([box, box]) == ("list", [("ref", "program", 0), ("ref", "program", 1)])
    assert codec.decode(codec.encode(box)) is box


@pytest.mark.parametrize("node", [
    compile("1", "x", "exec"),  # a code object
    ("list", [1], "extra"),
    ("dict", [1]),  # a key without its value
    ("unknown", 1),
    ("named", "builtins", "print"),  # not a class
    ("named", "g2rpo_jax.rewards", "RewardOutcome"),  # not the standard library
    ("module", "g2rpo_jax"),
    ("value", "Fraction", ("tuple", ["1", 2])),
    ("value", "Fraction", ("tuple", [1, 0])),
    ("value", "eval", ("tuple", ["1"])),
    ("set", [("list", [])]),  # unhashable
    ("ref", "program", -1),
    ("ref", "elsewhere", 0),
])
def test_malformed_values_are_refused(node):
    with pytest.raises((ValueError, TypeError, ZeroDivisionError, IndexError, AttributeError)):
        LoopbackCodec().decode(node)


def test_nesting_is_bounded_both_ways():
    deep = []
    for _ in range(_assert_harness.MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(ValueError, match="nested"):
        LoopbackCodec().encode(deep)
    node = 1
    for _ in range(_assert_harness.MAX_DEPTH + 1):
        node = ("list", [node])
    with pytest.raises(ValueError):
        LoopbackCodec().decode(node)


def test_exceptions_cross_as_their_builtin_class():
    class NegativeInput(ValueError):
        pass

    reply = _assert_harness.error_reply(NegativeInput("n < 0"))
    assert reply == ("error", "ValueError", "n < 0")
    rebuilt = _assert_harness.rebuild_error(*reply[1:])
    assert type(rebuilt) is ValueError and str(rebuilt) == "n < 0"
    assert type(_assert_harness.rebuild_error("UnicodeDecodeError", "x")) is UnicodeError
    assert _assert_harness.rebuild_error("SystemExit", "0") is None  # exits are not sent
    assert _assert_harness.rebuild_error("open", "x") is None


DATACLASS = "from dataclasses import dataclass, field\n@dataclass\nclass P:\n    x: int\n    y: int\n"
# Honest programs returning, or taking, values other than plain data; each must score 1.
HONEST_PROGRAMS = {
    "a dataclass instance": (
        DATACLASS + "def make(a, b):\n    return P(a, b)\n",
        "assert make(1, 2) == P(1, 2)\nassert make(1, 2) != P(2, 1)\nassert make(3, 4).y == 4\n"
        "assert repr(make(1, 2)) == 'P(x=1, y=2)'\n"),
    "a dataclass field left out of comparisons": (
        "from dataclasses import dataclass, field\n@dataclass\nclass P:\n    x: int\n"
        "    cache: dict = field(default_factory=dict, compare=False)\n"
        "def make(a):\n    p = P(a)\n    p.cache['seen'] = True\n    return p\n",
        "assert make(1) == P(1)\nassert make(1) != P(2)\n"),
    "frozen dataclasses in a set": (
        "from dataclasses import dataclass\n@dataclass(frozen=True)\nclass P:\n    x: int\n"
        "def make(a):\n    return {P(a), P(a + 1)}\n",
        "assert make(1) == {P(1), P(2)}\nassert P(5) in make(4)\nassert P(9) not in make(4)\n"),
    "a class with slots": (
        "class V:\n    __slots__ = ('x',)\n    def __init__(self, x):\n        self.x = x\n"
        "def make(a):\n    return V(a)\n",
        "assert make(3).x == 3\nassert make(3) == V(3)\nassert make(3) != V(4)\n"),
    "a typing.NamedTuple": (
        "from typing import NamedTuple\nclass Pt(NamedTuple):\n    x: int\n    y: int\n"
        "def make(a, b):\n    return Pt(a, b)\n",
        "assert make(1, 2) == (1, 2)\nassert make(1, 2).x == 1\n"),
    "an Enum member": (
        "from enum import Enum\nclass C(Enum):\n    RED = 1\n    BLUE = 2\n"
        "def pick(x):\n    return C.RED if x else C.BLUE\n",
        "assert pick(1) == C.RED\nassert pick(0) != C.RED\nassert pick(0).value == 2\nassert pick(0) is C.BLUE\n"),
    "standard value types": (
        "import collections, datetime, decimal, fractions\n"
        "def values(s):\n    return (fractions.Fraction(3, 2), decimal.Decimal('0.10'), collections.Counter(s),\n"
        "            collections.deque(s, 2), datetime.date(2024, 1, 31), {'a': 1}.keys(), range(3))\n",
        "f, d, c, q, day, keys, r = values('aab')\nassert f == 1.5 and d == decimal.Decimal('0.1')\n"
        "assert c.most_common(1) == [('a', 2)] and list(q) == ['a', 'b']\n"
        "assert day + datetime.timedelta(days=1) == datetime.date(2024, 2, 1)\n"
        "assert keys == {'a'} and r == range(0, 3)\n"),
    "an lru_cache function": (
        "import functools\n@functools.lru_cache(None)\ndef fib(n):\n"
        "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
        "assert fib(60) == 1548008755920\n"),
    "a LeetCode Solution method": (
        "class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n"
        "        for i, v in enumerate(nums):\n            if target - v in seen:\n"
        "                return [seen[target - v], i]\n            seen[v] = i\n",
        "s = Solution()\nassert s.twoSum([2, 7, 11, 15], 9) == [0, 1]\n"
        "def check(candidate):\n    assert candidate(nums=[3, 3], target=6) == [0, 1]\ncheck(Solution().twoSum)\n"),
    "a tree built by the tests": (
        "class Node:\n    def __init__(self, v):\n        self.v, self.left, self.right = v, None, None\n"
        "def height(n):\n    return 0 if n is None else 1 + max(height(n.left), height(n.right))\n",
        "root = Node(1)\nroot.left = Node(2)\nroot.left.left = Node(3)\nassert height(root) == 3\n"
        "assert root.left.v == 2 and root.right is None\n"),
    "objects of the program in a list argument": (
        "class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n"
        "def longest(pairs, n):\n    return max(p.b - p.a for p in pairs)\n",
        "assert longest([Pair(1, 5), Pair(2, 3)], 2) == 4\n"),
    "an argument sorted in place": (
        "def fill(xs, d):\n    xs.sort()\n    d['n'] = len(xs)\n",
        "a, d = [3, 1, 2], {}\nassert fill(a, d=d) is None\nassert a == [1, 2, 3] and d == {'n': 3}\n"),
    "a function returning a function": (
        "def times(k):\n    return lambda x: k * x\n",
        "assert times(3)(4) == 12\nassert list(map(times(2), [1, 2])) == [2, 4]\n"),
    "a builtin class and a lambda as arguments": (
        "def keep(xs, kind):\n    return [x for x in xs if isinstance(x, kind)]\n"
        "def apply(f, xs):\n    return [f(x) for x in xs]\n",
        "assert keep((1, 'a', 2.0), int) == [1]\nassert apply(lambda x: x + 1, [1, 2]) == [2, 3]\n"),
    "a long generator": (
        "def squares(n):\n    for i in range(n):\n        yield i * i\n",
        "assert list(squares(5000)) == [i * i for i in range(5000)]\ng = squares(4)\n"
        "assert next(g) == 0 and next(g) == 1 and list(g) == [4, 9]\nassert 16 in squares(5)\n"),
    "an exception of the program's own class": (
        "class NegativeInput(ValueError):\n    pass\ndef root(n):\n    if n < 0:\n"
        "        raise NegativeInput(n)\n    return int(n ** 0.5)\n",
        "try:\n    root(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError\nassert root(16) == 4\n"),
    "a callable instance as the entry point": (
        "class Adder:\n    def __call__(self, a, b):\n        return a + b\nadd = Adder()\n", None),
}


@pytest.mark.parametrize("name", list(HONEST_PROGRAMS))
def test_honest_programs_pass_whatever_they_return(name):
    program, test = HONEST_PROGRAMS[name]
    tests = HUMANEVAL_STYLE if test is None else {"kind": "assert", "entry_point": "", "test": test}
    outcome = rewards.code_outcome(fenced(program), tests, LIMITS)
    assert outcome.value == 1.0, outcome.detail


def test_harness_also_runs_from_source():
    """Under another interpreter path the harness is shipped as source, not bytecode."""
    limits = rewards.SandboxLimits(timeout_s=3.0, python_executable=os.path.realpath(sys.executable))
    assert limits.python_executable != sys.executable
    program, test = HONEST_PROGRAMS["a dataclass instance"]
    tests = {"kind": "assert", "entry_point": "", "test": test}
    assert rewards.code_reward(fenced(program), tests, limits=limits) == 1.0
    assert rewards.code_reward(fenced("def add(a, b):\n    return a - b"), HUMANEVAL_STYLE, limits=limits) == 0.0


def test_assert_tests_pass_with_megabytes_on_stderr():
    program = "import sys\ndef add(a, b):\n    sys.stderr.write('x' * 10_000_000)\n    return a + b\n"
    assert rewards.code_reward(fenced(program), HUMANEVAL_STYLE) == 1.0


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


@pytest.mark.parametrize("actual, expected, abs_tol, rel_tol, match", [
    ("1.0", "1", 0, 0, True),
    ("1.50", "1.5", 0, 0, True),
    ("2.500000", "2.5", 0, 0, True),
    ("1e3", "1000.0", 0, 0, True),
    ("-0.0", "0", 0, 0, True),
    ("+7", "7", 0, 0, True),
    ("3.0 4.00\n-1\n", "3 4\n-1.0", 0, 0, True),  # every token of every line
    ("0.30000000000000004", "0.3", 0, 0, False),  # exact as decimals, not as floats
    ("1.0000000001", "1", 0, 0, False),
    ("1.5", "1.6", 0, 0, False),
    ("0.30000000000000004", "0.3", 1e-9, 0, True),
    ("100.4", "100", 0.5, 0, True),
    ("100.6", "100", 0.5, 0, False),
    ("101", "100", 0, 0.01, True),  # relative to the expected value
    ("102", "100", 0, 0.01, False),
    ("1e999999999999999999", "1", 0, 1e-6, False),  # beyond what decimal represents
    ("YES", "yes", 0, 0, False),  # text stays exact
    ("nan", "nan", 0, 0, True),
    ("inf", "1e400", 0, 0, False),
    ("1.0 2", "1", 0, 0, False),
    ("  8", "8", 0, 0, False),  # whitespace within a line stays exact
    ("1  2", "1 2", 0, 0, False),
    ("1,0", "1", 0, 0, False),
])
def test_stdio_numbers_compare_as_decimals(actual, expected, abs_tol, rel_tol, match):
    assert outputs_match(actual, expected, abs_tol, rel_tol) is match


def stdio_score(program: str, expected: str, **tolerances) -> float:
    tests = {"kind": "stdio", "cases": [{"input": "", "output": expected}]}
    return rewards.code_outcome(fenced(program), tests, LIMITS, **tolerances).value


@pytest.mark.parametrize("program, expected, score", [
    ("print(1.0)", "1", 1.0),
    ("print('%.2f' % 1.5)", "1.5", 1.0),
    ("print(f'{2.5:f} {3:.1f}')", "2.5 3", 1.0),
    ("print(0.1 + 0.2)", "0.3", 0.0),
    ("print(1.5)", "1.6", 0.0),
    ("print('1.0'); print('x')", "1\nx", 1.0),
])
def test_stdio_programs_printing_numbers_differently(program, expected, score):
    assert stdio_score(program, expected) == score


def test_stdio_tolerance_from_the_tests_or_the_caller():
    tests = {"kind": "stdio", "rel_tol": 1e-9, "cases": [{"input": "", "output": "0.3"}]}
    assert rewards.code_reward(fenced("print(0.1 + 0.2)"), tests) == 1.0
    assert stdio_score("print(0.1 + 0.2)", "0.3", abs_tol=1e-12) == 1.0
    assert stdio_score("print(0.1 + 0.2)", "0.3", abs_tol=1e-18) == 0.0
    tighter = dict(tests, rel_tol=1e-18)  # the task's own tolerance wins over the caller's
    assert rewards.code_outcome(fenced("print(0.1 + 0.2)"), tighter, LIMITS, rel_tol=1.0).value == 0.0
    with pytest.raises(ValueError, match="abs_tol"):
        build_jobs("print(1)", {"kind": "stdio", "abs_tol": -1.0, "cases": [{"input": "", "output": "1"}]})


def test_tolerance_settings_in_the_config():
    config = rewards.get_default_config()
    config.code.abs_tol, config.code.rel_tol = 1e-6, 1e-4
    settings = rewards.settings_from_config(config)
    assert (settings.code_abs_tol, settings.code_rel_tol) == (1e-6, 1e-4)
    config.code.rel_tol = float("nan")
    with pytest.raises(ValueError, match="rewards.code.rel_tol"):
        rewards.settings_from_config(config)


@pytest.mark.parametrize("program, expected, score", [
    ("import sys\nprint(42)\nsys.stdout.flush()\nsys.stderr.write('x' * 10_000_000)", "42", 1.0),
    ("import sys\nfor i in range(3):\n    print(i)\n    sys.stderr.write('e' * 1_000_000)", "0\n1\n2", 1.0),
    ("import sys\nsys.stderr.write('x' * 2_000_000)\nprint(41)", "42", 0.0),
    ("import sys\nprint(42)\nsys.stderr.write('x' * 2_000_000)\nraise SystemExit(1)", "42", 0.0),
])
def test_stdio_stderr_is_not_judged(program, expected, score):
    assert stdio_score(program, expected) == score


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


@pytest.mark.parametrize("completion, program", [
    ("<think>\n```python\ndef f(): return 1\n```\nhmm, or maybe", None),  # reasoning never closed
    ("<think>```python\ndef f(): return 1\n```</think>\nno code here", None),  # code only inside
    ("<think>draft</think>\n```python\ndef f(): return 2\n```", "def f(): return 2\n"),
    ("```python\ndef f(): return 3\n```", "def f(): return 3\n"),  # no thinking tags: as before
])
def test_code_is_read_only_after_the_reasoning(completion, program):
    assert code_tests.extract_program(completion) == program


def test_score_batch_applies_the_configured_stdio_tolerance():
    program = fenced("print(0.1 + 0.2)")  # 0.30000000000000004
    tests = {"kind": "stdio", "cases": [{"input": "", "output": "0.3\n"}]}
    scores = [rewards.score_batch([program], [{"tests": tests}], settings=rewards.RewardSettings(
        num_workers=0, code_rel_tol=rel_tol))[1]["accuracy"][0] for rel_tol in (0.0, 1e-9)]
    assert scores == [0.0, 1.0]

"""The one normalized record type every adapter produces.

A math example carries a reference `answer` (checked with math-verify); a code example carries
`tests` in the rewards module's format:

  {"kind": "assert", "test": str, "entry_point": str}
      the candidate's code runs, then `test`, then `check(<entry_point>)` when entry_point is
      not empty (HumanEval defines `check(candidate)`); MBPP asserts run at module level and
      leave entry_point empty. Passing means all of it ran without an exception.
  {"kind": "stdio", "cases": [{"input": str, "output": str}, ...]}
      the candidate is a program fed `input` on stdin whose stdout must match `output`.

`trajectory` is the high-quality reference text used for guidance (an R1 trace, a worked
solution, or reference code); it may be empty when the source has none (e.g. AIME25).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from g2rpo_jax.task_format import TEST_KINDS, is_stdio_case

CHAT_ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Example:
    """One problem: what to ask (prompt text or chat messages), how to score it, how to guide it."""

    id: str
    prompt: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    answer: str | None = None
    tests: Mapping[str, Any] | None = None
    trajectory: str = ""
    source: str = ""
    difficulty: float | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError(
                f"Example {self.id!r}: give exactly one of prompt= or messages= "
                f"(got prompt={self.prompt!r:.40}, messages={self.messages!r:.40})"
            )
        if (self.answer is None) == (self.tests is None):
            raise ValueError(
                f"Example {self.id!r}: give exactly one of answer= (math) or tests= (code)"
            )
        if self.messages is not None:
            validate_messages(self.messages, f"Example {self.id!r} messages")
        if self.tests is not None:
            validate_tests(self.tests, f"Example {self.id!r} tests")

    @property
    def task(self) -> str:
        """'math', 'code_assert' or 'code_stdio': selects the default instruction and the reward."""
        if self.tests is None:
            return "math"
        return "code_" + self.tests["kind"]

    @property
    def is_code(self) -> bool:
        return self.tests is not None


def validate_messages(messages, where: str) -> None:
    if not messages:
        raise ValueError(f"{where}: empty message list")
    for message in messages:
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in CHAT_ROLES or not isinstance(message.get("content"), str):
            raise ValueError(
                f"{where}: each message needs role in {CHAT_ROLES} and a string content; got {message!r:.80}"
            )


def validate_tests(tests, where: str) -> None:
    kind = tests.get("kind") if isinstance(tests, Mapping) else None
    if kind not in TEST_KINDS:
        raise ValueError(f"{where}: kind={kind!r}; valid kinds are {TEST_KINDS}")
    if kind == "assert":
        if not isinstance(tests.get("test"), str) or not isinstance(tests.get("entry_point"), str):
            raise ValueError(f"{where}: assert tests need string fields 'test' and 'entry_point'")
        return
    cases = tests.get("cases")
    if not isinstance(cases, (list, tuple)) or not cases:
        raise ValueError(f"{where}: stdio tests need a non-empty 'cases' list")
    for case in cases:
        if not is_stdio_case(case):
            raise ValueError(f"{where}: each stdio case needs string 'input' and 'output'; got {case!r:.80}")

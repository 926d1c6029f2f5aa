"""The formats that datasets and rewards agree on, as plain text helpers.

Where a completion's final answer stands: after its thinking (the text after the last
``</think>``), in the last ``\\boxed{...}``. Datasets read a worked solution's answer the same way
the math reward reads a completion's, and code tests come in the kinds the code reward runs.

A leaf module: standard library only, so that loading a dataset imports no reward machinery
(sandbox, process pool, math-verify).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
BOX_COMMANDS = ("\\boxed", "\\fbox")
TEST_KINDS = ("assert", "stdio")  # tests["kind"] of a code task


def is_stdio_case(case: Any) -> bool:
    """Whether `case` is one case of stdio tests: {"input": str, "output": str} (extra keys
    allowed)."""
    return (isinstance(case, Mapping) and isinstance(case.get("input"), str)
            and isinstance(case.get("output"), str))


def after_thinking(completion: str) -> str | None:
    """The part of a completion that may hold its final answer: the text after the last
    `</think>`, or the whole text when there is none; None when a `<think>` is still open there
    (a reasoning cut off or never closed has no final answer, only tentative ones)."""
    close = completion.rfind(THINK_CLOSE)
    tail = completion if close < 0 else completion[close + len(THINK_CLOSE):]
    return None if THINK_OPEN in tail else tail


def has_box(text: str) -> bool:
    """Whether `text` names a box command at all (complete or not)."""
    return any(command in text for command in BOX_COMMANDS)


def _balanced_group(text: str, open_index: int) -> str | None:
    """Content of the {...} group opening at `open_index`; None if it never closes.
    Escaped braces (\\{ \\}) do not count."""
    depth = 0
    i = open_index
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1:i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}); None if there is none or it is cut off."""
    start = max(text.rfind(command) for command in BOX_COMMANDS)
    if start < 0:
        return None
    command = next(c for c in BOX_COMMANDS if text.startswith(c, start))
    i = start + len(command)
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        return _balanced_group(text, i)
    match = re.match(r"\S+", text[i:])  # "\boxed 5"
    return match.group(0).rstrip("$.") if match else None

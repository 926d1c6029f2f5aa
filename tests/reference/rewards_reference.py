"""Plain-Python re-derivations used to check g2rpo_jax.rewards (never imported by the library).

Each function is written from the specification, not from the library's code: a small exact
grammar for answers (fractions, decimals, percents, degrees, thousands separators, zero padding,
"x = v", sets, intervals, radicals) with `fractions.Fraction`, a right-to-left box finder, an output
normaliser and the weighted reward sum.
"""

from __future__ import annotations

import re
from fractions import Fraction

# ---------------------------------------------------------------------------------------------
# Final-answer extraction.


def _escaped(text: str, index: int) -> bool:
    """True if the character at `index` is preceded by an odd number of backslashes."""
    count = 0
    j = index - 1
    while j >= 0 and text[j] == "\\":
        count += 1
        j -= 1
    return count % 2 == 1


def ref_last_boxed(text: str) -> str | None:
    commands = list(re.finditer(r"\\(?:boxed|fbox)", text))
    if not commands:
        return None
    opening = re.compile(r"[ \t]*\{").match(text, commands[-1].end())
    if not opening:
        return None  # a bare "\boxed 5" (not used by the tests)
    begin = opening.end()
    depth = 1
    for k in range(begin, len(text)):
        ch = text[k]
        if ch in "{}" and _escaped(text, k):
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return text[begin:k]
    return None


# ---------------------------------------------------------------------------------------------
# Answer values.


def _number(text: str) -> Fraction | None:
    text = text.strip()
    m = re.fullmatch(r"(-?)\\d?frac\{(\d+)\}\{(\d+)\}", text)
    if m:
        sign = -1 if m.group(1) else 1
        return sign * Fraction(int(m.group(2)), int(m.group(3)))
    m = re.fullmatch(r"(-?\d+)/(\d+)", text)
    if m:
        return Fraction(int(m.group(1)), int(m.group(2)))
    m = re.fullmatch(r"-?\d{1,3}(,\d{3})+", text)
    if m:
        return Fraction(int(text.replace(",", "")))
    m = re.fullmatch(r"-?(\d+)?\.?\d+", text)
    if m:
        return Fraction(text)
    return None


def ref_values(text: str) -> set[Fraction]:
    """Every value the answer may denote (a percent denotes both p and p/100)."""
    text = text.strip()
    m = re.fullmatch(r"[a-z]\s*=\s*(.+)", text)
    if m:
        text = m.group(1).strip()
    m = re.fullmatch(r"(.+?)\s*\^\s*\{?\\circ\}?", text)
    if m:
        text = m.group(1)
    m = re.fullmatch(r"(.+?)\s*\\%", text)
    if m:
        value = _number(m.group(1))
        return set() if value is None else {value, value / 100}
    value = _number(text)
    return set() if value is None else {value}


def ref_numbers_equal(gold: str, predicted: str) -> bool:
    gold_values, predicted_values = ref_values(gold), ref_values(predicted)
    if not gold_values or not predicted_values:
        raise ValueError(f"reference cannot read {gold!r} / {predicted!r}")
    return bool(gold_values & predicted_values)


def ref_set(text: str) -> frozenset[Fraction]:
    m = re.fullmatch(r"\\\{(.*)\\\}", text.strip())
    if not m:
        raise ValueError(f"not a set: {text!r}")
    return frozenset(_number(part) for part in m.group(1).split(","))


def ref_interval(text: str) -> tuple[str, Fraction, Fraction, str]:
    m = re.fullmatch(r"([\[(])\s*([^,]+),\s*([^,]+?)\s*([\])])", text.strip())
    if not m:
        raise ValueError(f"not an interval: {text!r}")
    return m.group(1), _number(m.group(2)), _number(m.group(3)), m.group(4)


def ref_radical_square(text: str) -> Fraction:
    """k\\sqrt{m} -> k^2 m (the square of a positive radical identifies it)."""
    m = re.fullmatch(r"(\d*)\\sqrt\{(\d+)\}", text.strip())
    if not m:
        raise ValueError(f"not a radical: {text!r}")
    k = int(m.group(1) or 1)
    return Fraction(k * k * int(m.group(2)))


# ---------------------------------------------------------------------------------------------
# Code outputs and reward sums.


def ref_normalize_output(text: str) -> str:
    kept = []
    for line in text.split("\n"):
        end = len(line)
        while end > 0 and line[end - 1].isspace():
            end -= 1
        kept.append(line[:end])
    while kept and kept[-1] == "":
        kept = kept[:-1]
    return "\n".join(kept)


def ref_weighted_sum(per_kind: dict, weights: dict, n: int) -> list[float]:
    totals = [0.0] * n
    for name, values in per_kind.items():
        for i in range(n):
            totals[i] += float(weights.get(name, 0.0)) * float(values[i])
    return totals


# ---------------------------------------------------------------------------------------------
# experiments/custom_reward.py's example reward.


def ref_digit_credit(text: str, answer: str) -> float:
    """Partial credit of the last \\boxed{...} against `answer`: both right-aligned with distinct
    padding, the share of equal places (0 without a boxed answer)."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if not boxed:
        return 0.0
    given = boxed[-1].strip()
    width = max(len(given), len(answer))
    return sum(x == y for x, y in zip(given.rjust(width, "#"), answer.rjust(width, "@"))) / width

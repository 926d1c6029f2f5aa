"""Math reward: extract the final answer of a completion and compare it with the gold answer.

Extraction: the **last** ``\\boxed{...}`` (balanced braces; ``\\fbox`` too) and nothing else, so
boxing many candidates earns nothing more than boxing the last one. Only when a completion has no
box at all, the configured fallbacks are tried in order: GSM8K's ``#### n`` and "The answer is n"
(last occurrence each).

Equivalence: math-verify (fractions, decimals, radicals, intervals, sets, degrees, percents,
thousands separators, ``x = 2`` vs ``2``, zero-padded integers, ...). Before parsing, cheap string
checks reject absurd answers (too long, too deeply nested, power towers and huge exponents or
factorials) so they score 0 at once; a time limit bounds the rest. math-verify's own timeouts
use ``signal.alarm`` and only work in the main thread, so they are disabled and the time limit is
enforced here: with an interval timer in the main thread, and from any other thread by running
the check in a helper process that is killed when it overruns.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import signal
import threading
import time

from g2rpo_jax.rewards.outcome import RewardOutcome

ANSWER_SOURCES = ("boxed", "gsm8k", "answer_is")
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer is[ \t:]*([^\n]*)", re.IGNORECASE)
_LEADING_NUMBER_RE = re.compile(r"^[-+]?(?:\d[\d,]*)?\.?\d+(?:/\d+)?%?")
# Exponents of >= 5 digits, numeric power towers and factorials of >= 4 digits cost sympy
# minutes or gigabytes; no benchmark answer needs them.
_HUGE_EXPONENT_RE = re.compile(r"\^\s*\{?\s*[-+]?\s*\d{5,}")
_HUGE_FACTORIAL_RE = re.compile(r"\d{4,}\s*!")
_NUMERIC_TOWER_RE = re.compile(r"\^\s*\{[\d\s{}^.+*-]*\^")


@dataclasses.dataclass(frozen=True)
class MathSettings:
    """Config keys of the `math` rewards section."""

    answer_sources: tuple[str, ...] = ANSWER_SOURCES  # boxed first; the rest are fallbacks
    timeout_s: float = 5.0  # parse + compare, per completion
    max_answer_chars: int = 400
    max_nesting_depth: int = 16  # of (), [], {}

    def validate(self) -> "MathSettings":
        bad = [s for s in self.answer_sources if s not in ANSWER_SOURCES]
        if bad or not self.answer_sources:
            raise ValueError(f"math.answer_sources={tuple(self.answer_sources)!r}; valid: "
                             f"a non-empty subset of {ANSWER_SOURCES}")
        if not self.timeout_s > 0:
            raise ValueError(f"math.timeout_s={self.timeout_s!r}; must be > 0")
        if self.max_answer_chars <= 0 or self.max_nesting_depth <= 0:
            raise ValueError("math.max_answer_chars and math.max_nesting_depth must be > 0, got "
                             f"{self.max_answer_chars!r}, {self.max_nesting_depth!r}")
        return self


class MathTimeout(BaseException):
    """Raised by the interval timer. A BaseException so math-verify's `except Exception`
    handlers cannot swallow it and carry on."""


# ----------------------------------------------------------------------------------------------
# Extraction.

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
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    command = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    i = start + len(command)
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        return _balanced_group(text, i)
    match = re.match(r"\S+", text[i:])  # "\boxed 5"
    return match.group(0).rstrip("$.") if match else None


def _clean_fallback(text: str) -> str | None:
    text = text.replace("$", "").replace("\\(", "").replace("\\)", "").replace("**", "").strip()
    text = text.rstrip(".").strip()
    number = _LEADING_NUMBER_RE.match(text)
    if number:  # "72 apples" -> "72"; anything that does not start with a number is kept whole
        return number.group(0)
    return text or None


def extract_answer(completion: str, sources: tuple[str, ...] = ANSWER_SOURCES) -> str | None:
    """The final answer of `completion`: the last box; fallbacks only when there is no box."""
    for source in sources:
        if source == "boxed":
            if any(command in completion for command in _BOX_COMMANDS):
                return last_boxed(completion)
        else:
            pattern = _GSM8K_RE if source == "gsm8k" else _ANSWER_IS_RE
            matches = pattern.findall(completion)
            if matches:
                return _clean_fallback(matches[-1])
    return None


def gold_answer(answer: str) -> str:
    """The gold answer string: a boxed or '#### n' gold is reduced to its answer."""
    if any(command in answer for command in _BOX_COMMANDS):
        boxed = last_boxed(answer)
        if boxed is not None:
            return boxed.strip()
    if "####" in answer:
        return _GSM8K_RE.findall(answer)[-1].strip().replace(",", "")
    return answer.strip()


def reject_reason(answer: str, settings: MathSettings) -> str:
    """Why a predicted answer is refused without parsing ('' if it is not)."""
    if len(answer) > settings.max_answer_chars:
        return f"answer longer than {settings.max_answer_chars} characters"
    depth = deepest = 0
    for char in answer:
        if char in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")]}":
            depth -= 1
    if deepest > settings.max_nesting_depth:
        return f"answer nested deeper than {settings.max_nesting_depth}"
    if (_HUGE_EXPONENT_RE.search(answer) or _HUGE_FACTORIAL_RE.search(answer)
            or _NUMERIC_TOWER_RE.search(answer)):
        return "answer with an astronomically large number"
    return ""


# ----------------------------------------------------------------------------------------------
# Parsing and comparison (math-verify), without its signal-based timeouts.

@functools.lru_cache(maxsize=1)
def _math_verify():
    import math_verify  # noqa: PLC0415 (heavy import, only where math is scored)
    from math_verify import grader, parser  # noqa: PLC0415

    # We bound the time ourselves; silence the one-time "timeout disabled" warnings.
    parser.TIMEOUT_WARNING_SHOWN = True
    grader.TIMEOUT_WARNING_SHOWN = True
    config = (math_verify.LatexExtractionConfig(boxed_match_priority=0),
              math_verify.ExprExtractionConfig())
    return math_verify, config


def _parse(answer: str) -> list:
    math_verify, config = _math_verify()
    # "\approx" would otherwise be read as its left side only ("2 \approx 3" -> 2); as an
    # equation it compares like "x = 2" does.
    answer = answer.replace("\\approx", "=")
    return math_verify.parse("\\boxed{" + answer + "}", extraction_config=list(config),
                             parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str) -> tuple:
    return tuple(_parse(answer))


def _compare(gold: str, predicted: str) -> RewardOutcome:
    math_verify, _ = _math_verify()
    gold_parsed = list(_parse_gold(gold))
    if not gold_parsed:
        return RewardOutcome(0.0, parse_failure=True, detail="gold answer unparseable")
    predicted_parsed = _parse(predicted)
    if not predicted_parsed:
        return RewardOutcome(0.0, parse_failure=True, detail="answer unparseable")
    equal = math_verify.verify(gold_parsed, predicted_parsed, timeout_seconds=None)
    return RewardOutcome(1.0 if equal else 0.0, detail="" if equal else "different answer")


def _run_with_time_limit(fn, seconds: float):
    """fn() with an interval timer (main thread only); raises MathTimeout when it overruns.
    An outer timer (e.g. the caller's own alarm) is restored afterwards."""
    def on_alarm(signum, frame):
        raise MathTimeout()

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay:
            remaining = max(previous_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, previous_interval)


def math_outcome_in_main_thread(completion: str, answer: str,
                                settings: MathSettings) -> RewardOutcome:
    predicted = extract_answer(completion, tuple(settings.answer_sources))
    if predicted is None or not predicted.strip():
        return RewardOutcome(0.0, parse_failure=True, detail="no final answer")
    reason = reject_reason(predicted, settings)
    if reason:
        return RewardOutcome(0.0, parse_failure=True, detail=reason)
    gold = gold_answer(answer)
    try:
        return _run_with_time_limit(lambda: _compare(gold, predicted), settings.timeout_s)
    except MathTimeout:
        return RewardOutcome(0.0, timeouts=1, detail=f"over {settings.timeout_s}s")


def math_outcome(completion: str, answer: str,
                 settings: MathSettings | None = None) -> RewardOutcome:
    """`math_reward` with the events (parse failure, timeout) kept. Safe from any thread."""
    settings = (settings or MathSettings()).validate()
    if threading.current_thread() is threading.main_thread():
        return math_outcome_in_main_thread(completion, answer, settings)
    from g2rpo_jax.rewards.pool import helper_pool  # noqa: PLC0415 (pool imports this module)

    return helper_pool().score_math([(completion, answer)], settings)[0]


def math_reward(completion: str, answer: str, *, settings: MathSettings | None = None) -> float:
    """1.0 if the final answer of `completion` equals `answer`, else 0.0. Never raises on
    model output; safe from any thread."""
    return math_outcome(completion, answer, settings).value

"""Math reward: extract the final answer of a completion and compare it with the gold answer.

Extraction: the **last** ``\\boxed{...}`` (balanced braces; ``\\fbox`` too) and nothing else, so
boxing many candidates earns nothing more than boxing the last one. Only when a completion has no
box at all, the configured fallbacks are tried in order: GSM8K's ``#### n`` and "The answer is n"
(last occurrence each).

Thinking: when a completion closes its reasoning (``</think>``) the answer is read only after the
last closing tag; a reasoning opened and never closed has no final answer; completions without
thinking tags are read whole.

Unicode spellings of numbers (fullwidth or other-script digits, ``½``, ``x²``, U+2212 minus) are
rewritten in ASCII/LaTeX before anything else, for the gold and the predicted answer alike.

Equivalence: math-verify (fractions, decimals, radicals, intervals, sets, degrees, percents,
thousands separators, ``x = 2`` vs ``2``, zero-padded integers, ...), except that two plain numbers
are compared here (inside sets, tuples, intervals, matrices and equations too): exactly when
neither holds a float, and relative to their magnitude when one does. math-verify's own test has an absolute
tolerance, so it calls any two values below ~1e-15 (or ~1e-6 next to a float) equal. Before parsing, cheap string
checks reject absurd answers (too long, too deeply nested, power towers and huge exponents or
factorials) so they score 0 at once; a time limit bounds the rest. math-verify's own timeouts
use ``signal.alarm`` and only work in the main thread, so they are disabled and the time limit is
enforced here: with an interval timer in the main thread, and from any other thread by running
the check in a helper process that is killed when it overruns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import signal
import threading
import time
import unicodedata

from g2rpo_jax.rewards.outcome import RewardOutcome
from g2rpo_jax.rewards.pool import helper_pool
from g2rpo_jax.task_format import after_thinking, has_box, last_boxed

ANSWER_SOURCES = ("boxed", "gsm8k", "answer_is")
_PLAIN_INTEGER = re.compile(r"[+-]?[0-9]+")
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer is[ \t:]*([^\n]*)", re.IGNORECASE)
_LEADING_NUMBER_RE = re.compile(r"^[-+]?(?:\d[\d,]*)?\.?\d+(?:/\d+)?%?")
# Exponents of >= 5 digits, numeric power towers and factorials of >= 4 digits cost sympy
# minutes or gigabytes; no benchmark answer needs them.
_HUGE_EXPONENT_RE = re.compile(r"\^\s*\{?\s*[-+]?\s*\d{5,}")
# "8E+14694861": the parser builds 10^14694861 exactly, in C code that no timer interrupts.
_HUGE_SCIENTIFIC_RE = re.compile(r"\d\s*[eE]\s*[-+]?\s*\d{5,}")
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

def _clean_fallback(text: str) -> str | None:
    text = text.replace("$", "").replace("\\(", "").replace("\\)", "").replace("**", "").strip()
    text = text.rstrip(".").strip()
    number = _LEADING_NUMBER_RE.match(text)
    if number:  # "72 apples" -> "72"; anything that does not start with a number is kept whole
        return number.group(0)
    return text or None


def extract_answer(completion: str, sources: tuple[str, ...] = ANSWER_SOURCES) -> str | None:
    """The final answer of `completion` (after its thinking): the last box; fallbacks only when
    there is no box."""
    completion = after_thinking(completion)
    if completion is None:
        return None
    for source in sources:
        if source == "boxed":
            if has_box(completion):
                return last_boxed(completion)
        else:
            pattern = _GSM8K_RE if source == "gsm8k" else _ANSWER_IS_RE
            matches = pattern.findall(completion)
            if matches:
                return _clean_fallback(matches[-1])
    return None


def gold_answer(answer: str) -> str:
    """The gold answer string: a boxed or '#### n' gold is reduced to its answer."""
    if has_box(answer):
        boxed = last_boxed(answer)
        if boxed is not None:
            return boxed.strip()
    if "####" in answer:
        return _GSM8K_RE.findall(answer)[-1].strip().replace(",", "")
    return answer.strip()


# Superscript and subscript runs become ^{...} and _{...} (NFKC alone would turn "5²" into "52").
_SUPERSCRIPTS = "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁼⁽⁾ⁿ"
_SUBSCRIPTS = "₀₁₂₃₄₅₆₇₈₉₊₋₌₍₎"
_SCRIPT_RUN_RE = re.compile(f"[{_SUPERSCRIPTS}]+|[{_SUBSCRIPTS}]+")
_SLASHES = {"\u2044": "/", "\u2215": "/"}  # fraction slash, division slash
_MINUS = "\u2212"


def _script_run(match: re.Match) -> str:
    run = match.group(0)
    body = unicodedata.normalize("NFKC", run).replace(_MINUS, "-")
    return ("^{" if run[0] in _SUPERSCRIPTS else "_{") + body + "}"


def _vulgar_fraction(char: str) -> str:
    """A vulgar fraction as LaTeX: "½" -> \\frac{1}{2}, so "3½" reads as the mixed number 7/2."""
    if unicodedata.category(char) != "No":
        return char
    numerator, slash, denominator = unicodedata.normalize("NFKC", char).partition("\u2044")
    if slash and numerator.isdigit() and denominator.isdigit():
        return f"\\frac{{{numerator}}}{{{denominator}}}"
    return char


def _ascii_digit(char: str) -> str:
    """Decimal digits of any script ("٥", "५") as ASCII digits."""
    if char.isascii() or unicodedata.category(char) != "Nd":
        return char
    return str(unicodedata.decimal(char))


def normalize_unicode(answer: str) -> str:
    """The ASCII/LaTeX spelling of Unicode ways to write a number, so that they compare like
    their ASCII forms: superscripts, vulgar fractions, then NFKC (fullwidth and compatibility
    forms; it leaves ASCII, hence LaTeX commands, unchanged), digits of any script, and the
    minus and slash signs."""
    if answer.isascii():
        return answer
    text = _SCRIPT_RUN_RE.sub(_script_run, answer)
    text = "".join(_vulgar_fraction(char) for char in text)
    text = unicodedata.normalize("NFKC", text)
    text = "".join(_ascii_digit(char) for char in text)
    for char, ascii_char in {**_SLASHES, _MINUS: "-"}.items():
        text = text.replace(char, ascii_char)
    return text


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
    if (_HUGE_EXPONENT_RE.search(answer) or _HUGE_SCIENTIFIC_RE.search(answer)
            or _HUGE_FACTORIAL_RE.search(answer) or _NUMERIC_TOWER_RE.search(answer)):
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


def warm_up() -> None:
    """Import math-verify (and sympy) now, so that the import does not count against the time
    limit of the first answer checked."""
    _math_verify()


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


def _finite_expr(x):
    """`x` evaluated (percents, unevaluated powers) when it is a finite scalar expression; None
    for anything else (sets, matrices, relations, infinities)."""
    import sympy  # noqa: PLC0415 (comes with math-verify)

    if not isinstance(x, sympy.Expr) or x.is_Matrix:
        return None
    value = x.doit()
    if value.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
        return None
    return value


def _relatively_close(a, b, relative: float) -> bool:
    """|a − b| <= relative · max(|a|, |b|), evaluated with 30 significant digits."""
    gap = abs(a - b).evalf(30)
    return bool(gap <= relative * max(abs(a).evalf(30), abs(b).evalf(30)))


def _exactly_equal(a, b, numeric_precision: int) -> bool:
    """a == b by exact arithmetic (rationals, radicals) and, failing that, simplification."""
    import sympy  # noqa: PLC0415

    difference = a - b
    if difference.is_zero is None:
        difference = sympy.simplify(difference)
    if difference.is_zero is not None:
        return bool(difference.is_zero)
    if difference.is_number:  # a constant sympy cannot decide: compare to 15 significant digits
        return _relatively_close(a, b, 10.0 ** -numeric_precision)
    return False  # depends on the symbols


def values_equal(a, b, float_rounding: int = 6, numeric_precision: int = 15) -> bool | None:
    """Equality of two scalar sympy expressions; None when either is something else.

    Two numbers holding a float must agree to `float_rounding` decimal places (math-verify's
    rule, which keeps large values strict) and to `float_rounding` significant digits (which
    keeps small ones apart). Everything else is decided exactly, floats inside symbolic
    expressions taken as the decimals they were written as, so 2^-98 and 2^-99 (or x/2^98 and
    x/2^99) differ however small they are.
    """
    import sympy  # noqa: PLC0415

    a, b = _finite_expr(a), _finite_expr(b)
    if a is None or b is None:
        return None
    if a.is_number and b.is_number and (a.has(sympy.Float) or b.has(sympy.Float)):
        try:
            same_rounding = a.round(float_rounding) == b.round(float_rounding)
        except (TypeError, ValueError):
            return None
        return bool(same_rounding) and _relatively_close(a, b, 0.5 * 10.0 ** (1 - float_rounding))
    as_written = lambda x: x.xreplace({f: sympy.Rational(str(f)) for f in x.atoms(sympy.Float)})  # noqa: E731
    return _exactly_equal(as_written(a), as_written(b), numeric_precision)


@contextlib.contextmanager
def _exact_numbers_in(grader):
    """math-verify's numeric comparison (used for plain values, for the elements of sets, tuples,
    intervals and matrices, and for the sides of equations) replaced by `values_equal` while the
    block runs. Integer pairs and percents of integers ("9% == 9") keep math-verify's own rule."""
    original = grader.sympy_numeric_eq

    def numeric_eq(a, b, float_rounding, numeric_precision):
        integers = all(grader.is_atomic_or_pct_atomic(x, grader.Integer) for x in (a, b))
        verdict = None if integers else values_equal(a, b, float_rounding, numeric_precision)
        return original(a, b, float_rounding, numeric_precision) if verdict is None else verdict

    grader.sympy_numeric_eq = numeric_eq
    try:
        yield
    finally:
        grader.sympy_numeric_eq = original


def _compare(gold: str, predicted: str) -> RewardOutcome:
    math_verify, _ = _math_verify()
    gold_parsed = list(_parse_gold(gold))
    if not gold_parsed:
        return RewardOutcome(0.0, parse_failure=True, detail="gold answer unparseable")
    predicted_parsed = _parse(predicted)
    if not predicted_parsed:
        return RewardOutcome(0.0, parse_failure=True, detail="answer unparseable")
    with _exact_numbers_in(math_verify.grader):
        equal = math_verify.verify(gold_parsed, predicted_parsed, timeout_seconds=None)
    return RewardOutcome(1.0 if equal else 0.0, detail="" if equal else "different answer")


_ALARM_RETRY_S = 0.05  # after the limit, the alarm fires again this often until the work stops


def _run_with_time_limit(fn, seconds: float):
    """fn() with an interval timer (main thread only); raises MathTimeout when it overruns.
    An outer timer (e.g. the caller's own alarm) is restored afterwards.

    Python ignores an exception raised where nothing can catch it (a garbage-collector callback,
    such as JAX's, or a __del__), and the alarm can land there while sympy allocates: so each
    alarm arms the next one, and the time limit still stops the work."""
    running = [True]

    def on_alarm(signum, frame):
        if running[0]:
            signal.setitimer(signal.ITIMER_REAL, _ALARM_RETRY_S)
            raise MathTimeout()

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        while True:  # a retry alarm may still land here: it must not skip the restore
            try:
                running[0] = False
                signal.setitimer(signal.ITIMER_REAL, 0)
                break
            except MathTimeout:
                continue
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay:
            remaining = max(previous_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, previous_interval)


def math_outcome_in_main_thread(completion: str, answer: str,
                                settings: MathSettings) -> RewardOutcome:
    """`math_outcome` in the main thread of a process (the caller's, or a pool worker's), where
    the time limit can be an interval timer."""
    predicted = extract_answer(completion, tuple(settings.answer_sources))
    if predicted is None or not predicted.strip():
        return RewardOutcome(0.0, parse_failure=True, detail="no final answer")
    predicted = normalize_unicode(predicted)  # before the checks: "2¹²³⁴⁵⁶" is a huge power too
    reason = reject_reason(predicted, settings)
    if reason:
        return RewardOutcome(0.0, parse_failure=True, detail=reason)
    gold = normalize_unicode(gold_answer(answer))
    if _PLAIN_INTEGER.fullmatch(gold) and _PLAIN_INTEGER.fullmatch(predicted.strip()):
        # Two plain integers are decided exactly here, as math-verify would, without its parser:
        # it costs milliseconds per answer, most of an RL step's reward time on integer tasks.
        equal = int(gold) == int(predicted)
        return RewardOutcome(1.0 if equal else 0.0, detail="" if equal else "different answer")
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
    return helper_pool().score_math([(completion, answer)], settings)[0]


def math_reward(completion: str, answer: str, *, settings: MathSettings | None = None) -> float:
    """1.0 if the final answer of `completion` equals `answer`, else 0.0. Never raises on
    model output; safe from any thread."""
    return math_outcome(completion, answer, settings).value

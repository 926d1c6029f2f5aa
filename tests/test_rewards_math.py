"""Math reward: final-answer extraction, equivalence (checked against exact references), resistance
to gaming, absurd inputs, time limits from any thread, format reward, config and batch scoring."""

import itertools
import signal
import threading
import time
from fractions import Fraction

import numpy as np
import pytest

from g2rpo_jax import rewards
from g2rpo_jax.rewards import math_answers
from g2rpo_jax.rewards.math_answers import MathSettings, MathTimeout, extract_answer, gold_answer, last_boxed
from tests.reference.rewards_reference import (ref_interval, ref_last_boxed, ref_numbers_equal,
                                               ref_radical_square, ref_set, ref_weighted_sum)

# Several spellings of a few values; the reference decides which pairs are equal.
NUMERIC_FORMS = {
    "half": ["\\frac{1}{2}", "\\dfrac{1}{2}", "1/2", "0.5", "0.50", "x = 0.5", "50\\%"],
    "thousand": ["1000", "1,000", "1000.0", "y=1000"],
    "twenty-five": ["25", "025", "25.0", "25^\\circ", "25^{\\circ}", "n = 25"],
    "three quarters": ["\\frac{3}{4}", "3/4", ".75", "75\\%"],
    "two": ["2", "02", "\\frac{4}{2}", "2.0", "-2"],
    "big": ["1234567", "1,234,567"],
    "negative third": ["-\\frac{1}{3}", "-1/3"],
}
STRUCTURED_FORMS = [
    (["\\{1,2\\}", "\\{2,1\\}", "\\{1,3\\}", "\\{1,2,3\\}", "\\{\\frac{1}{2},2\\}", "\\{0.5,2\\}"],
     ref_set),
    (["[1,3)", "[1, 3)", "(1,3]", "(1,3)", "[1,3]", "[0.5,3)", "[\\frac{1}{2},3)"], ref_interval),
    (["2\\sqrt{2}", "\\sqrt{8}", "3\\sqrt{2}", "\\sqrt{18}", "\\sqrt{12}", "2\\sqrt{3}"],
     ref_radical_square),
]


# --------------------------------------------------------------------------------------------
# Extraction.

@pytest.mark.parametrize("text", [
    "so \\boxed{42}.",
    "first \\boxed{1} then \\boxed{\\frac{a}{b}} done",
    "nested \\boxed{\\left\\{ 1, \\frac{2}{3} \\right\\}}",
    "escaped \\boxed{\\{1,2\\}} braces",
    "fbox \\fbox{7} and then \\boxed{8}",
    "a box \\boxed {x+1} with a space",
    "cut off \\boxed{\\frac{1}{2}",
    "no box here",
    "\\boxed{2} and a cut-off last one \\boxed{3",
])
def test_last_boxed_matches_reference(text):
    assert last_boxed(text) == ref_last_boxed(text)


def test_only_the_last_box_counts():
    assert rewards.math_reward("\\boxed{7} no wait \\boxed{5}", "5") == 1.0
    assert rewards.math_reward("\\boxed{5} no wait \\boxed{7}", "5") == 0.0
    # A cut-off last box is no answer: earlier boxes are not used instead.
    assert rewards.math_reward("\\boxed{5} hmm \\boxed{7", "5") == 0.0


def test_fallbacks_only_without_a_box_and_configurable():
    gsm = "She has 3 + 4 = 7 apples.\n#### 7"
    sentence = "Adding them, the answer is 7 apples."
    assert extract_answer(gsm) == "7"
    assert extract_answer(sentence) == "7"
    assert extract_answer("The answer is $\\frac{1}{2}$.") == "\\frac{1}{2}"
    assert extract_answer("the answer is 3.\n#### 4") == "4"  # gsm8k is tried before answer_is
    boxed_and_hash = "\\boxed{5}\n#### 7"
    assert extract_answer(boxed_and_hash) == "5"  # a box wins; fallbacks are not consulted
    only_box = MathSettings(answer_sources=("boxed",))
    assert rewards.math_reward(gsm, "7") == 1.0
    assert rewards.math_reward(gsm, "7", settings=only_box) == 0.0
    assert rewards.math_reward(sentence, "7", settings=MathSettings(answer_sources=("gsm8k",))) == 0.0


def test_gold_answers_in_any_source_format():
    assert gold_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert gold_answer("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 1,018") == "1018"
    assert rewards.math_reward("\\boxed{1018}", "Work... #### 1,018") == 1.0


# The final answer follows the reasoning: (completion, gold, reward, parse failure). A reasoning
# that never closes has no final answer, whatever it tried on the way.
THINKING_CASES = [
    ("<think>\nMaybe the answer is \\boxed{5}. Let me double check this by another method: first", "5", 0.0, True),
    ("<think>the answer is 5, or is it", "5", 0.0, True),
    ("<think>\n#### 5", "5", 0.0, True),
    ("<think>tentative \\boxed{5}</think> final \\boxed{6}", "6", 1.0, False),
    ("<think>tentative \\boxed{5}</think> final \\boxed{6}", "5", 0.0, False),
    ("<think>it is \\boxed{5}</think> nothing after the thinking", "5", 0.0, True),
    ("reasoning \\boxed{5}</think>\n\\boxed{7}", "7", 1.0, False),  # <think> was in the prompt
    ("<think>a</think>\\boxed{4}<think>reopened \\boxed{5}", "5", 0.0, True),
    ("<think>a</think>\\boxed{4}<think>reopened \\boxed{5}", "4", 0.0, True),
    ("<think>a</think> The answer is 8.", "8", 1.0, False),
    ("no tags at all \\boxed{5}", "5", 1.0, False),
]


@pytest.mark.parametrize("completion,gold,expected,parse_failure", THINKING_CASES)
def test_answer_is_read_after_the_thinking(completion, gold, expected, parse_failure):
    outcome = rewards.math_outcome(completion, gold)
    assert (outcome.value, outcome.parse_failure) == (expected, parse_failure)


def test_score_batch_counts_unclosed_reasoning_as_parse_failure():
    completions = ["<think>\nMaybe the answer is \\boxed{5}. Let me double check this by another method: first",
                   "<think>\nit is 5</think>\\boxed{5}"]
    _, per_kind, stats = rewards.score_batch(completions, [{"answer": "5"}] * 2)
    np.testing.assert_array_equal(per_kind["accuracy"], [0.0, 1.0])
    np.testing.assert_array_equal(per_kind["format"], [0.0, 1.0])
    assert stats["parse_failures"] == 1
    assert extract_answer(completions[0]) is None
    assert math_answers.after_thinking("a</think>b<think>c</think>d") == "d"


# --------------------------------------------------------------------------------------------
# Equivalence, against exact references.

def test_numeric_forms_agree_with_exact_reference():
    forms = [f for group in NUMERIC_FORMS.values() for f in group]
    mismatches = [(g, p) for g, p in itertools.product(forms, forms)
                  if rewards.math_reward(f"so \\boxed{{{p}}}", g) != float(ref_numbers_equal(g, p))]
    assert mismatches == []


@pytest.mark.parametrize("forms,reference", STRUCTURED_FORMS, ids=["sets", "intervals", "radicals"])
def test_structured_forms_agree_with_exact_reference(forms, reference):
    mismatches = [(g, p) for g, p in itertools.product(forms, forms)
                  if rewards.math_reward(f"\\boxed{{{p}}}", g) != float(reference(g) == reference(p))]
    assert mismatches == []


# Exact values far below (or far above) any fixed tolerance, with their value as a Fraction; two
# spellings are equal exactly when their Fractions are. No two distinct values here agree to six
# significant digits, so the float spellings follow the same reference.
TINY_AND_HUGE = [
    ("\\frac{1}{2^{98}}", Fraction(1, 2**98)),
    ("2^{-98}", Fraction(1, 2**98)),
    ("\\frac{1}{2^{99}}", Fraction(1, 2**99)),
    ("\\frac{1}{7^{30}}", Fraction(1, 7**30)),
    ("\\frac{2}{7^{30}}", Fraction(2, 7**30)),
    ("7^{-30}", Fraction(1, 7**30)),
    ("10^{-20}", Fraction(1, 10**20)),
    ("3 \\times 10^{-20}", Fraction(3, 10**20)),
    ("3.0 \\times 10^{-20}", Fraction(3, 10**20)),
    ("1.5 \\times 10^{-30}", Fraction(15, 10**31)),
    ("1.6 \\times 10^{-30}", Fraction(16, 10**31)),
    ("\\frac{3}{2} \\cdot 10^{-30}", Fraction(15, 10**31)),
    ("0.0000001", Fraction(1, 10**7)),
    ("0.0000002", Fraction(2, 10**7)),
    ("\\frac{1}{10^{7}}", Fraction(1, 10**7)),
    ("0", Fraction(0)),
    ("2^{100}", Fraction(2**100)),
    ("2^{100}+1", Fraction(2**100 + 1)),
    (str(2**100), Fraction(2**100)),
    ("10^{20}", Fraction(10**20)),
    ("10^{20}-1", Fraction(10**20 - 1)),
]


def test_tiny_and_huge_values_are_compared_exactly():
    mismatches = [(g, p) for (g, g_value), (p, p_value) in itertools.product(TINY_AND_HUGE, TINY_AND_HUGE)
                  if rewards.math_reward(f"\\boxed{{{p}}}", g) != float(g_value == p_value)]
    assert mismatches == []


@pytest.mark.parametrize("predicted,gold,expected", [
    # Sets, tuples, intervals, matrices, equations and symbolic expressions compare their tiny parts
    # exactly too.
    ("\\{2^{-60}, 1\\}", "\\{2^{-61}, 1\\}", 0.0),
    ("\\{2^{-60}, 1\\}", "\\{1, \\frac{1}{2^{60}}\\}", 1.0),
    ("(2^{-60}, 1)", "(2^{-61}, 1)", 0.0),
    ("[2^{-60}, 1)", "[2^{-61}, 1)", 0.0),
    ("[2^{-60}, 1)", "[\\frac{1}{2^{60}}, 1)", 1.0),
    ("\\begin{pmatrix} 2^{-60} \\\\ 1 \\end{pmatrix}", "\\begin{pmatrix} 2^{-61} \\\\ 1 \\end{pmatrix}", 0.0),
    ("x = 2^{-60}", "x = 2^{-61}", 0.0),
    ("x = 2^{-60}", "x = \\frac{1}{2^{60}}", 1.0),
    ("y = 2x + 2^{-70}", "y = 2x + 2^{-71}", 0.0),
    ("\\frac{x}{2^{98}}", "\\frac{x}{2^{99}}", 0.0),
    ("2^{-98} x", "\\frac{x}{2^{98}}", 1.0),
    ("x - 1.5 \\times 10^{-30}", "x - 1.6 \\times 10^{-30}", 0.0),
    ("x^2 - 2^{-60}", "x^2 - 2^{-61}", 0.0),
    ("2^{-60} i", "2^{-61} i", 0.0),
    ("e^{-50}", "e^{-51}", 0.0),
    ("\\sqrt{2} \\cdot 10^{-20}", "\\sqrt{2} \\cdot 10^{-21}", 0.0),
    ("\\sqrt{8} \\cdot 10^{-30}", "2\\sqrt{2} \\cdot 10^{-30}", 1.0),
    # A float agrees with a value when both agree to six significant digits (and six decimals).
    ("0.333333", "\\frac{1}{3}", 1.0),
    ("0.666667", "\\frac{2}{3}", 1.0),
    ("0.33", "\\frac{1}{3}", 0.0),
    ("0.0000001", "\\frac{1}{2^{98}}", 0.0),
    ("0.000001", "0.000002", 0.0),
    ("1.000001 \\times 10^{-30}", "10^{-30}", 1.0),
    ("1.0001 \\times 10^{-30}", "10^{-30}", 0.0),
    ("1234567.4", "1234567", 0.0),
    ("0.5 x", "\\frac{x}{2}", 1.0),
    ("0.333333 x", "\\frac{x}{3}", 0.0),
])
def test_tiny_parts_of_structures_and_floats(predicted, gold, expected):
    assert rewards.math_reward(f"\\boxed{{{predicted}}}", gold) == expected


# Unicode spellings: (predicted, gold, reward).
UNICODE_CASES = [
    ("５", "5", 1.0), ("１２", "12", 1.0), ("－３", "-3", 1.0), ("−5", "-5", 1.0), ("0．5", "\\frac{1}{2}", 1.0),
    ("½", "\\frac{1}{2}", 1.0), ("½", "0.5", 1.0), ("¾", "0.75", 1.0), ("⅓", "1/3", 1.0), ("⅞", "\\frac{7}{8}", 1.0),
    ("3¼", "\\frac{13}{4}", 1.0), ("−2½", "-\\frac{5}{2}", 1.0), ("1⁄2", "\\frac{1}{2}", 1.0),
    ("2²", "4", 1.0), ("2³", "23", 0.0), ("10⁻³", "0.001", 1.0), ("x²", "x^2", 1.0),
    ("٥", "5", 1.0), ("५", "5", 1.0), ("\\frac{１}{４}", "0.25", 1.0),
    ("½", "\\frac{1}{3}", 0.0), ("５", "6", 0.0), ("¼", "\\frac{1}{2}", 0.0),
    ("0.5", "½", 1.0), ("3", "３", 1.0),  # the gold answer is read the same way
]


@pytest.mark.parametrize("predicted,gold,expected", UNICODE_CASES)
def test_unicode_numbers_compare_like_their_ascii_forms(predicted, gold, expected):
    assert rewards.math_reward(f"\\boxed{{{predicted}}}", gold) == expected


def test_unicode_normalisation_leaves_latex_alone():
    for latex in ["\\frac{1}{2}", "\\sqrt{2}+x^{2}", "\\{1,2\\}", "25^\\circ", "\\text{yes}", "π", "2×3"]:
        assert math_answers.normalize_unicode(latex) == latex
    assert math_answers.normalize_unicode("x² + ½ − ５") == "x^{2} + \\frac{1}{2} - 5"
    # A superscript exponent is checked like a written one: refused at once, not computed.
    outcome = rewards.math_outcome("\\boxed{2¹²³⁴⁵⁶}", "1")
    assert outcome.value == 0.0 and outcome.parse_failure


# --------------------------------------------------------------------------------------------
# Gaming.

@pytest.mark.parametrize("hedge", [
    "2, 3", "\\{2, 3\\}", "2 \\text{ or } 3", "x = 2 \\text{ or } x = 3", "2 \\pm 1", "1 \\pm 1",
    "2 \\approx 3", "2 = 3", "(-\\infty, \\infty)", "\\mathbb{R}", "x", "2 \\neq 3", "1 < x < 3",
])
def test_hedged_answers_score_zero(hedge):
    assert rewards.math_reward(f"\\boxed{{{hedge}}}", "2") == 0.0


def test_many_boxes_earn_nothing_extra():
    candidates = " ".join(f"\\boxed{{{k}}}" for k in range(100))
    assert rewards.math_reward(candidates, "2") == 0.0
    assert rewards.math_reward(candidates, "99") == 1.0


# --------------------------------------------------------------------------------------------
# Absurd and malformed answers: 0, fast, never an exception.

ABSURD = [
    "9^{9^{9^{9}}}", "10^{10^{10}}", "2^{123456}", "(x+1)^{100000}", "1000000!", "12345!",
    "(" * 300 + "2" + ")" * 300, "1" * 5000, "+".join(["1"] * 3000), "\\frac{", "}}}{{{",
    "\\frac{1}{0}", "\\sqrt{-1}^{\\sqrt{-1}}", "\x00\x01\x02", "\\begin{pmatrix}", "$$$$", "",
    # Scientific notation with a huge exponent (one a policy wrote); the parser would build the
    # exact integer in C code that no timer interrupts.
    "8E+14694861", "3e14694861", "1.5E-99999999", "2 E 123456", "\\{1, 7E+88888888\\}",
]


@pytest.mark.parametrize("answer", ABSURD, ids=range(len(ABSURD)))
def test_absurd_answers_score_zero_quickly(answer):
    started = time.monotonic()
    outcome = rewards.math_outcome(f"\\boxed{{{answer}}}", "2")
    assert outcome.value == 0.0
    assert time.monotonic() - started < 1.0


def test_garbage_completions_never_raise():
    rng = np.random.default_rng(0)
    alphabet = list("\\{}()[]^_$#0123456789abcx=+-*/,. \n") + ["\\boxed", "\\frac", "####",
                                                                  "answer is", "\\sqrt"]
    for _ in range(100):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 60))))
        assert rewards.math_reward(text, "2") in (0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Time limits.

# Equal, but sympy needs ~15 s to show it (expanding both sides).
SLOW_GOLD, SLOW_PRED = "(x+1)^{300}(x-1)^{300}", "(x^2-1)^{300}"


def test_time_limit_in_the_main_thread_is_counted_as_timeout():
    settings = MathSettings(timeout_s=0.3)
    started = time.monotonic()
    outcome = rewards.math_outcome(f"\\boxed{{{SLOW_PRED}}}", SLOW_GOLD, settings)
    assert outcome.timeouts == 1 and outcome.value == 0.0
    assert time.monotonic() - started < 1.5


def test_time_limit_holds_when_an_alarm_is_swallowed():
    """An alarm that lands in a garbage-collector callback raises where Python ignores it (seen
    with JAX's callback during a sympy expansion); the next alarm must still stop the work."""
    def swallows_the_first_alarm():
        deadline, swallowed = time.monotonic() + 5, 0
        while time.monotonic() < deadline:
            try:
                while time.monotonic() < deadline:
                    pass
            except MathTimeout:
                swallowed += 1
                if swallowed > 1:
                    raise
        return "finished"

    started = time.monotonic()
    with pytest.raises(MathTimeout):
        math_answers._run_with_time_limit(swallows_the_first_alarm, 0.2)
    assert time.monotonic() - started < 1.0
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # nothing left armed


def test_time_limit_restores_an_outer_timer():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.8)
        assert rewards.math_reward("\\boxed{3}", "3") == 1.0
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < remaining <= 0.8
        time.sleep(1.0)
        assert fired == [True]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_works_and_times_out_from_other_threads():
    results = {}

    def score(key, completion, answer, settings=None):
        results[key] = rewards.math_outcome(completion, answer, settings)

    threads = [threading.Thread(target=score, args=(i, f"\\boxed{{\\frac{{{i}}}{{4}}}}", f"{i / 4}"))
               for i in range(1, 4)]
    threads.append(threading.Thread(target=score, args=("slow", f"\\boxed{{{SLOW_PRED}}}", SLOW_GOLD,
                                                        MathSettings(timeout_s=0.3))))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [results[i].value for i in range(1, 4)] == [1.0, 1.0, 1.0]
    assert results["slow"].timeouts == 1 and results["slow"].value == 0.0


def test_time_limit_sees_through_math_verify_exception_handlers(monkeypatch):
    """math-verify catches Exception everywhere; the limit must still stop the work."""
    def slow_compare(gold, predicted):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                time.sleep(0.01)
            except Exception:  # noqa: BLE001 (what a library handler would do)
                pass
        return rewards.RewardOutcome(1.0)

    monkeypatch.setattr(math_answers, "_compare", slow_compare)
    outcome = rewards.math_outcome("\\boxed{1/2}", "\\frac{1}{2}", MathSettings(timeout_s=0.2))
    assert outcome.timeouts == 1 and outcome.value == 0.0


def test_settings_validation_names_the_key():
    with pytest.raises(ValueError, match="math.answer_sources"):
        rewards.math_reward("\\boxed{1}", "1", settings=MathSettings(answer_sources=("latex",)))
    with pytest.raises(ValueError, match="math.timeout_s"):
        rewards.math_reward("\\boxed{1}", "1", settings=MathSettings(timeout_s=0))


# --------------------------------------------------------------------------------------------
# Format reward.

@pytest.mark.parametrize("completion,kind,require_think,expected", [
    ("<think>work</think> so \\boxed{3}", "math", True, 1.0),
    ("work</think> so \\boxed{3}", "math", True, 1.0),   # <think> came from the chat template
    ("so \\boxed{3}", "math", False, 1.0),
    ("so \\boxed{3}", "math", True, 0.0),
    ("<think>work \\boxed{3}", "math", False, 0.0),       # never closed its thinking
    ("<think>a</think><think>b</think>\\boxed{3}", "math", False, 0.0),
    ("</think>x<think> \\boxed{3}", "math", False, 0.0),
    ("<think>\\boxed{3}</think> no answer after", "math", False, 0.0),
    ("so \\boxed{3", "math", False, 0.0),
    ("so \\boxed{}", "math", False, 0.0),
    ("</think>\n```python\nprint(1)\n```", "code", True, 1.0),
    ("</think>\n```python\nprint(1)\n", "code", True, 0.0),   # unclosed fence
    ("</think>\n```bash\nls\n```", "code", True, 0.0),
])
def test_format_reward(completion, kind, require_think, expected):
    assert rewards.format_reward(completion, kind, require_think=require_think) == expected


def test_format_reward_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        rewards.format_reward("x", "poetry")


# --------------------------------------------------------------------------------------------
# Config and batch scoring (math examples; code ones are in test_rewards_code.py).

def test_default_config_round_trips_to_settings():
    config = rewards.get_default_config()
    config.math.timeout_s = 2.5
    config.weights.format = 0.25
    config.code.memory_mb = 512
    settings = rewards.settings_from_config(config)
    assert settings.math.timeout_s == 2.5
    assert settings.weights == {"accuracy": 1.0, "format": 0.25, "custom": 1.0}
    assert settings.custom == ""  # no reward of the user's unless rewards.custom names one
    assert settings.code_limits.memory_mb == 512
    assert settings.code_limits.timeout_s == rewards.SandboxLimits().timeout_s


@pytest.mark.parametrize("key,value,message", [
    ("code.isolation", "docker", "code.isolation"),
    ("code.extract", "first_block", "rewards.code.extract"),
    ("math.answer_sources", ("boxed", "regex"), "math.answer_sources"),
    ("code.memory_mb", 0, "code.memory_mb"),
    ("num_workers", -1, "rewards.num_workers"),
])
def test_bad_config_values_raise_naming_the_key(key, value, message):
    config = rewards.get_default_config()
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ValueError, match=message):
        rewards.settings_from_config(config)


def test_unknown_weight_names_raise():
    with pytest.raises(ValueError, match="rewards.weights"):
        rewards.score_batch(["\\boxed{1}"], [{"answer": "1"}], {"accuracy": 1.0, "style": 1.0})


def test_score_batch_math_weights_and_stats_against_reference():
    completions = ["<think>t</think>\\boxed{4}", "\\boxed{5}", "no answer at all", "#### 10",
                   f"\\boxed{{{'1' * 1000}}}"]
    examples = [{"answer": "4"}, {"answer": "4"}, {"answer": "4"}, {"answer": "10"}, {"answer": "1"}]
    weights = {"accuracy": 1.0, "format": 0.3}
    total, per_kind, stats = rewards.score_batch(completions, examples, weights)
    expected_accuracy = [1.0, 0.0, 0.0, 1.0, 0.0]
    expected_format = [1.0, 1.0, 0.0, 0.0, 1.0]  # "#### 10" is not the boxed format
    np.testing.assert_array_equal(per_kind["accuracy"], expected_accuracy)
    np.testing.assert_array_equal(per_kind["format"], expected_format)
    np.testing.assert_allclose(total, ref_weighted_sum(per_kind, weights, len(completions)), rtol=1e-6)
    assert total.shape == (5,) and total.dtype == np.float32
    # "no answer" and the 1000-digit answer are parse failures; nothing else went wrong.
    assert stats == {"parse_failures": 2, "timeouts": 0, "sandbox_errors": 0, "executions": 0}


def test_score_batch_rejects_misaligned_or_unknown_examples():
    with pytest.raises(ValueError, match="len"):
        rewards.score_batch(["a", "b"], [{"answer": "1"}])
    with pytest.raises(ValueError, match="'answer'"):
        rewards.score_batch(["a"], [{"question": "1"}])


@pytest.mark.parametrize("gold, predicted", [
    ("25", "025"), ("25", "25"), ("-3", "-3"), ("7", "+7"), ("0", "-0"), ("100", "1000"),
    ("5241", "5214"), ("15201", "15201"), ("-12", "12"), ("99999999999999999999", "99999999999999999998"),
])
def test_plain_integers_are_decided_as_math_verify_decides_them(gold, predicted):
    """Two plain integers skip the parser; the verdict is still math-verify's own."""
    reference = math_answers._compare(gold, predicted).value
    assert rewards.math_reward(f"so \\boxed{{{predicted}}}", gold) == reference

"""rewards.custom: a reward function of the user's, named in the config, added to the total with its
weight and reported apart; mistakes in its name or its output stop with the spec and the fix."""

import os
import re

import numpy as np
import pytest

from g2rpo_jax import data, rewards
from tests.reference.rewards_reference import ref_digit_credit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_REWARD = os.path.join(REPO, "experiments", "custom_reward.py")


def settings_with(custom: str, weight: float = 1.0, **weights) -> rewards.RewardSettings:
    config = rewards.get_default_config()
    config.custom = custom
    config.weights.custom = weight
    config.weights.update(weights)
    config.num_workers = 0
    return rewards.settings_from_config(config)


def addition(i: int, answer: str) -> data.Example:
    return data.Example(id=f"add{i}", prompt=f"problem {i}", answer=answer)


def test_the_example_reward_is_added_with_its_weight_and_reported_apart():
    completions = ["so \\boxed{5241}", "\\boxed{5214}", "no boxed answer", "\\boxed{15201}", "\\boxed{1} then \\boxed{99}"]
    examples = [addition(0, "5241"), addition(1, "5241"), addition(2, "7"), addition(3, "5201"), addition(4, "199")]
    settings = settings_with(f"{EXAMPLE_REWARD}:digit_credit", weight=0.2, format=0.5)
    total, per_kind, stats = rewards.score_batch(completions, examples, settings=settings)
    expected = [ref_digit_credit(c, e.answer) for c, e in zip(completions, examples)]
    assert expected == [1.0, 0.5, 0.0, 0.8, 2 / 3]
    np.testing.assert_allclose(per_kind["custom"], expected, rtol=1e-6)
    assert per_kind["accuracy"].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(total, per_kind["accuracy"] + 0.5 * per_kind["format"] + 0.2 * np.asarray(expected),
                               rtol=1e-6)
    assert total.dtype == np.float32 and stats["parse_failures"] == 1


def test_without_a_custom_reward_the_batch_reports_accuracy_and_format_only():
    total, per_kind, _ = rewards.score_batch(["\\boxed{4}"], [addition(0, "4")], settings=settings_with(""))
    assert set(per_kind) == {"accuracy", "format"} and total.tolist() == [1.0]


def test_a_module_on_the_path_is_named_by_its_dotted_name(tmp_path, monkeypatch):
    (tmp_path / "my_lab_rewards.py").write_text(
        "def answer_length(completions, examples):\n"
        "    return [len(e.answer) for e in examples]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _, per_kind, _ = rewards.score_batch(["a", "b"], [addition(0, "12"), addition(1, "12345")],
                                         settings=settings_with("my_lab_rewards:answer_length", weight=0.0))
    assert per_kind["custom"].tolist() == [2.0, 5.0]  # the examples arrive aligned with the completions


@pytest.mark.parametrize("spec, message", [
    ("digit_credit", "is not 'package.module:function'"),
    ("experiments/no_such_file.py:f", "no file 'experiments/no_such_file.py'"),
    ("no_such_module_for_rewards:f", "module 'no_such_module_for_rewards' could not be imported"),
    (f"{EXAMPLE_REWARD}:digit_credits", "has no function 'digit_credits'"),
    (f"{EXAMPLE_REWARD}:BOXED", "custom_reward.py.BOXED is a Pattern, not a function"),
    ("textwrap:dedent", "dedent(text) cannot be called as dedent(completions, examples)"),
])
def test_a_wrong_name_stops_at_the_config_naming_the_spec(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        settings_with(spec)
    assert f"rewards.custom={spec!r}" in str(error.value)


@pytest.mark.parametrize("returned, message", [
    ("[1.0]", "returned shape (1,) for 2 completions"),
    ("[1.0, float('nan')]", "returned nan for completion 1"),
    ("['0.5', '1']", "returned <U3 values, not numbers"),
    ("[[1.0], [1.0, 2.0]]", "returned object values, not numbers"),
    ("None", "returned None (a missing return?)"),
    ("examples[0].metadata['difficulty']", "raised KeyError: 'difficulty'"),
])
def test_a_function_that_does_not_return_one_finite_number_per_completion_is_refused(tmp_path, returned, message):
    path = tmp_path / "bad_reward.py"
    path.write_text(f"def bad(completions, examples):\n    return {returned}\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        rewards.score_batch(["a", "b"], [addition(0, "1"), addition(1, "2")], settings=settings_with(f"{path}:bad"))


def test_a_weight_without_a_function_is_refused():
    with pytest.raises(ValueError, match=re.escape("rewards.weights.custom=0.5 has no effect: rewards.custom names no "
                                                   "function")):
        settings_with("", weight=0.5)


def test_evaluation_lists_each_reward_per_completion():
    from g2rpo_jax.eval import generation

    settings = settings_with(f"{EXAMPLE_REWARD}:digit_credit", weight=0.2)
    total, accuracy, details, _ = generation.score_rows(["so \\boxed{5214}"], [addition(0, "5241")], settings, None)
    assert accuracy.tolist() == [0.0] and details[0]["custom"] == 0.5 and details[0]["gold_answer"] == "5241"
    assert total.tolist() == pytest.approx([0.2 * 0.5])  # format's weight is 0 by default

"""An example reward of one's own, for `rewards.custom` (see g2rpo_jax/rewards/custom.py):

    python -m g2rpo_jax.train --config=experiments/configs/g2rpo.py:demo,adaptive \
        --config.rewards.custom=experiments/custom_reward.py:digit_credit --config.rewards.weights.custom=0.2

A reward function takes the batch's N completions (decoded text, guide included) and their N
`g2rpo_jax.data.Example` records (prompt, answer or tests, reference trajectory, metadata) and
returns N finite numbers. The loop adds weight × value to each rollout's reward, logs the mean as
`reward/custom` and each value in rollouts.jsonl; it runs on the host, possibly in a helper thread,
once per sampler call. The advantages use the total; refill (`sampling.refill_rounds`), the
`all_fail` trigger and ℓ's schedule (`guidance.reward_source`, by default) read accuracy alone.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def digit_credit(completions: Sequence[str], examples: Sequence[Any]) -> list[float]:
    """Partial credit on the demo's additions: the share of places, counted from the units digit,
    where the completion's last \\boxed{...} has the gold answer's digit (0 without a boxed answer;
    a longer or shorter answer loses the places it adds or lacks). A shaped reward gives groups
    whose rollouts all fail a spread, so keep its weight small next to accuracy's."""
    credits = []
    for text, example in zip(completions, examples):
        boxed = BOXED.findall(text)
        gold = str(example.answer)
        if not boxed:
            credits.append(0.0)
            continue
        given = boxed[-1].strip()
        same_place = sum(a == b for a, b in zip(reversed(gold), reversed(given)))
        credits.append(same_place / max(len(gold), len(given)))
    return credits

"""Plain-Python re-derivations of the guidance rules, written from their statements.

Used only by tests. Each schedule returns ℓ after every step k = 1..K as Python floats (float64):
the library keeps ℓ in float32, so tests compare with a relative tolerance. Window means use `math.fsum`;
in the adaptive comparison a difference within TIE_TOLERANCE · max(1, largest |reward| in the
window) is a tie (float32 sums of equal rewards need not reproduce the reward exactly).
"""

import math
from fractions import Fraction

import numpy as np

TIE_TOLERANCE = 1e-5


def clamp(value, low, high):
    return min(max(value, float(low)), float(high))


def adaptive_schedule(rewards, initial_length, delta, window, min_length, max_length):
    """With m = min(T, k): if r_k > mean(r_{k-m+1}, ..., r_k) then ℓ -= Δ else ℓ += Δ; clamp."""
    history = []
    current = float(initial_length)
    out = []
    for reward in rewards:
        history.append(float(reward))
        recent = history[-window:]
        mean = math.fsum(recent) / len(recent)
        tolerance = TIE_TOLERANCE * max(1.0, max(abs(x) for x in recent))
        if history[-1] - mean > tolerance:
            current = current - delta
        else:
            current = current + delta
        current = clamp(current, min_length, max_length)
        out.append(current)
    return out


def ratio_schedule(rewards, initial_length, update_every, min_length, max_length):
    """Every update_every-th step (k = U, 2U, ...) compare r_k with the mean of the U-1 rewards
    before it in its cycle: ℓ = clamp(ℓ · mean / r_k) when both are positive."""
    cycle_rewards = []
    current = float(initial_length)
    out = []
    for k, reward in enumerate(rewards, start=1):
        reward = float(reward)
        if k % update_every == 0:
            mean = math.fsum(cycle_rewards) / len(cycle_rewards)
            if reward > 0 and mean > 0:
                current = clamp(current * mean / reward, min_length, max_length)
            cycle_rewards = []
        else:
            cycle_rewards.append(reward)
        out.append(current)
    return out


def linear_decay_schedule(num_steps, initial_length, total_steps):
    """ℓ after k steps: initial_length · (1 − k / total_steps), and 0 from k = total_steps on."""
    return [initial_length * max(1.0 - k / total_steps, 0.0) for k in range(1, num_steps + 1)]


def constant_schedule(num_steps, value):
    return [float(value)] * num_steps


def per_problem_schedules(num_problems, steps, schedule, initial_length):
    """Per-problem ℓ after every train step: [K][P] Python floats.

    steps: per train step, a list of (problem id, group reward) pairs in batch order.
    schedule: one problem's rule, reward sequence -> ℓ after each of its rewards (e.g. a
    functools.partial of `adaptive_schedule`). Each problem follows that rule over the rewards of
    its own groups, in the order they came (twice in one step: both, in batch order); a problem
    no group has touched yet keeps `initial_length`.
    """
    histories = [[] for _ in range(num_problems)]
    out = []
    for groups in steps:
        for problem, reward in groups:
            histories[problem].append(float(reward))
        out.append([schedule(h)[-1] if h else float(initial_length) for h in histories])
    return out


def rounded_length(value):
    """Integer ℓ: nearest integer, halves to even (Python's round), never negative."""
    return max(round(float(value)), 0)



def guided_count(alpha, group_size):
    """Exact decimal alpha · G, halves rounded up, at least one when alpha > 0."""
    if alpha == 0:
        return 0
    exact = Fraction(str(alpha)) * group_size
    count = math.floor(exact + Fraction(1, 2))
    return min(max(count, 1), group_size)


def metrics(length, rewards, advantages, guided, completion_mask, guided_token_mask):
    rewards = np.asarray(rewards, dtype=np.float64)
    advantages = np.asarray(advantages, dtype=np.float64)
    guided = np.asarray(guided, dtype=bool)
    completion = np.asarray(completion_mask) > 0
    guide_tokens = (np.asarray(guided_token_mask) > 0) & completion

    def side_mean(selection):
        return float(rewards[selection].mean()) if selection.any() else 0.0

    total_tokens = int(completion.sum())
    return {
        "guidance/length": float(length),
        "guidance/guided_rollout_share": float(guided.mean()),
        "guidance/guided_token_share": int(guide_tokens.sum()) / total_tokens if total_tokens else 0.0,
        "guidance/reward_guided": side_mean(guided),
        "guidance/reward_unguided": side_mean(~guided),
        "guidance/advantage_std": float(np.sqrt(np.mean((advantages - advantages.mean()) ** 2))),
    }

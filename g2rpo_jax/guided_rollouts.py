"""Guided rollouts: which rollouts of each group carry a guide (a fraction α of the group, at
random positions), and the per-step metrics that compare them with the unguided ones.

How long each guide is, is the schedule's business (`guidance`); the guide's tokens are taken
from the problem's reference trajectory by the rollout collector (`rollout`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def guided_per_group(alpha: float, group_size: int) -> int:
    """round(alpha · G) with halves rounded up, at least 1 when alpha > 0, at most G."""
    if not _is_number(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} is not valid; valid: a number in [0, 1]")
    if not _is_int(group_size) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} is not valid; valid: an integer >= 1")
    if alpha == 0:
        return 0
    # The small nudge keeps e.g. 0.35 · 10 (3.4999999999999996 in binary) at its decimal value 3.5.
    count = math.floor(alpha * group_size + 0.5 + 1e-9)
    return min(max(count, 1), group_size)


def assign_guided(rng: jax.Array, num_groups: int, group_size: int, alpha: float) -> jax.Array:
    """Which rollouts carry a guide: bool [num_groups * group_size], rollouts of a group adjacent.

    Every group gets exactly `guided_per_group(alpha, group_size)` guided rollouts, at positions
    drawn uniformly at random and independently per group; the result is a function of `rng` only.
    Compiled once per (num_groups, group_size); callable inside jit with all three static.
    """
    if not _is_int(num_groups) or num_groups < 1:
        raise ValueError(f"num_groups={num_groups!r} is not valid; valid: an integer >= 1")
    count = guided_per_group(alpha, group_size)
    return _random_guided_mask(rng, int(num_groups), int(group_size), jnp.int32(count))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_guided_mask(rng: jax.Array, num_groups: int, group_size: int, count: jax.Array) -> jax.Array:
    scores = jax.random.uniform(rng, (num_groups, group_size))  # [num_groups, G]
    # Rank of each rollout inside its group: a random permutation, so exactly `count` ranks < count.
    ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)  # [num_groups, G]
    return (ranks < count).reshape(num_groups * group_size)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of values where mask; 0 when the mask is empty."""
    count = jnp.sum(mask)
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(count, 1)


def guidance_metrics(
    guidance_length: jax.Array,
    rewards: jax.Array,
    advantages: jax.Array,
    guided: jax.Array,
    completion_mask: jax.Array,
    guided_token_mask: jax.Array,
) -> dict[str, jax.Array]:
    """Per-step logging scalars (float32 []), jittable.

    guidance_length:   ℓ used for this step's rollouts.
    rewards:           [N] total (or accuracy) reward per rollout.
    advantages:        [N] group advantages.
    guided:            bool [N] rollouts that carried a guide.
    completion_mask:   [N, L] 1 on completion tokens (guide + sampled, up to the first EOS).
    guided_token_mask: [N, L] 1 on forced guide tokens.

    Keys: guidance/length, guidance/guided_rollout_share, guidance/guided_token_share (guide tokens
    over all completion tokens), guidance/reward_guided and guidance/reward_unguided (means; 0 when
    that side has no rollouts), guidance/advantage_std (population std over all rollouts; it
    collapses toward 0 when guidance makes whole groups uniformly right).
    """
    rewards = jnp.asarray(rewards, dtype=jnp.float32)
    advantages = jnp.asarray(advantages, dtype=jnp.float32)
    guided = jnp.asarray(guided, dtype=bool)
    completion = jnp.asarray(completion_mask) > 0  # [N, L]
    guide_tokens = (jnp.asarray(guided_token_mask) > 0) & completion  # [N, L]
    num_rollouts = rewards.shape[0]
    if advantages.shape != (num_rollouts,) or guided.shape != (num_rollouts,):
        raise ValueError(
            f"rewards, advantages and guided must all have shape [N]; got {rewards.shape}, "
            f"{advantages.shape}, {guided.shape}")
    if completion.shape != guide_tokens.shape or completion.shape[:1] != (num_rollouts,):
        raise ValueError(
            f"completion_mask and guided_token_mask must both have shape [N={num_rollouts}, L]; got "
            f"{jnp.shape(completion_mask)} and {jnp.shape(guided_token_mask)}")
    token_count = jnp.sum(completion)
    return {
        "guidance/length": jnp.asarray(guidance_length, dtype=jnp.float32),
        "guidance/guided_rollout_share": jnp.mean(guided.astype(jnp.float32)),
        "guidance/guided_token_share": (
            jnp.sum(guide_tokens) / jnp.maximum(token_count, 1)).astype(jnp.float32),
        "guidance/reward_guided": _masked_mean(rewards, guided).astype(jnp.float32),
        "guidance/reward_unguided": _masked_mean(rewards, ~guided).astype(jnp.float32),
        "guidance/advantage_std": jnp.std(advantages).astype(jnp.float32),
    }

"""Group advantages: each rollout's reward against its group's (GRPO, Shao et al. 2024, arXiv
2402.03300), and the guided/unguided split baseline.

Rewards [N] are laid out as N // G consecutive groups of G rollouts of one prompt.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from g2rpo_jax.numerics import as_float, check_option, safe_divide

ADVANTAGE_SCALES = ("group", "batch", "none")
ADVANTAGE_BASELINES = ("group", "guided_split")


def _grouped(rewards: jax.Array, group_size: int) -> jax.Array:
    chex.assert_rank(rewards, 1)
    num = rewards.shape[0]
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be a positive integer")
    if num % group_size != 0:
        raise ValueError(
            f"number of rewards N={num} is not a multiple of group_size={group_size}: "
            "groups would be split or misaligned"
        )
    return as_float(rewards).reshape(num // group_size, group_size)  # [N/G, G]


def zero_std_groups(rewards: jax.Array, group_size: int) -> jax.Array:
    """bool [N // G]: groups whose rewards are all equal (they carry no GRPO signal).

    Compared exactly (max == min) rather than via a computed std, which rounding can leave
    slightly above zero for equal non-dyadic rewards such as 0.1.
    """
    grouped = _grouped(rewards, group_size)
    return grouped.max(axis=1) == grouped.min(axis=1)


def group_advantages(
    rewards: jax.Array,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
    *,
    baseline: str = "group",
    guided: Optional[jax.Array] = None,
) -> jax.Array:
    """Advantages [N] for rewards [N] laid out as N // G consecutive groups of `group_size`.

    advantage = reward - group mean, then divided by (std + eps) where std is the unbiased std
    of the group (`scale="group"`, GRPO) or of the whole batch (`"batch"`), or left unscaled
    (`"none"`, Dr. GRPO). A group whose rewards are all equal gets exactly zero.

    `baseline="guided_split"` (needs `guided`, bool [N], True on guided rollouts) applies the same
    formula separately to the guided and the unguided rollouts of each group (their own mean and,
    for scale="group", their own unbiased std; "batch" still divides by the whole batch's std).
    A side whose rewards are all equal, including a side of one rollout, gets exactly zero, so a
    group whose guided rollouts all succeed and unguided ones all fail carries no signal.
    """
    check_option("scale", scale, ADVANTAGE_SCALES)
    check_option("baseline", baseline, ADVANTAGE_BASELINES)
    grouped = _grouped(rewards, group_size)  # [N/G, G]
    if scale == "group" and group_size < 2:
        raise ValueError(
            f"group_size={group_size} is too small for scale='group': the unbiased group std "
            "needs at least 2 rewards per group; use scale='batch' or 'none'"
        )
    if scale == "batch" and grouped.size < 2:
        raise ValueError(
            f"scale='batch' needs at least 2 rewards for the unbiased batch std; got N={grouped.size}"
        )
    if baseline == "guided_split":
        if guided is None:
            raise ValueError("baseline='guided_split' needs guided= (bool [N], True on guided rollouts); got None")
        chex.assert_equal_shape([rewards, guided])
        return _split_advantages(grouped, jnp.asarray(guided).reshape(grouped.shape) > 0, scale, eps)
    centered = grouped - grouped.mean(axis=1, keepdims=True)  # [N/G, G]
    if scale == "group":
        centered = centered / (jnp.std(grouped, axis=1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        centered = centered / (jnp.std(grouped, ddof=1) + eps)
    all_equal = zero_std_groups(rewards, group_size)[:, None]  # [N/G, 1]
    return jnp.where(all_equal, 0.0, centered).reshape(-1)  # [N]


def _split_advantages(grouped: jax.Array, guided: jax.Array, scale: str, eps: float) -> jax.Array:
    """`group_advantages` with one baseline per (group, guided or not) side; [N/G, G] -> [N]."""
    out = jnp.zeros_like(grouped)  # [N/G, G]
    batch_std = jnp.std(grouped, ddof=1)
    for side in (guided, ~guided):
        weights = side.astype(grouped.dtype)
        count = weights.sum(axis=1, keepdims=True)  # [N/G, 1]
        mean = safe_divide((grouped * weights).sum(axis=1, keepdims=True), count)
        centered = grouped - mean
        if scale == "group":
            # Unbiased std of the side; a side with fewer than two rollouts is constant (zeroed below).
            variance = safe_divide((jnp.square(centered) * weights).sum(axis=1, keepdims=True), count - 1)
            centered = centered / (jnp.sqrt(variance) + eps)
        elif scale == "batch":
            centered = centered / (batch_std + eps)
        # Exact max == min test, as in `zero_std_groups`: rounding must not leave tiny advantages.
        high = jnp.where(side, grouped, -jnp.inf).max(axis=1, keepdims=True)
        low = jnp.where(side, grouped, jnp.inf).min(axis=1, keepdims=True)
        out = jnp.where(side & (high != low), centered, out)
    return out.reshape(-1)  # [N]

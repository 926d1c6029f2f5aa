"""Sampler/trainer mismatch: the drift between the sampler's and the trainer's log-probs of the
sampled tokens, and truncated importance sampling (TIS) weights that correct for it.

The sampler may compute other probabilities than the trainer (bf16 sampling, f32 training), so
rollouts come from π_sampler, not from π_old (Yao et al. 2025, "Your Efficient RL Framework Secretly
Brings You Off-Policy RL Training", fengyao.notion.site/off-policy-rl). Arrays are [B, T] over
completion positions; log-probs in nats. The sampled tokens s are the completion tokens (mask 1)
that the sampler drew: not forced guide tokens (guided_mask 1), not padding.
"""

from __future__ import annotations

import math
from typing import Optional

import chex
import jax
import jax.numpy as jnp

from g2rpo_jax import partial_metrics
from g2rpo_jax.numerics import as_float, check_option, safe_divide

IMPORTANCE_LEVELS = ("token", "sequence")
TIS_LEVELS = ("none", "token", "sequence")
# Keys of `mismatch_metrics`: the drift, always; the TIS weights' statistics, when weights are given.
MISMATCH_KEYS = ("mismatch/logprob_abs_diff", "mismatch/k1", "mismatch/logprob_max_abs_diff",
                 "mismatch/num_sampled_tokens")
TIS_KEYS = ("mismatch/tis_weight_mean", "mismatch/tis_clipped_fraction", "mismatch/num_tis_units")


_F32_MAX = float(jnp.finfo(jnp.float32).max)


def _check_tis_options(level: str, cap) -> None:
    check_option("level", level, IMPORTANCE_LEVELS)
    if not 0 < cap <= _F32_MAX:
        raise ValueError(f"cap={cap!r} is not valid; expected a number > 0 (at most float32's max, {_F32_MAX:.4g})")


def _sampled_tokens(mask: jax.Array, guided_mask: Optional[jax.Array]) -> jax.Array:
    """bool [B, T]: the completion tokens the sampler drew (not forced guide tokens, not padding)."""
    completion = as_float(mask) > 0
    return completion if guided_mask is None else completion & ~(as_float(guided_mask) > 0)


def _log_drift(old_logprobs: jax.Array, sampler_logprobs: jax.Array, sampled: jax.Array) -> jax.Array:
    """float32 [B, T], no gradient: log π_old - log π_sampler on sampled tokens, 0 elsewhere (where
    padding's arbitrary values and the guide tokens' sampler entries never reach a sum)."""
    old = jax.lax.stop_gradient(as_float(old_logprobs))
    sampler = jax.lax.stop_gradient(as_float(sampler_logprobs))
    return jnp.where(sampled, old - sampler, 0.0)


def truncated_importance_weights(
    old_logprobs: jax.Array,
    sampler_logprobs: jax.Array,
    mask: jax.Array,
    guided_mask: Optional[jax.Array] = None,
    *,
    level: str = "token",
    cap: float = 2.0,
) -> jax.Array:
    """Truncated importance sampling (TIS) weights, float32 [B, T], no gradient.

    Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"
    (fengyao.notion.site/off-policy-rl): rollouts drawn by a sampler whose numerics differ from
    the trainer's are reweighted towards the trainer's old policy, the ratio truncated at C. With
    s the sampled completion tokens (mask 1, guided_mask 0) and d_t = old_t - sampler_t (natural
    log-probs, so d_t is a log ratio):
      level="token"     w_t = min(exp(d_t), C) for t in s;
      level="sequence"  w = min(exp(Σ_{t in s} d_t), C) on every token of the row;
    and w = 1 on forced guide tokens (the sampler did not draw them) and padding; a row without
    sampled tokens has w = 1 throughout. Only the policy term is weighted (`policy_loss`'s
    `tis_weights`).

    Args:
      old_logprobs: [B, T] the trainer's log-probs of the completion tokens under the policy
        before the update (with μ = 1, stop_gradient of the current ones).
      sampler_logprobs: [B, T] the sampler's log-probs of the same tokens (any value on guide
        tokens and padding).
      mask, guided_mask: [B, T] as in `policy_loss` (guided_mask None = no guide tokens).
      level: "token" or "sequence".
      cap: C > 0, at most float32's max. A weight that reaches C is exactly C.

    Raises ValueError for a bad level or cap.
    """
    _check_tis_options(level, cap)
    chex.assert_rank(mask, 2)
    chex.assert_equal_shape([old_logprobs, sampler_logprobs, mask])
    if guided_mask is not None:
        chex.assert_equal_shape([mask, guided_mask])
    sampled = _sampled_tokens(mask, guided_mask)
    log_weight = _log_drift(old_logprobs, sampler_logprobs, sampled)  # [B, T]
    if level == "sequence":
        log_weight = jnp.broadcast_to(log_weight.sum(axis=1, keepdims=True), log_weight.shape)
    # exp increases, so min(exp(x), C) = min(exp(min(x, m)), C) for every m >= log C: the clamp
    # changes no weight. It bounds exp's argument by log C + 1 (89.7 at float32's max C, where exp
    # may give inf, which the min turns back into C), so a huge gap (a token the sampler found
    # nearly impossible, or a long row's sum) cannot overflow into inf or NaN; exp of a very
    # negative x underflows to 0, the right limit. The margin of 1 makes exp(m) = e·C well above
    # C despite float32 rounding of log C, so a truncated weight is exactly C.
    exponent = jnp.minimum(log_weight, math.log(cap) + 1.0)
    return jnp.where(sampled, jnp.minimum(jnp.exp(exponent), cap), 1.0)


def mismatch_metrics(
    old_logprobs: jax.Array,
    sampler_logprobs: jax.Array,
    mask: jax.Array,
    guided_mask: Optional[jax.Array] = None,
    *,
    tis_weights: Optional[jax.Array] = None,
    tis_level: str = "token",
    tis_cap: float = 2.0,
    parts: bool = False,
) -> dict:
    """Sampler/trainer drift over the sampled completion tokens s (as in
    `truncated_importance_weights`; arrays [B, T], log-probs in nats), float32 scalars:

      mismatch/logprob_abs_diff      mean over s of |old - sampler|;
      mismatch/logprob_max_abs_diff  max over s of |old - sampler| (0 without sampled tokens);
      mismatch/k1                    mean over s of sampler - old: the k1 estimate of
                                     KL(sampler || trainer), the tokens being the sampler's draws;
      mismatch/num_sampled_tokens    |s|, the count behind the means;
    and, when `tis_weights` (from `truncated_importance_weights` with this level and cap) is given,
    over the TIS units (the tokens of s at level "token", the rows with a sampled token at level
    "sequence", each counted once):
      mismatch/tis_weight_mean       mean weight of a unit;
      mismatch/tis_clipped_fraction  the share of units whose weight reached the cap;
      mismatch/num_tis_units         their count.
    Means of an empty set are 0. With parts=True the values are `partial_metrics` parts, which
    `partial_metrics.merge` (`grpo.combine_metrics`) merges over micro-batches exactly. A batch without
    sampler log-probs (`make_batch`'s zeros) compares the trainer with log-prob 0: abs_diff is
    then the trainer's mean NLL, meaningless as a drift.
    """
    chex.assert_equal_shape([old_logprobs, sampler_logprobs, mask])
    sampled = _sampled_tokens(mask, guided_mask)
    drift = _log_drift(old_logprobs, sampler_logprobs, sampled)  # [B, T], 0 off s
    num_sampled = sampled.sum().astype(jnp.float32)
    metrics = {
        "mismatch/logprob_abs_diff": partial_metrics.Mean(safe_divide(jnp.abs(drift).sum(), num_sampled), num_sampled),
        "mismatch/k1": partial_metrics.Mean(safe_divide(-drift.sum(), num_sampled), num_sampled),
        "mismatch/logprob_max_abs_diff": partial_metrics.Largest(jnp.abs(drift).max()),
        "mismatch/num_sampled_tokens": partial_metrics.Total(num_sampled),
    }
    if tis_weights is None:
        return metrics if parts else partial_metrics.values(metrics)
    _check_tis_options(tis_level, tis_cap)
    chex.assert_equal_shape([tis_weights, mask])
    weights = jnp.where(sampled, jax.lax.stop_gradient(as_float(tis_weights)), 0.0)  # [B, T]
    if tis_level == "sequence":  # one weight per row: the same on each of its sampled tokens
        units, unit_weights = sampled.any(axis=1), weights.max(axis=1)  # [B] each
    else:
        units, unit_weights = sampled, weights
    num_units = units.sum().astype(jnp.float32)
    metrics.update({
        "mismatch/tis_weight_mean": partial_metrics.Mean(
            safe_divide(jnp.where(units, unit_weights, 0.0).sum(), num_units), num_units),
        "mismatch/tis_clipped_fraction": partial_metrics.Mean(
            safe_divide((units & (unit_weights >= tis_cap)).sum(), num_units), num_units),
        "mismatch/num_tis_units": partial_metrics.Total(num_units),
    })
    return metrics if parts else partial_metrics.values(metrics)

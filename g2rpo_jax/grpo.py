"""The GRPO objective: group advantages, policy-loss variants, KL estimators and loss metrics.

Everything here is a pure `jax.numpy` function of explicit arrays, jittable with the option
arguments (strings, `beta`, `max_completion_length`) held static.

Conventions (they follow TRL's `GRPOTrainer` unless stated):
- Token arrays are [B, T] over completion positions; `mask` is 1 on real completion tokens.
- `guided_mask` is 1 on completion tokens forced from a guidance trajectory (G²RPO-A). The
  `guided` option decides how they are trained:
    `train`   like sampled tokens (the official G²RPO-A code);
    `mask`    excluded from the loss, the KL and every normaliser;
    `shaping` LUFFY-style: objective A * p / (p + shaping_gamma) with p = exp(logprobs), no
              ratio to the old policy and no clipping; the KL term still applies.
  The tokens that enter the loss ("loss tokens") are `mask`, minus guided tokens under `mask`.
- A row without loss tokens counts as absent (padding rows of a static-shape batch, or a fully
  guided row under `guided="mask"`): it adds nothing to the loss and is not counted as a sequence
  in the `grpo` and `dr_grpo` normalisers. TRL counts every row; the two agree whenever every row
  has a loss token.

Exact gradient accumulation: every loss is `numerator / normalizer`, where the numerator is a sum
over sequences and the normaliser depends only on masks. The train step computes
`loss_normalizer(...)` once on the full (global) batch and passes it as `normalizer=` to each
micro-batch; the micro-batch losses (and their gradients) then sum exactly to the full-batch ones.
Micro-batch metrics combine exactly with `combine_metrics`.

`sft` is the supervised baseline the paper compares against: the same token-mean reduction as
`dapo` over -log p of each completion token (reference trajectories, in the training loop), with no
importance ratio or advantage; the KL term still applies when beta > 0.

Objective options beyond the G²RPO-A paper (each off by default; off reproduces the plain loss
bit for bit, r is the importance ratio, A the advantage, "loss tokens" as above):
- `dual_clip_c` c > 1 (dual-clip PPO, Ye et al. 2020, arXiv 1912.09729): for A < 0 the per-token
  objective is max(min(r·A, clip(r)·A), c·A), so a bad token whose ratio has grown past c stops
  pushing. Equals TRL's two-sided `delta` (ratio capped at delta) whenever c >= 1 + epsilon_high.
- `kl_clamp` k > 0 (as verl clamps its low-variance KL): the per-token KL estimator enters the loss
  as clip(KL, -k, k); the `kl` metric still reports the unclamped estimator.
- `entropy_coef` h > 0: subtracts h × the entropy of the policy on each loss token, reduced with the
  loss type's own reduction and normaliser (verl's entropy bonus), so accumulation stays exact.
- `policy_mask` (the train step's `entropy_top_fraction` q < 1, "Beyond the 80/20 Rule", Wang et al.
  2025, arXiv 2506.01939): the policy term is kept only on the top-q loss tokens by entropy, chosen by
  `high_entropy_mask` over the whole (global) batch; the KL and entropy terms and the normalisers
  still cover every loss token, as in TRL's `top_entropy_quantile`.
- `guide_nll_coef` λ > 0 (UFT, Liu et al. 2025, arXiv 2505.16984): adds λ × the mean negative
  log-likelihood of the forced guide tokens (every completion token with `guided_mask`, whatever
  `guided` is), normalised by the global guide-token count (`guide_token_count`).
- `group_advantages(..., baseline="guided_split")`: guided and unguided rollouts of a group get
  separate means (and stds for scale="group"); a side whose rewards are all equal (one rollout, or
  no spread) gets advantage 0, like a constant group.
- `tis_weights` w (truncated importance sampling, TIS: Yao et al. 2025, "Your Efficient RL
  Framework Secretly Brings You Off-Policy RL Training", fengyao.notion.site/off-policy-rl): the
  sampler may compute other probabilities than the trainer (bf16 sampling, f32 training), so the
  rollouts come from π_sampler, not from π_old. Each token's policy term (the clipped surrogate, or
  -log p for `sft`) is multiplied by w, with no gradient through w; the KL term, the entropy bonus
  and the guide NLL are not weighted. `truncated_importance_weights` gives, with s = sampled
  completion tokens (not forced guide tokens, not padding) and C the cap,
    token level     w_t = min(exp(log π_old_t - log π_sampler_t), C) on s, 1 elsewhere;
    sequence level  w = min(exp(Σ_{t in s} (log π_old_t - log π_sampler_t)), C) on every token of
                    the row.
  `mismatch_metrics` reports the sampler/trainer drift over s and the weights' statistics.

`bnpo` and `dapo` have the same formula here (token sum over the global batch's loss-token count).
TRL's `bnpo` normalises by the tokens of each micro-batch (so it depends on the split) while its
`dapo` uses the global count; with a global normaliser both are exact, and the names are kept so
configs from either code base mean the same loss.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from g2rpo_jax import partial_metrics
from g2rpo_jax.advantages import (  # noqa: F401  (re-exported: part of the objective's API)
    ADVANTAGE_BASELINES, ADVANTAGE_SCALES, group_advantages, zero_std_groups)
from g2rpo_jax.numerics import as_float, check_option, safe_divide
from g2rpo_jax.sampler_mismatch import (  # noqa: F401  (re-exported: part of the objective's API)
    IMPORTANCE_LEVELS, MISMATCH_KEYS, TIS_KEYS, TIS_LEVELS, mismatch_metrics, truncated_importance_weights)

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "sft")
KL_ESTIMATORS = ("k1", "k2", "k3")
GUIDED_MODES = ("train", "mask", "shaping")

# Keys of the metrics dict returned by `policy_loss`, in order.
METRIC_KEYS = (
    "loss", "kl", "clip_ratio/low", "clip_ratio/high", "clip_ratio/region", "clip_ratio/dual",
    "guided_token_share", "guide_nll", "advantage/mean", "completion_length/mean", "advantage/std",
    "completion_length/min", "completion_length/max", "num_loss_tokens", "num_completion_tokens",
    "num_sequences", "num_guided_tokens",
)



# ----------------------------------------------------------------------------- the loss


def _check_loss_options(
    loss_type: str, kl: str, guided: str, importance_level: str, max_completion_length
) -> None:
    check_option("loss_type", loss_type, LOSS_TYPES)
    check_option("kl", kl, KL_ESTIMATORS)
    check_option("guided", guided, GUIDED_MODES)
    check_option("importance_level", importance_level, IMPORTANCE_LEVELS)
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError(
            "loss_type='dr_grpo' needs max_completion_length (its constant normaliser is "
            "sequences × max_completion_length); got max_completion_length=None"
        )
    if max_completion_length is not None and max_completion_length < 1:
        raise ValueError(f"max_completion_length={max_completion_length} must be a positive integer")


def _check_objective_options(dual_clip_c, kl_clamp, entropy_coef, guide_nll_coef) -> None:
    if not (dual_clip_c == 0 or dual_clip_c > 1):
        raise ValueError(f"dual_clip_c={dual_clip_c!r} is not valid; expected 0 (off) or a number > 1")
    for name, value in (("kl_clamp", kl_clamp), ("entropy_coef", entropy_coef), ("guide_nll_coef", guide_nll_coef)):
        if not value >= 0:
            raise ValueError(f"{name}={value!r} is not valid; expected 0 (off) or a number > 0")


def _token_masks(
    mask: jax.Array, guided_mask: Optional[jax.Array], guided: str
) -> tuple[jax.Array, jax.Array]:
    """(loss-token mask, guided mask restricted to completion tokens), both float [B, T]."""
    completion = as_float(mask) > 0
    guide = completion & (as_float(guided_mask) > 0) if guided_mask is not None else jnp.zeros_like(completion)
    loss_tokens = completion & ~guide if guided == "mask" else completion
    return loss_tokens.astype(jnp.float32), guide.astype(jnp.float32)


def _normalizer_from_loss_tokens(
    loss_type: str, loss_tokens: jax.Array, max_completion_length: Optional[int]
) -> jax.Array:
    if loss_type in ("bnpo", "dapo", "sft"):
        return loss_tokens.sum()
    num_sequences = (loss_tokens.sum(axis=1) > 0).sum().astype(jnp.float32)
    if loss_type == "grpo":
        return num_sequences
    return num_sequences * max_completion_length  # dr_grpo


def loss_normalizer(
    loss_type: str,
    mask: jax.Array,
    max_completion_length: Optional[int] = None,
    *,
    guided_mask: Optional[jax.Array] = None,
    guided: str = "train",
) -> jax.Array:
    """Scalar denominator of `policy_loss` for the batch described by `mask` [B, T].

    Compute it once on the full (global) batch and pass it to every micro-batch's `policy_loss`
    as `normalizer=`: the micro-batch losses then sum to the full-batch loss. It is the number of
    sequences (grpo), the number of loss tokens (bnpo, dapo) or sequences × max_completion_length
    (dr_grpo), counting only rows and tokens that enter the loss.
    """
    _check_loss_options(loss_type, "k3", guided, "token", max_completion_length)
    chex.assert_rank(mask, 2)
    if guided_mask is not None:
        chex.assert_equal_shape([mask, guided_mask])
    loss_tokens, _ = _token_masks(mask, guided_mask, guided)
    return _normalizer_from_loss_tokens(loss_type, loss_tokens, max_completion_length)


def loss_token_mask(mask: jax.Array, guided_mask: Optional[jax.Array] = None, guided: str = "train") -> jax.Array:
    """float [B, T]: 1 on the tokens that enter `policy_loss` (completion tokens, minus guided
    tokens under guided="mask"), for `high_entropy_mask`."""
    check_option("guided", guided, GUIDED_MODES)
    return _token_masks(mask, guided_mask, guided)[0]


def guide_token_count(mask: jax.Array, guided_mask: Optional[jax.Array]) -> jax.Array:
    """Scalar: the number of forced guide tokens among the completion tokens of `mask` [B, T].

    The denominator of the `guide_nll_coef` term: compute it once on the global batch and pass it
    to every micro-batch's `policy_loss` as `guide_normalizer=`, like `loss_normalizer`.
    """
    return _token_masks(mask, guided_mask, "train")[1].sum()


def high_entropy_mask(entropy: jax.Array, loss_tokens: jax.Array, top_fraction: float) -> jax.Array:
    """bool, shaped like `entropy`: the loss tokens whose entropy is among the top `top_fraction`.

    entropy, loss_tokens: same shape (e.g. [B, T], or [k, B/k, T] micro-batches); the ranking runs
    over all their entries, so pass the whole (global) batch for a selection that does not depend
    on the micro-batch split. With n loss tokens the threshold is the k-th largest entropy,
    k = 1 + floor(top_fraction · (n - 1)) (at least one token; all of them at 1), and every loss
    token with entropy >= the threshold is kept, ties included. This is the count of TRL's
    `get_high_entropy_mask` (a linearly interpolated quantile at 1 - top_fraction); k is computed
    in float32, so above 2**24 tokens it may be one off. "Beyond the 80/20 Rule" (arXiv 2506.01939)
    uses top_fraction = 0.2.
    """
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction={top_fraction!r} is not valid; expected a number in (0, 1]")
    chex.assert_equal_shape([entropy, loss_tokens])
    is_loss_token = as_float(loss_tokens) > 0
    values = jnp.where(is_loss_token, as_float(entropy), -jnp.inf).reshape(-1)
    count = is_loss_token.sum().astype(jnp.float32)
    keep = 1 + jnp.floor(jnp.float32(top_fraction) * (count - 1)).astype(jnp.int32)
    # Ascending sort: the k-th largest sits k places from the end; n = 0 selects nothing anyway.
    ordered = jnp.sort(values)
    threshold = ordered[jnp.clip(values.shape[0] - keep, 0, values.shape[0] - 1)]
    return is_loss_token & (as_float(entropy) >= threshold)


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, kl: str = "k3") -> jax.Array:
    """Per-token estimator of KL(policy || reference) from sampled-token log-probs, [B, T].

    k1 = log p - log q;  k2 = (log p - log q)^2 / 2;  k3 = q/p - log(q/p) - 1 (Schulman's
    unbiased, non-negative estimator, the one GRPO uses).
    """
    check_option("kl", kl, KL_ESTIMATORS)
    log_ratio = logprobs - ref_logprobs  # [B, T]  log(p / q)
    if kl == "k1":
        return log_ratio
    if kl == "k2":
        return 0.5 * jnp.square(log_ratio)
    return jnp.exp(-log_ratio) + log_ratio - 1.0


def _masked_sequence_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Per-row weighted mean [B] of values [B, T]; 0 for rows with no weight."""
    return safe_divide((values * weights).sum(axis=1), weights.sum(axis=1))


def _skips_kl(beta) -> bool:
    """beta is a Python 0: the KL term is left out of the program (a traced beta always keeps it)."""
    return isinstance(beta, (int, float)) and beta == 0


def _check_policy_loss_inputs(logprobs, old_logprobs, ref_logprobs, advantages, mask, guided_mask, entropy,
                              policy_mask, tis_weights, *, loss_type, kl, guided, importance_level,
                              max_completion_length, beta, dual_clip_c, kl_clamp, entropy_coef, guide_nll_coef):
    """`policy_loss`'s option values and array shapes; raises ValueError (or chex's AssertionError)."""
    _check_loss_options(loss_type, kl, guided, importance_level, max_completion_length)
    _check_objective_options(dual_clip_c, kl_clamp, entropy_coef, guide_nll_coef)
    chex.assert_rank([logprobs, mask, advantages], [2, 2, 1])
    chex.assert_equal_shape([logprobs, old_logprobs, mask])
    chex.assert_equal_shape_prefix([logprobs, advantages], 1)
    if guided_mask is not None:
        chex.assert_equal_shape([logprobs, guided_mask])
    if entropy_coef and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs the per-token entropy; got entropy=None")
    for name, array in (("entropy", entropy), ("policy_mask", policy_mask), ("tis_weights", tis_weights)):
        if array is not None:
            chex.assert_equal_shape([logprobs, array])
    if ref_logprobs is None and not _skips_kl(beta):
        raise ValueError(f"ref_logprobs=None needs beta=0 (no KL term); got beta={beta}")
    if ref_logprobs is not None:
        chex.assert_equal_shape([logprobs, ref_logprobs])


def _importance_ratio(logprobs, old_logprobs, ratio_tokens, importance_level: str, log_ratio_clamp: float):
    """[B, T] importance ratios π/π_old: per token, or (GSPO) the exp of each sequence's mean token
    log-ratio over `ratio_tokens`; the log-ratio is clamped to ±log_ratio_clamp before exp."""
    # Padding positions may hold arbitrary values: zero them before exp so no NaN can leak.
    token_log_ratio = jnp.where(ratio_tokens, logprobs - as_float(old_logprobs), 0.0)  # [B, T]
    if importance_level == "sequence":
        sequence_log_ratio = _masked_sequence_mean(token_log_ratio, ratio_tokens.astype(jnp.float32))
        log_weight = jnp.broadcast_to(sequence_log_ratio[:, None], token_log_ratio.shape)  # [B, T]
    else:
        log_weight = token_log_ratio
    return jnp.exp(jnp.clip(log_weight, -log_ratio_clamp, log_ratio_clamp))


def _clipped_surrogate(ratio, adv, epsilon_low: float, epsilon_high: float, dual_clip_c: float):
    """[B, T] PPO's clipped objective min(r·A, clip(r, 1-ε_low, 1+ε_high)·A), with dual clip for A < 0."""
    clipped_ratio = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    # Pessimistic bound: the min of the two surrogates, for either sign of the advantage.
    objective = jnp.minimum(ratio * adv, clipped_ratio * adv)
    if dual_clip_c:
        # Dual clip: for A < 0 the pessimistic min is unbounded below as the ratio grows; c·A caps it.
        objective = jnp.where(adv < 0, jnp.maximum(objective, dual_clip_c * adv), objective)
    return objective


def _clip_flags(ratio_tokens, ratio, adv, epsilon_low: float, epsilon_high: float, dual_clip_c: float) -> dict:
    """bool [B, T] per clip kind: low (r < 1-ε_low, A < 0), high (r > 1+ε_high, A > 0), their union,
    and dual (r > c, A < 0, where the dual bound holds the objective flat)."""
    low = ratio_tokens & (ratio < 1.0 - epsilon_low) & (adv < 0)
    high = ratio_tokens & (ratio > 1.0 + epsilon_high) & (adv > 0)
    dual = ratio_tokens & (ratio > dual_clip_c) & (adv < 0) if dual_clip_c else jnp.zeros_like(low)
    return {"low": low, "high": high, "region": low | high, "dual": dual}


# Long only through its signature and docstring: each option of the objective is a keyword argument,
# documented here once; the body is the short sequence of helpers above.
def policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    ref_logprobs: Optional[jax.Array],
    advantages: jax.Array,
    mask: jax.Array,
    *,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.04,
    kl: str = "k3",
    guided_mask: Optional[jax.Array] = None,
    guided: str = "train",
    max_completion_length: Optional[int] = None,
    importance_level: str = "token",
    shaping_gamma: float = 0.1,
    log_ratio_clamp: float = 20.0,
    normalizer: Optional[jax.Array] = None,
    dual_clip_c: float = 0.0,
    kl_clamp: float = 0.0,
    entropy: Optional[jax.Array] = None,
    entropy_coef: float = 0.0,
    policy_mask: Optional[jax.Array] = None,
    guide_nll_coef: float = 0.0,
    guide_normalizer: Optional[jax.Array] = None,
    tis_weights: Optional[jax.Array] = None,
    parts: bool = False,
) -> tuple[jax.Array, dict]:
    """Clipped GRPO surrogate loss (to minimise) with an optional KL penalty, and its metrics.

    Args:
      logprobs, old_logprobs, ref_logprobs: [B, T] log-probs of the completion tokens under the
        policy being trained, the policy that sampled them and the frozen reference.
        `ref_logprobs` may be None when `beta == 0` (the KL metric is then 0).
      advantages: [B], one per sequence.
      mask: [B, T], 1 on completion tokens.
      loss_type: how per-token losses are reduced, one of LOSS_TYPES (see module docstring).
      epsilon_low, epsilon_high: the ratio is clipped to [1 - epsilon_low, 1 + epsilon_high].
      beta: weight of the per-token KL term; 0 skips it. Keep it a Python number under jit.
      kl: KL estimator, one of KL_ESTIMATORS.
      guided_mask: [B, T], 1 on tokens forced from a guidance trajectory; None = no guidance.
      guided: treatment of guided tokens, one of GUIDED_MODES.
      max_completion_length: the constant length of the `dr_grpo` normaliser.
      importance_level: `token` (PPO/GRPO) or `sequence` (GSPO: the masked mean of the token
        log-ratios of a sequence, shared by all its tokens; guided tokens under `shaping` have no
        ratio and are left out of that mean).
      shaping_gamma: γ of the `shaping` weight p / (p + γ).
      log_ratio_clamp: the log importance weight is clamped to ±this before exp, for safety.
      normalizer: the loss denominator; None computes it from these inputs (full-batch use).
        Pass `loss_normalizer(...)` of the global batch when this call sees one micro-batch.
      dual_clip_c: 0 (off) or c > 1: for A < 0 the objective is max(min(r·A, clip(r)·A), c·A).
      kl_clamp: 0 (off) or k > 0: the per-token KL enters the loss as clip(KL, -k, k).
      entropy: [B, T] per-token entropy of the policy (differentiable), needed when entropy_coef > 0.
      entropy_coef: 0 (off) or h > 0: h × entropy is subtracted from each loss token's loss.
      policy_mask: [B, T] or None; where 0, a loss token keeps its KL and entropy terms but loses
        its policy term (the surrogate, or -log p for `sft`). See `high_entropy_mask`.
      guide_nll_coef: 0 (off) or λ > 0: adds λ × Σ(-log p over guide tokens) / guide_normalizer.
      guide_normalizer: that term's denominator; None = this call's guide-token count. Pass
        `guide_token_count(...)` of the global batch when this call sees one micro-batch.
      tis_weights: [B, T] truncated importance weights (`truncated_importance_weights`) or None
        (off). They multiply each loss token's policy term only (not the KL term, the entropy
        bonus or the guide NLL) and carry no gradient; values off the loss tokens are ignored.
      The option values (dual_clip_c, kl_clamp, entropy_coef, guide_nll_coef) must be Python
      numbers under jit, like beta: 0 removes the term from the program.
      parts: False gives the metrics as float32 scalars; True as `partial_metrics` parts, which
        `combine_metrics` merges over micro-batches exactly.

    Returns:
      (loss, metrics). metrics["loss"] equals loss. The other metrics describe this call's rows:
      `kl` (unclamped) and `clip_ratio/{low,high,region,dual}` are means over loss tokens (low:
      ratio below 1 - epsilon_low with A < 0, high: ratio above 1 + epsilon_high with A > 0,
      dual: ratio above dual_clip_c with A < 0, where the dual bound holds the objective flat;
      guided tokens under `shaping` are never clipped); `guided_token_share` is the guided
      fraction of completion tokens; `guide_nll` the mean -log p over the `num_guided_tokens`
      guide tokens; `advantage/{mean,std}` (population std) and
      `completion_length/{mean,min,max}` run over rows with at least one completion token;
      `num_loss_tokens`, `num_completion_tokens` and `num_sequences` are the counts behind them.
      `combine_metrics` merges the metrics of micro-batches exactly.
    """
    _check_policy_loss_inputs(logprobs, old_logprobs, ref_logprobs, advantages, mask, guided_mask, entropy,
                              policy_mask, tis_weights, loss_type=loss_type, kl=kl, guided=guided,
                              importance_level=importance_level, max_completion_length=max_completion_length,
                              beta=beta, dual_clip_c=dual_clip_c, kl_clamp=kl_clamp, entropy_coef=entropy_coef,
                              guide_nll_coef=guide_nll_coef)
    skip_kl = _skips_kl(beta)
    logprobs = as_float(logprobs)
    advantages = as_float(advantages)
    loss_tokens, guide = _token_masks(mask, guided_mask, guided)  # [B, T] each
    is_loss_token = loss_tokens > 0
    shaped = (guide > 0) & is_loss_token if guided == "shaping" else jnp.zeros_like(is_loss_token)
    ratio_tokens = is_loss_token & ~shaped  # [B, T] tokens with an importance ratio

    ratio = _importance_ratio(logprobs, old_logprobs, ratio_tokens, importance_level, log_ratio_clamp)  # [B, T]
    adv = advantages[:, None]  # [B, 1]
    objective = _clipped_surrogate(ratio, adv, epsilon_low, epsilon_high, dual_clip_c)  # [B, T]
    if guided == "shaping":
        prob = jnp.exp(jnp.where(shaped, logprobs, 0.0))
        objective = jnp.where(shaped, adv * prob / (prob + shaping_gamma), objective)
    per_token_loss = -objective
    if loss_type == "sft":
        # The supervised baseline: the completion's negative log-likelihood; no ratio, no advantage.
        per_token_loss, ratio_tokens = -logprobs, jnp.zeros_like(ratio_tokens)
    if tis_weights is not None:
        # A constant per token (no gradient). 1 off the loss tokens: padding may hold anything, and
        # an inf there would turn the zero gradient of a masked token into a NaN.
        weights = jnp.where(is_loss_token, jax.lax.stop_gradient(as_float(tis_weights)), 1.0)
        per_token_loss = per_token_loss * weights
    if policy_mask is not None:
        per_token_loss = jnp.where(as_float(policy_mask) > 0, per_token_loss, 0.0)
    if entropy_coef:
        per_token_loss = per_token_loss - entropy_coef * jnp.where(is_loss_token, as_float(entropy), 0.0)

    per_token_kl = jnp.zeros_like(logprobs)  # [B, T]
    if ref_logprobs is not None:
        # Both sides zeroed off the loss tokens, so padding gives a KL of exactly 0.
        per_token_kl = kl_penalty(
            jnp.where(is_loss_token, logprobs, 0.0), jnp.where(is_loss_token, as_float(ref_logprobs), 0.0), kl)
        if not skip_kl:
            kl_term = jnp.clip(per_token_kl, -kl_clamp, kl_clamp) if kl_clamp else per_token_kl
            per_token_loss = per_token_loss + beta * kl_term
    per_token_loss = jnp.where(is_loss_token, per_token_loss, 0.0)  # [B, T]

    if loss_type == "grpo":
        numerator = _masked_sequence_mean(per_token_loss, loss_tokens).sum()
    else:
        numerator = per_token_loss.sum()
    if normalizer is None:
        normalizer = _normalizer_from_loss_tokens(loss_type, loss_tokens, max_completion_length)
    loss = safe_divide(numerator, jnp.asarray(normalizer, jnp.float32))

    # Guide tokens are completion tokens here whatever `guided` does with them in the loss.
    guide_nll_sum = jnp.where(guide > 0, -logprobs, 0.0).sum()
    if guide_nll_coef:
        if guide_normalizer is None:
            guide_normalizer = guide.sum()
        loss = loss + guide_nll_coef * safe_divide(guide_nll_sum, jnp.asarray(guide_normalizer, jnp.float32))

    metrics = _loss_metrics(
        loss=loss, per_token_kl=per_token_kl,
        clipped=_clip_flags(ratio_tokens, ratio, adv, epsilon_low, epsilon_high, dual_clip_c),
        guide_nll_sum=guide_nll_sum, loss_tokens=loss_tokens, guide=guide, completion=as_float(mask) > 0,
        advantages=advantages,
    )
    return loss, (metrics if parts else partial_metrics.values(metrics))


def _loss_metrics(*, loss, per_token_kl, clipped, guide_nll_sum, loss_tokens, guide, completion, advantages):
    """The `policy_loss` metrics as `partial_metrics` parts (each with what merging it needs)."""
    Mean, Total = partial_metrics.Mean, partial_metrics.Total
    num_loss_tokens = loss_tokens.sum()
    num_guided_tokens = guide.sum()
    completion = completion.astype(jnp.float32)
    num_completion_tokens = completion.sum()
    lengths = completion.sum(axis=1)  # [B]
    has_completion = lengths > 0  # [B]
    num_sequences = has_completion.sum().astype(jnp.float32)

    def token_mean(values):
        return Mean(safe_divide((values * loss_tokens).sum(), num_loss_tokens), num_loss_tokens)

    def sequence_mean(values):
        return Mean(safe_divide(jnp.where(has_completion, values, 0.0).sum(), num_sequences), num_sequences)

    adv_mean = sequence_mean(advantages)
    adv_var = sequence_mean(jnp.square(advantages - adv_mean.value)).value
    return {
        "loss": Total(loss),
        "kl": token_mean(per_token_kl),
        **{f"clip_ratio/{name}": token_mean(flag.astype(jnp.float32)) for name, flag in clipped.items()},
        "guided_token_share": Mean(safe_divide(num_guided_tokens, num_completion_tokens), num_completion_tokens),
        "guide_nll": Mean(safe_divide(guide_nll_sum, num_guided_tokens), num_guided_tokens),
        "advantage/mean": adv_mean,
        "completion_length/mean": sequence_mean(lengths),
        "advantage/std": partial_metrics.Spread(jnp.sqrt(adv_var), adv_mean.value, num_sequences),
        "completion_length/min": partial_metrics.Smallest(
            jnp.where(num_sequences > 0, jnp.where(has_completion, lengths, jnp.inf).min(), 0.0), num_sequences),
        "completion_length/max": partial_metrics.Largest(jnp.where(has_completion, lengths, 0.0).max()),
        "num_loss_tokens": Total(num_loss_tokens),
        "num_completion_tokens": Total(num_completion_tokens),
        "num_sequences": Total(num_sequences),
        "num_guided_tokens": Total(num_guided_tokens),
    }


def combine_metrics(per_micro_batch: dict) -> dict[str, jax.Array]:
    """Exact metrics of a whole batch from the metric parts of its micro-batches.

    `per_micro_batch` maps keys to `partial_metrics` parts whose leaves are [k] (one entry per
    micro-batch, e.g. the stacked outputs of a `lax.scan`): those of `policy_loss(...,
    parts=True)` and optionally `mismatch_metrics(..., parts=True)`, each micro-batch loss given
    the global `normalizer=`. Losses and counts add up, means are re-weighted by their counts, the
    advantage std is pooled exactly, lengths combine by min / max, the largest drift by max.
    Raises ValueError naming a value that is not a part.
    """
    return partial_metrics.merge(per_micro_batch)

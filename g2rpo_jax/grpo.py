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

import math
from typing import Optional

import chex
import jax
import jax.numpy as jnp

ADVANTAGE_SCALES = ("group", "batch", "none")
ADVANTAGE_BASELINES = ("group", "guided_split")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "sft")
KL_ESTIMATORS = ("k1", "k2", "k3")
GUIDED_MODES = ("train", "mask", "shaping")
IMPORTANCE_LEVELS = ("token", "sequence")
TIS_LEVELS = ("none", "token", "sequence")

# Keys of the metrics dict returned by `policy_loss`, grouped by how they combine over
# micro-batches (see `combine_metrics`).
_LOSS_TOKEN_MEANS = ("kl", "clip_ratio/low", "clip_ratio/high", "clip_ratio/region", "clip_ratio/dual")
_COMPLETION_TOKEN_MEANS = ("guided_token_share",)
_GUIDE_TOKEN_MEANS = ("guide_nll",)
_SEQUENCE_MEANS = ("advantage/mean", "completion_length/mean")
_COUNTS = ("num_loss_tokens", "num_completion_tokens", "num_sequences", "num_guided_tokens")
METRIC_KEYS = (
    ("loss",)
    + _LOSS_TOKEN_MEANS
    + _COMPLETION_TOKEN_MEANS
    + _GUIDE_TOKEN_MEANS
    + _SEQUENCE_MEANS
    + ("advantage/std", "completion_length/min", "completion_length/max")
    + _COUNTS
)
# Keys of `mismatch_metrics`: the drift, always; the TIS weights' statistics, when weights are given.
# Means over sampled tokens, or over "TIS units" (sampled tokens at token level, rows with a sampled
# token at sequence level), each with its count so that micro-batches combine exactly.
_SAMPLED_TOKEN_MEANS = ("mismatch/logprob_abs_diff", "mismatch/k1")
_TIS_UNIT_MEANS = ("mismatch/tis_weight_mean", "mismatch/tis_clipped_fraction")
MISMATCH_KEYS = _SAMPLED_TOKEN_MEANS + ("mismatch/logprob_max_abs_diff", "mismatch/num_sampled_tokens")
TIS_KEYS = _TIS_UNIT_MEANS + ("mismatch/num_tis_units",)


def _check_option(name: str, value, options: tuple) -> None:
    if value not in options:
        raise ValueError(f"{name}={value!r} is not valid; expected one of {options}")


def _float(x: jax.Array) -> jax.Array:
    """At least float32: losses and statistics are never accumulated in bf16 or ints."""
    return jnp.asarray(x).astype(jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, or 0 where the denominator is 0 (the numerator is then 0 too)."""
    safe = jnp.where(denominator > 0, denominator, 1)
    return jnp.where(denominator > 0, numerator / safe, 0)


# ----------------------------------------------------------------------------- advantages


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
    return _float(rewards).reshape(num // group_size, group_size)  # [N/G, G]


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
    _check_option("scale", scale, ADVANTAGE_SCALES)
    _check_option("baseline", baseline, ADVANTAGE_BASELINES)
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
        mean = _safe_divide((grouped * weights).sum(axis=1, keepdims=True), count)
        centered = grouped - mean
        if scale == "group":
            # Unbiased std of the side; a side with fewer than two rollouts is constant (zeroed below).
            variance = _safe_divide((jnp.square(centered) * weights).sum(axis=1, keepdims=True), count - 1)
            centered = centered / (jnp.sqrt(variance) + eps)
        elif scale == "batch":
            centered = centered / (batch_std + eps)
        # Exact max == min test, as in `zero_std_groups`: rounding must not leave tiny advantages.
        high = jnp.where(side, grouped, -jnp.inf).max(axis=1, keepdims=True)
        low = jnp.where(side, grouped, jnp.inf).min(axis=1, keepdims=True)
        out = jnp.where(side & (high != low), centered, out)
    return out.reshape(-1)  # [N]


# ----------------------------------------------------------------------------- the loss


def _check_loss_options(
    loss_type: str, kl: str, guided: str, importance_level: str, max_completion_length
) -> None:
    _check_option("loss_type", loss_type, LOSS_TYPES)
    _check_option("kl", kl, KL_ESTIMATORS)
    _check_option("guided", guided, GUIDED_MODES)
    _check_option("importance_level", importance_level, IMPORTANCE_LEVELS)
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
    completion = _float(mask) > 0
    guide = completion & (_float(guided_mask) > 0) if guided_mask is not None else jnp.zeros_like(completion)
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
    _check_option("guided", guided, GUIDED_MODES)
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
    is_loss_token = _float(loss_tokens) > 0
    values = jnp.where(is_loss_token, _float(entropy), -jnp.inf).reshape(-1)
    count = is_loss_token.sum().astype(jnp.float32)
    keep = 1 + jnp.floor(jnp.float32(top_fraction) * (count - 1)).astype(jnp.int32)
    # Ascending sort: the k-th largest sits k places from the end; n = 0 selects nothing anyway.
    ordered = jnp.sort(values)
    threshold = ordered[jnp.clip(values.shape[0] - keep, 0, values.shape[0] - 1)]
    return is_loss_token & (_float(entropy) >= threshold)


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, kl: str = "k3") -> jax.Array:
    """Per-token estimator of KL(policy || reference) from sampled-token log-probs, [B, T].

    k1 = log p - log q;  k2 = (log p - log q)^2 / 2;  k3 = q/p - log(q/p) - 1 (Schulman's
    unbiased, non-negative estimator, the one GRPO uses).
    """
    _check_option("kl", kl, KL_ESTIMATORS)
    log_ratio = logprobs - ref_logprobs  # [B, T]  log(p / q)
    if kl == "k1":
        return log_ratio
    if kl == "k2":
        return 0.5 * jnp.square(log_ratio)
    return jnp.exp(-log_ratio) + log_ratio - 1.0


def _masked_sequence_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Per-row weighted mean [B] of values [B, T]; 0 for rows with no weight."""
    return _safe_divide((values * weights).sum(axis=1), weights.sum(axis=1))


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
) -> tuple[jax.Array, dict[str, jax.Array]]:
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
    skip_kl = isinstance(beta, (int, float)) and beta == 0
    if ref_logprobs is None and not skip_kl:
        raise ValueError(f"ref_logprobs=None needs beta=0 (no KL term); got beta={beta}")
    if ref_logprobs is not None:
        chex.assert_equal_shape([logprobs, ref_logprobs])

    logprobs = _float(logprobs)
    advantages = _float(advantages)
    loss_tokens, guide = _token_masks(mask, guided_mask, guided)  # [B, T] each
    is_loss_token = loss_tokens > 0
    shaped = (guide > 0) & is_loss_token if guided == "shaping" else jnp.zeros_like(is_loss_token)
    ratio_tokens = is_loss_token & ~shaped  # [B, T] tokens with an importance ratio

    # Padding positions may hold arbitrary values: zero them before exp so no NaN can leak.
    token_log_ratio = jnp.where(ratio_tokens, logprobs - _float(old_logprobs), 0.0)  # [B, T]
    if importance_level == "sequence":
        sequence_log_ratio = _masked_sequence_mean(token_log_ratio, ratio_tokens.astype(jnp.float32))
        log_weight = jnp.broadcast_to(sequence_log_ratio[:, None], token_log_ratio.shape)  # [B, T]
    else:
        log_weight = token_log_ratio
    ratio = jnp.exp(jnp.clip(log_weight, -log_ratio_clamp, log_ratio_clamp))  # [B, T]
    clipped_ratio = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    adv = advantages[:, None]  # [B, 1]
    # Pessimistic bound: the min of the two surrogates, for either sign of the advantage.
    objective = jnp.minimum(ratio * adv, clipped_ratio * adv)  # [B, T]
    if dual_clip_c:
        # Dual clip: for A < 0 the pessimistic min is unbounded below as the ratio grows; c·A caps it.
        objective = jnp.where(adv < 0, jnp.maximum(objective, dual_clip_c * adv), objective)
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
        weights = jnp.where(is_loss_token, jax.lax.stop_gradient(_float(tis_weights)), 1.0)
        per_token_loss = per_token_loss * weights
    if policy_mask is not None:
        per_token_loss = jnp.where(_float(policy_mask) > 0, per_token_loss, 0.0)
    if entropy_coef:
        per_token_loss = per_token_loss - entropy_coef * jnp.where(is_loss_token, _float(entropy), 0.0)

    if ref_logprobs is not None:
        # Both sides zeroed off the loss tokens, so padding gives a KL of exactly 0.
        per_token_kl = kl_penalty(
            jnp.where(is_loss_token, logprobs, 0.0), jnp.where(is_loss_token, _float(ref_logprobs), 0.0), kl
        )  # [B, T]
        if not skip_kl:
            kl_term = jnp.clip(per_token_kl, -kl_clamp, kl_clamp) if kl_clamp else per_token_kl
            per_token_loss = per_token_loss + beta * kl_term
    else:
        per_token_kl = jnp.zeros_like(logprobs)
    per_token_loss = jnp.where(is_loss_token, per_token_loss, 0.0)  # [B, T]

    if loss_type == "grpo":
        numerator = _masked_sequence_mean(per_token_loss, loss_tokens).sum()
    else:
        numerator = per_token_loss.sum()
    if normalizer is None:
        normalizer = _normalizer_from_loss_tokens(loss_type, loss_tokens, max_completion_length)
    loss = _safe_divide(numerator, jnp.asarray(normalizer, jnp.float32))

    # Guide tokens are completion tokens here whatever `guided` does with them in the loss.
    guide_nll_sum = jnp.where(guide > 0, -logprobs, 0.0).sum()
    if guide_nll_coef:
        if guide_normalizer is None:
            guide_normalizer = guide.sum()
        loss = loss + guide_nll_coef * _safe_divide(guide_nll_sum, jnp.asarray(guide_normalizer, jnp.float32))

    low = ratio_tokens & (ratio < 1.0 - epsilon_low) & (adv < 0)
    high = ratio_tokens & (ratio > 1.0 + epsilon_high) & (adv > 0)
    dual = ratio_tokens & (ratio > dual_clip_c) & (adv < 0) if dual_clip_c else jnp.zeros_like(low)
    metrics = _loss_metrics(
        loss=loss,
        per_token_kl=per_token_kl,
        clipped={"low": low, "high": high, "region": low | high, "dual": dual},
        guide_nll_sum=guide_nll_sum,
        loss_tokens=loss_tokens,
        guide=guide,
        completion=_float(mask) > 0,
        advantages=advantages,
    )
    return loss, metrics


def _loss_metrics(*, loss, per_token_kl, clipped, guide_nll_sum, loss_tokens, guide, completion, advantages):
    num_loss_tokens = loss_tokens.sum()
    num_guided_tokens = guide.sum()
    completion = completion.astype(jnp.float32)
    num_completion_tokens = completion.sum()
    lengths = completion.sum(axis=1)  # [B]
    has_completion = lengths > 0  # [B]
    num_sequences = has_completion.sum().astype(jnp.float32)

    def token_mean(values):
        return _safe_divide((values * loss_tokens).sum(), num_loss_tokens)

    def sequence_mean(values):
        return _safe_divide(jnp.where(has_completion, values, 0.0).sum(), num_sequences)

    adv_mean = sequence_mean(advantages)
    adv_var = sequence_mean(jnp.square(advantages - adv_mean))
    metrics = {
        "loss": loss,
        "kl": token_mean(per_token_kl),
        **{f"clip_ratio/{name}": token_mean(flag.astype(jnp.float32)) for name, flag in clipped.items()},
        "guided_token_share": _safe_divide(num_guided_tokens, num_completion_tokens),
        "guide_nll": _safe_divide(guide_nll_sum, num_guided_tokens),
        "advantage/mean": adv_mean,
        "advantage/std": jnp.sqrt(adv_var),
        "completion_length/mean": sequence_mean(lengths),
        "completion_length/min": jnp.where(
            num_sequences > 0, jnp.where(has_completion, lengths, jnp.inf).min(), 0.0
        ),
        "completion_length/max": jnp.where(has_completion, lengths, 0.0).max(),
        "num_loss_tokens": num_loss_tokens,
        "num_completion_tokens": num_completion_tokens,
        "num_sequences": num_sequences,
        "num_guided_tokens": num_guided_tokens,
    }
    return metrics


def combine_metrics(per_micro_batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Exact metrics of a whole batch from the `policy_loss` metrics of its micro-batches.

    `per_micro_batch` maps each key of METRIC_KEYS to an array [k] (one entry per micro-batch,
    e.g. the stacked outputs of a `lax.scan`), optionally with all of MISMATCH_KEYS and all of
    TIS_KEYS (`mismatch_metrics`). Losses add up (each micro-batch must have been given the
    global `normalizer=`); token, sequence and TIS-unit means are re-weighted by their counts;
    the advantage std is pooled exactly; lengths combine by min / max, the largest drift by max;
    counts add up. Raises ValueError naming missing and unexpected keys.
    """
    given = set(per_micro_batch)
    keys = METRIC_KEYS + sum((group for group in (MISMATCH_KEYS, TIS_KEYS) if given & set(group)), ())
    missing, extra = set(keys) - given, given - set(keys)
    if missing or extra:
        raise ValueError(
            f"per_micro_batch keys must be exactly METRIC_KEYS={METRIC_KEYS}, optionally with all of "
            f"MISMATCH_KEYS and all of TIS_KEYS; missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    m = {key: jnp.asarray(value, jnp.float32) for key, value in per_micro_batch.items()}
    chex.assert_rank(list(m.values()), 1)
    chex.assert_equal_shape(list(m.values()))
    count_keys = _COUNTS + tuple(key for key in ("mismatch/num_sampled_tokens", "mismatch/num_tis_units") if key in m)
    counts = {key: m[key].sum() for key in count_keys}

    def reweighted(key, count_key):
        return _safe_divide((m[key] * m[count_key]).sum(), counts[count_key])

    out = {"loss": m["loss"].sum(), **counts}
    out.update({key: reweighted(key, "num_loss_tokens") for key in _LOSS_TOKEN_MEANS})
    out.update({key: reweighted(key, "num_completion_tokens") for key in _COMPLETION_TOKEN_MEANS})
    out.update({key: reweighted(key, "num_guided_tokens") for key in _GUIDE_TOKEN_MEANS})
    out.update({key: reweighted(key, "num_sequences") for key in _SEQUENCE_MEANS})
    # Pooled variance: within-part sums of squares plus between-part spread of the means.
    n = m["num_sequences"]
    sum_squares = n * jnp.square(m["advantage/std"]) + n * jnp.square(m["advantage/mean"] - out["advantage/mean"])
    out["advantage/std"] = jnp.sqrt(_safe_divide(sum_squares.sum(), counts["num_sequences"]))
    present = n > 0
    out["completion_length/min"] = jnp.where(
        counts["num_sequences"] > 0, jnp.where(present, m["completion_length/min"], jnp.inf).min(), 0.0
    )
    out["completion_length/max"] = jnp.where(present, m["completion_length/max"], 0.0).max()
    if "mismatch/num_sampled_tokens" in m:
        out.update({key: reweighted(key, "mismatch/num_sampled_tokens") for key in _SAMPLED_TOKEN_MEANS})
        out["mismatch/logprob_max_abs_diff"] = m["mismatch/logprob_max_abs_diff"].max()  # each >= 0
    if "mismatch/num_tis_units" in m:
        out.update({key: reweighted(key, "mismatch/num_tis_units") for key in _TIS_UNIT_MEANS})
    return {key: out[key] for key in keys}


# ----------------------------------------------------------------------------- sampler/trainer mismatch


_F32_MAX = float(jnp.finfo(jnp.float32).max)


def _check_tis_options(level: str, cap) -> None:
    _check_option("level", level, IMPORTANCE_LEVELS)
    if not 0 < cap <= _F32_MAX:
        raise ValueError(f"cap={cap!r} is not valid; expected a number > 0 (at most float32's max, {_F32_MAX:.4g})")


def _sampled_tokens(mask: jax.Array, guided_mask: Optional[jax.Array]) -> jax.Array:
    """bool [B, T]: the completion tokens the sampler drew (not forced guide tokens, not padding)."""
    return _token_masks(mask, guided_mask, "mask")[0] > 0


def _log_drift(old_logprobs: jax.Array, sampler_logprobs: jax.Array, sampled: jax.Array) -> jax.Array:
    """float32 [B, T], no gradient: log π_old - log π_sampler on sampled tokens, 0 elsewhere (where
    padding's arbitrary values and the guide tokens' sampler entries never reach a sum)."""
    old = jax.lax.stop_gradient(_float(old_logprobs))
    sampler = jax.lax.stop_gradient(_float(sampler_logprobs))
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
) -> dict[str, jax.Array]:
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
    Means of an empty set are 0. `combine_metrics` merges micro-batches exactly. A batch without
    sampler log-probs (`make_batch`'s zeros) compares the trainer with log-prob 0: abs_diff is
    then the trainer's mean NLL, meaningless as a drift.
    """
    chex.assert_equal_shape([old_logprobs, sampler_logprobs, mask])
    sampled = _sampled_tokens(mask, guided_mask)
    drift = _log_drift(old_logprobs, sampler_logprobs, sampled)  # [B, T], 0 off s
    num_sampled = sampled.sum().astype(jnp.float32)
    metrics = {
        "mismatch/logprob_abs_diff": _safe_divide(jnp.abs(drift).sum(), num_sampled),
        "mismatch/k1": _safe_divide(-drift.sum(), num_sampled),
        "mismatch/logprob_max_abs_diff": jnp.abs(drift).max(),
        "mismatch/num_sampled_tokens": num_sampled,
    }
    if tis_weights is None:
        return metrics
    _check_tis_options(tis_level, tis_cap)
    chex.assert_equal_shape([tis_weights, mask])
    weights = jnp.where(sampled, jax.lax.stop_gradient(_float(tis_weights)), 0.0)  # [B, T]
    if tis_level == "sequence":  # one weight per row: the same on each of its sampled tokens
        units, unit_weights = sampled.any(axis=1), weights.max(axis=1)  # [B] each
    else:
        units, unit_weights = sampled, weights
    num_units = units.sum().astype(jnp.float32)
    metrics.update({
        "mismatch/tis_weight_mean": _safe_divide(jnp.where(units, unit_weights, 0.0).sum(), num_units),
        "mismatch/tis_clipped_fraction": _safe_divide((units & (unit_weights >= tis_cap)).sum(), num_units),
        "mismatch/num_tis_units": num_units,
    })
    return metrics


# ----------------------------------------------------------------------------- entropy


def token_entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked mean over tokens of the entropy of softmax(logits), computed in float32.

    logits [B, T, V] (already divided by the sampling temperature), mask [B, T]. Returns 0 when
    the mask is empty. To combine micro-batches, weight each result by its `mask.sum()`.
    """
    chex.assert_rank([logits, mask], [3, 2])
    chex.assert_equal_shape_prefix([logits, mask], 2)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
    entropy = -(jnp.exp(log_probs) * log_probs).sum(axis=-1)  # [B, T]
    weights = _float(mask) > 0
    return _safe_divide(jnp.where(weights, entropy, 0.0).sum(), weights.sum())

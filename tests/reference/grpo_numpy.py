"""Plain numpy / Python re-derivation of the GRPO objective, written from the formulas.

Deliberately loop-based and float64 so that it shares no code or structure with
`g2rpo_jax.grpo`. Used only by tests.
"""

from __future__ import annotations

import math

import numpy as np


def group_advantages_ref(rewards, group_size, scale="group", eps=1e-4):
    rewards = [float(r) for r in rewards]
    all_std = float(np.std(rewards, ddof=1)) if len(rewards) > 1 else 0.0
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        if len(set(group)) == 1:
            out.extend([0.0] * len(group))
            continue
        mean = sum(group) / len(group)
        group_std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        for r in group:
            if scale == "group":
                out.append((r - mean) / (group_std + eps))
            elif scale == "batch":
                out.append((r - mean) / (all_std + eps))
            else:
                out.append(r - mean)
    return np.array(out)


def group_advantages_split_ref(rewards, guided, group_size, scale="group", eps=1e-4):
    """Separate baselines for the guided and the unguided rollouts of each group: each side is
    centred on its own mean and (scale="group") divided by its own unbiased std + eps; a side
    whose rewards are all equal (a single rollout included) gets 0."""
    rewards = [float(r) for r in rewards]
    all_std = float(np.std(rewards, ddof=1)) if len(rewards) > 1 else 0.0
    out = [0.0] * len(rewards)
    for start in range(0, len(rewards), group_size):
        for flag in (True, False):
            members = [i for i in range(start, start + group_size) if bool(guided[i]) == flag]
            values = [rewards[i] for i in members]
            if len(set(values)) <= 1:
                continue  # constant side (or empty): stays 0
            mean = sum(values) / len(values)
            spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            for i in members:
                if scale == "group":
                    out[i] = (rewards[i] - mean) / (spread + eps)
                elif scale == "batch":
                    out[i] = (rewards[i] - mean) / (all_std + eps)
                else:
                    out[i] = rewards[i] - mean
    return np.array(out)


def high_entropy_mask_ref(entropy, loss_tokens, top_fraction):
    """Keep a loss token when fewer than 1 + floor(q (n - 1)) loss tokens have a strictly larger
    entropy (so ties at the cut are all kept); n counts the loss tokens of the whole array."""
    entropy = np.asarray(entropy, np.float64)
    flat_tokens = [i for i, use in enumerate(np.ravel(loss_tokens)) if use > 0]
    flat_entropy = np.ravel(entropy)
    n = len(flat_tokens)
    keep = np.zeros(entropy.size, bool)
    if n == 0:
        return keep.reshape(entropy.shape)
    budget = 1 + math.floor(top_fraction * (n - 1))
    for i in flat_tokens:
        larger = sum(1 for j in flat_tokens if flat_entropy[j] > flat_entropy[i])
        keep[i] = larger < budget
    return keep.reshape(entropy.shape)


def _kl_value(logp, ref, kl):
    if kl == "k1":
        return logp - ref
    if kl == "k2":
        return 0.5 * (logp - ref) ** 2
    return math.exp(ref - logp) - (ref - logp) - 1.0


def policy_loss_ref(
    logprobs,
    old_logprobs,
    ref_logprobs,
    advantages,
    mask,
    *,
    loss_type="grpo",
    epsilon_low=0.2,
    epsilon_high=0.2,
    beta=0.04,
    kl="k3",
    guided_mask=None,
    guided="train",
    max_completion_length=None,
    importance_level="token",
    shaping_gamma=0.1,
    log_ratio_clamp=20.0,
    dual_clip_c=0.0,
    kl_clamp=0.0,
    entropy=None,
    entropy_coef=0.0,
    policy_mask=None,
    guide_nll_coef=0.0,
    tis_weights=None,
):
    """Returns (loss, metrics) with the same metric names as the library.

    Options beyond plain GRPO, from their papers: dual clip (for A < 0 the token objective never
    drops below c·A), a clamp of the KL value that enters the loss, an entropy bonus on every
    loss token, a 0/1 policy mask on the policy term only, lambda × the mean NLL of the guide
    tokens added to the loss, and truncated importance weights (a constant per token) that scale
    the policy term only."""
    logprobs = np.asarray(logprobs, np.float64)
    old_logprobs = np.asarray(old_logprobs, np.float64)
    advantages = np.asarray(advantages, np.float64)
    num_rows, num_cols = logprobs.shape
    if guided_mask is None:
        guided_mask = np.zeros((num_rows, num_cols))

    seq_token_losses = []  # per row: list of per-token losses of its loss tokens
    kl_values, low_flags, high_flags, dual_flags = [], [], [], []
    for b in range(num_rows):
        a = advantages[b]
        # Which tokens enter the loss, and which of those are LUFFY-shaped.
        in_loss, is_shaped = [], []
        for t in range(num_cols):
            is_completion = mask[b, t] > 0
            is_guided = is_completion and guided_mask[b, t] > 0
            use = is_completion and not (guided == "mask" and is_guided)
            in_loss.append(use)
            is_shaped.append(use and guided == "shaping" and is_guided)
        # GSPO: one log-ratio per sequence, the mean over tokens that carry a ratio.
        ratio_log_ratios = [
            logprobs[b, t] - old_logprobs[b, t] for t in range(num_cols) if in_loss[t] and not is_shaped[t]
        ]
        seq_log_ratio = sum(ratio_log_ratios) / len(ratio_log_ratios) if ratio_log_ratios else 0.0

        token_losses = []
        for t in range(num_cols):
            if not in_loss[t]:
                continue
            if loss_type == "sft":  # negative log-likelihood, no ratio and no clipping
                objective = logprobs[b, t]
                low_flags.append(0.0)
                high_flags.append(0.0)
            elif is_shaped[t]:
                p = math.exp(logprobs[b, t])
                objective = a * p / (p + shaping_gamma)
            else:
                if importance_level == "token":
                    log_w = logprobs[b, t] - old_logprobs[b, t]
                else:
                    log_w = seq_log_ratio
                log_w = max(-log_ratio_clamp, min(log_ratio_clamp, log_w))
                r = math.exp(log_w)
                r_clip = max(1.0 - epsilon_low, min(1.0 + epsilon_high, r))
                objective = min(r * a, r_clip * a)
                low_flags.append(1.0 if (r < 1.0 - epsilon_low and a < 0) else 0.0)
                high_flags.append(1.0 if (r > 1.0 + epsilon_high and a > 0) else 0.0)
                floor = dual_clip_c * a
                held = bool(dual_clip_c) and a < 0 and objective < floor
                dual_flags.append(1.0 if held else 0.0)
                if held:
                    objective = floor
            if loss_type == "sft" or is_shaped[t]:
                dual_flags.append(0.0)
            if is_shaped[t] and loss_type != "sft":
                low_flags.append(0.0)
                high_flags.append(0.0)
            token_loss = -objective
            if tis_weights is not None:  # TIS: the policy term only; KL, entropy, guide NLL unweighted
                token_loss *= float(tis_weights[b, t])
            if policy_mask is not None and not policy_mask[b, t] > 0:
                token_loss = 0.0
            if entropy_coef:
                token_loss -= entropy_coef * float(entropy[b, t])
            if ref_logprobs is not None:
                kl_value = _kl_value(logprobs[b, t], float(ref_logprobs[b, t]), kl)
                kl_values.append(kl_value)
                if kl_clamp:
                    kl_value = max(-kl_clamp, min(kl_clamp, kl_value))
                token_loss += beta * kl_value
            else:
                kl_values.append(0.0)
            token_losses.append(token_loss)
        seq_token_losses.append(token_losses)

    nonempty = [losses for losses in seq_token_losses if losses]
    total_tokens = sum(len(losses) for losses in nonempty)
    if not nonempty:
        loss = 0.0
    elif loss_type == "grpo":
        loss = sum(sum(losses) / len(losses) for losses in nonempty) / len(nonempty)
    elif loss_type in ("bnpo", "dapo", "sft"):
        loss = sum(sum(losses) for losses in nonempty) / total_tokens
    elif loss_type == "dr_grpo":
        loss = sum(sum(losses) for losses in nonempty) / (len(nonempty) * max_completion_length)
    else:
        raise ValueError(loss_type)

    def mean(values):
        return sum(values) / len(values) if values else 0.0

    guide_nlls = [
        -logprobs[b, t] for b in range(num_rows) for t in range(num_cols) if mask[b, t] > 0 and guided_mask[b, t] > 0
    ]
    loss += guide_nll_coef * mean(guide_nlls)

    lengths = [float(np.sum(np.asarray(mask[b]) > 0)) for b in range(num_rows)]
    rows = [b for b in range(num_rows) if lengths[b] > 0]
    row_adv = [advantages[b] for b in rows]
    adv_mean = mean(row_adv)
    completion_tokens = sum(lengths)
    guided_tokens = sum(
        1.0 for b in range(num_rows) for t in range(num_cols) if mask[b, t] > 0 and guided_mask[b, t] > 0
    )
    metrics = {
        "loss": loss,
        "kl": mean(kl_values),
        "clip_ratio/low": mean(low_flags),
        "clip_ratio/high": mean(high_flags),
        "clip_ratio/region": mean([max(lo, hi) for lo, hi in zip(low_flags, high_flags)]),
        "clip_ratio/dual": mean(dual_flags),
        "guided_token_share": guided_tokens / completion_tokens if completion_tokens else 0.0,
        "guide_nll": mean(guide_nlls),
        "advantage/mean": adv_mean,
        "advantage/std": math.sqrt(mean([(x - adv_mean) ** 2 for x in row_adv])),
        "completion_length/mean": mean([lengths[b] for b in rows]),
        "completion_length/min": min([lengths[b] for b in rows], default=0.0),
        "completion_length/max": max([lengths[b] for b in rows], default=0.0),
        "num_loss_tokens": float(total_tokens),
        "num_completion_tokens": completion_tokens,
        "num_sequences": float(len(rows)),
        "num_guided_tokens": float(len(guide_nlls)),
    }
    return loss, metrics


def _sampled_positions(mask, guided_mask, b):
    """Columns of row b that the sampler drew: completion tokens that are not forced guide tokens."""
    return [t for t in range(mask.shape[1]) if mask[b, t] > 0 and not guided_mask[b, t] > 0]


def tis_weights_ref(old_logprobs, sampler_logprobs, mask, guided_mask, level="token", cap=2.0):
    """Truncated importance weights (Yao et al. 2025) from their formula, float64 [B, T]:
    token w_t = min(exp(old_t - sampler_t), C); sequence w = min(exp(sum over the row's sampled
    tokens of old_t - sampler_t), C) on its sampled tokens; 1 on guide tokens and padding. The
    cap is tested on the exponent (x >= log C gives C), so exp never sees a huge x."""
    old = np.asarray(old_logprobs, np.float64)
    sampler = np.asarray(sampler_logprobs, np.float64)
    weights = np.ones(old.shape)
    log_cap = math.log(cap)

    def truncated(x):
        return cap if x >= log_cap else math.exp(x)

    for b in range(old.shape[0]):
        sampled = _sampled_positions(mask, guided_mask, b)
        if level == "token":
            for t in sampled:
                weights[b, t] = truncated(old[b, t] - sampler[b, t])
        else:
            row_weight = truncated(sum(old[b, t] - sampler[b, t] for t in sampled))
            for t in sampled:
                weights[b, t] = row_weight
    return weights


def mismatch_metrics_ref(old_logprobs, sampler_logprobs, mask, guided_mask, tis_weights=None,
                         level="token", cap=2.0):
    """The drift over sampled tokens (mean and max |old - sampler|, mean sampler - old) and, given
    weights, their mean and the share at the cap over units: tokens, or rows with a sampled token."""
    old = np.asarray(old_logprobs, np.float64)
    sampler = np.asarray(sampler_logprobs, np.float64)
    drifts, unit_weights = [], []
    for b in range(old.shape[0]):
        sampled = _sampled_positions(mask, guided_mask, b)
        drifts.extend(old[b, t] - sampler[b, t] for t in sampled)
        if tis_weights is not None:
            row = [float(tis_weights[b, t]) for t in sampled]
            unit_weights.extend(row if level == "token" else row[:1])

    def mean(values):
        return sum(values) / len(values) if values else 0.0

    metrics = {
        "mismatch/logprob_abs_diff": mean([abs(d) for d in drifts]),
        "mismatch/logprob_max_abs_diff": max([abs(d) for d in drifts], default=0.0),
        "mismatch/k1": mean([-d for d in drifts]),
        "mismatch/num_sampled_tokens": float(len(drifts)),
    }
    if tis_weights is not None:
        metrics["mismatch/tis_weight_mean"] = mean(unit_weights)
        metrics["mismatch/tis_clipped_fraction"] = mean([1.0 if w >= cap else 0.0 for w in unit_weights])
        metrics["mismatch/num_tis_units"] = float(len(unit_weights))
    return metrics


def loss_grad_fd(fn, logprobs, step=1e-6):
    """Central finite differences of the scalar fn(logprobs) w.r.t. every entry, float64."""
    logprobs = np.asarray(logprobs, np.float64)
    grad = np.zeros_like(logprobs)
    for index in np.ndindex(logprobs.shape):
        plus, minus = logprobs.copy(), logprobs.copy()
        plus[index] += step
        minus[index] -= step
        grad[index] = (fn(plus) - fn(minus)) / (2 * step)
    return grad

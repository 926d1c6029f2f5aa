"""The GRPO / G²RPO-A train step: one jitted function from a rollout batch to an updated state.

Inside one step:
  1. group advantages from the batch's rewards (groups are G consecutive rows);
  2. reference log-probs (one no-grad forward of the frozen reference per micro-batch, skipped when
     beta = 0) and, when num_iterations μ > 1, the old policy's log-probs before the first update;
  3. μ optimizer updates, each accumulating gradients over micro-batches with `lax.scan`; every
     micro-batch loss is divided by the normaliser of the whole batch, so the summed gradient is
     exactly the full-batch gradient;
  4. the guidance-schedule update from the step's mean reward (with guidance.per_problem, also
     each group's problem's schedule from the group's mean reward), and metrics.

When the sampler ran in other numerics than the step (`sampling.dtype`), the batch's sampler
log-probs differ from the step's own: the drift is logged (`mismatch/*`) and `step.tis` corrects
the policy term with truncated importance weights (`grpo.truncated_importance_weights`).

An update whose loss or gradient is not finite is skipped: params and optimizer state stay as
they were (so the learning-rate schedule does not advance either), the guidance schedule keeps
its state when any of the step's updates was skipped, and the metric `skipped_nonfinite` is 1.
The step counter still advances: the batch is consumed, and the loop counts skips in a row.

The batch (`RolloutBatch`) and its micro-batch layout are defined in `rollout_batch`. Each stage
is a module-level function of a `StepPlan` (the static settings) and arrays; `train_step` runs them
in order and `make_train_step` jits it.

Log-probs are those of the sampling distribution, log_softmax(logits / temperature), taken at
completion positions from one forward over prompt + completion; with `shared_prompts` (a group's
rollouts carry one prompt) that prompt's part of the forward runs once per group.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from g2rpo_jax import flops, grpo
from g2rpo_jax import guidance as guidance_lib
from g2rpo_jax import guided_rollouts
from g2rpo_jax import models
from g2rpo_jax import optim
from g2rpo_jax import sharding as sharding_lib
from g2rpo_jax import train_state as train_state_lib
from g2rpo_jax.rollout_batch import (  # noqa: F401  (the step's input, re-exported for its callers)
    RolloutBatch, batch_shardings, check_batch, check_shared_prompts, drop_zero_std_groups, from_micro_batches,
    make_batch, to_micro_batches, validate_layout)
from g2rpo_jax.train_state import TrainState


# ----------------------------------------------------------------------------- config


def get_default_config() -> ml_collections.ConfigDict:
    """The step's settings; the defaults follow the official G²RPO-A code (TRL 0.15's GRPO)."""
    cfg = ml_collections.ConfigDict()
    cfg.group_size = 8  # G rollouts per prompt
    cfg.micro_batch_size = 0  # sequences per gradient-accumulation micro-batch; 0 = the whole batch
    cfg.num_iterations = 1  # μ: optimizer updates per batch
    cfg.temperature = 1.0  # the sampling temperature: training logits are divided by it
    cfg.loss_type = "grpo"  # grpo | bnpo | dr_grpo | dapo | sft (supervised baseline)
    cfg.epsilon_low = 0.2
    cfg.epsilon_high = 0.2  # > epsilon_low: DAPO's Clip-Higher
    cfg.beta = 0.04  # KL weight; 0 skips the reference forward entirely
    cfg.kl = "k3"  # k1 | k2 | k3
    cfg.guided = "train"  # train | mask | shaping: how forced guide tokens enter the loss
    cfg.shaping_gamma = 0.1
    cfg.importance_level = "token"  # token | sequence
    cfg.log_ratio_clamp = 20.0
    cfg.scale_rewards = "group"  # group | batch | none
    cfg.advantage_eps = 1e-4
    cfg.max_completion_length = 0  # dr_grpo's constant; 0 = the batch's completion width L
    cfg.dynamic_sampling = False  # DAPO: zero-std groups leave the loss and its normaliser
    # Objective options (grpo.py's module docstring has the formulas); each default is "off".
    cfg.dual_clip_c = 0.0  # > 1: dual clip for A < 0, objective >= c·A; 0 = off
    cfg.kl_clamp = 0.0  # > 0: per-token KL clamped to [-k, k] in the loss; 0 = off
    cfg.entropy_coef = 0.0  # > 0: entropy bonus weight; 0 = off
    cfg.entropy_top_fraction = 1.0  # in (0, 1): policy term only on the top fraction of loss tokens by entropy
    cfg.guide_nll_coef = 0.0  # > 0: UFT-style NLL of the forced guide tokens; 0 = off
    cfg.advantage_baseline = "group"  # group | guided_split (guided and unguided rollouts apart)
    # Sampler/trainer mismatch (e.g. bf16 sampling, f32 training): truncated importance sampling
    # of the policy term by the batch's sampler log-probs (grpo.truncated_importance_weights).
    cfg.tis = "none"  # none | token | sequence: w = min(π_old / π_sampler, C) per token or per row
    cfg.tis_cap = 2.0  # C > 0: the truncation bound of the TIS weights
    cfg.remat = False  # rematerialise decoder layers in the backward pass
    # Run a group's prompt once for its G rollouts (they share it). Read by the training loop
    # (`rollout.shares_prompts`), which also turns it off for the SFT baseline and for hints placed
    # in the prompt; False runs every row's prompt (the same result up to float rounding).
    cfg.shared_prompts = True
    cfg.logprob_chunk_size = 128  # positions per chunk of the LM-head / log-softmax
    return cfg


def validate_config(step_cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key, its bad value and the valid options."""
    options = {
        "loss_type": grpo.LOSS_TYPES,
        "kl": grpo.KL_ESTIMATORS,
        "guided": grpo.GUIDED_MODES,
        "importance_level": grpo.IMPORTANCE_LEVELS,
        "scale_rewards": grpo.ADVANTAGE_SCALES,
        "advantage_baseline": grpo.ADVANTAGE_BASELINES,
        "tis": grpo.TIS_LEVELS,
    }
    for key, valid in options.items():
        if step_cfg[key] not in valid:
            raise ValueError(f"step.{key}={step_cfg[key]!r} is not valid; valid: {valid}")
    for key, low in (("group_size", 1), ("num_iterations", 1), ("micro_batch_size", 0),
                     ("max_completion_length", 0), ("logprob_chunk_size", 1)):
        value = step_cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"step.{key}={value!r} is not valid; valid: an integer >= {low}")
    if not isinstance(step_cfg.shared_prompts, bool):
        raise ValueError(f"step.shared_prompts={step_cfg.shared_prompts!r} is not valid; valid: True or False")
    if not step_cfg.temperature > 0:
        raise ValueError(f"step.temperature={step_cfg.temperature!r} is not valid; valid: a number > 0")
    for key in ("epsilon_low", "epsilon_high", "beta", "shaping_gamma", "advantage_eps",
                "kl_clamp", "entropy_coef", "guide_nll_coef"):
        if not step_cfg[key] >= 0:
            raise ValueError(f"step.{key}={step_cfg[key]!r} is not valid; valid: a number >= 0")
    if not (step_cfg.dual_clip_c == 0 or step_cfg.dual_clip_c > 1):
        raise ValueError(f"step.dual_clip_c={step_cfg.dual_clip_c!r} is not valid; "
                         "valid: 0 (off) or a number > 1")
    if not 0 < step_cfg.tis_cap <= float(np.finfo(np.float32).max):
        raise ValueError(f"step.tis_cap={step_cfg.tis_cap!r} is not valid; valid: a number > 0 "
                         "(float32-representable)")
    if step_cfg.tis != "none" and step_cfg.loss_type == "sft":
        raise ValueError(f"step.tis={step_cfg.tis!r} is not valid with loss_type='sft'; valid: 'none' "
                         "(the SFT baseline trains on reference trajectories: there is no sampler to correct for)")
    if not 0 < step_cfg.entropy_top_fraction <= 1:
        raise ValueError(f"step.entropy_top_fraction={step_cfg.entropy_top_fraction!r} is not valid; "
                         "valid: a number in (0, 1] (1 = every loss token)")
    if step_cfg.scale_rewards == "group" and step_cfg.group_size < 2:
        raise ValueError(
            f"step.group_size={step_cfg.group_size} is not valid with scale_rewards='group'; "
            "valid: >= 2 (the unbiased group std needs two rewards)"
        )


def loss_options(step_cfg: ml_collections.ConfigDict, completion_width: int) -> dict:
    """Keyword options of `grpo.policy_loss` from the step config (L: the completion width)."""
    return dict(
        loss_type=step_cfg.loss_type,
        epsilon_low=float(step_cfg.epsilon_low),
        epsilon_high=float(step_cfg.epsilon_high),
        beta=float(step_cfg.beta),
        kl=step_cfg.kl,
        guided=step_cfg.guided,
        max_completion_length=int(step_cfg.max_completion_length or completion_width),
        importance_level=step_cfg.importance_level,
        shaping_gamma=float(step_cfg.shaping_gamma),
        log_ratio_clamp=float(step_cfg.log_ratio_clamp),
        dual_clip_c=float(step_cfg.dual_clip_c),
        kl_clamp=float(step_cfg.kl_clamp),
        entropy_coef=float(step_cfg.entropy_coef),
        guide_nll_coef=float(step_cfg.guide_nll_coef),
    )


# ----------------------------------------------------------------------------- log-probs


def compute_logprobs(
    cfg: models.ModelConfig,
    params,
    batch: RolloutBatch,
    temperature: float = 1.0,
    *,
    chunk_size: int = 128,
    remat: bool = False,
    with_entropy: bool = False,
    activation_sharding=None,
    shared_prompt_group: int = 1,
):
    """log_softmax(logits / temperature) of each completion token given everything before it,
    from one forward over prompt + completion: float32 [B, L] (and the entropy [B, L]).
    `activation_sharding` lays out the model's [B, P+L, E] activations (batch-sharded on a mesh).

    The completion token j is predicted from the hidden state at position P + j − 1; the
    left-padded prompt always ends at column P − 1, so that is a real token for j = 0.

    `shared_prompt_group` G > 1: each run of G consecutive rows carries one prompt (a group's
    rollouts), whose forward then runs once for the G rows (`models.shared_prompt_hidden_states`);
    the caller guarantees the prompts are equal (`rollout_batch.check_shared_prompts`).
    """
    rows, prompt_width = batch.prompt_tokens.shape
    completion_width = batch.completion_tokens.shape[1]
    options = dict(remat=remat, activation_sharding=activation_sharding)
    if shared_prompt_group < 1 or rows % shared_prompt_group:
        raise ValueError(f"shared_prompt_group={shared_prompt_group!r} must be an integer >= 1 that divides the "
                         f"batch's {rows} rows (the rows of a group are adjacent)")
    if shared_prompt_group > 1:
        first_of_group = lambda x: x.reshape(-1, shared_prompt_group, x.shape[1])[:, 0]  # noqa: E731  [B/G, P]
        prompt_hidden, completion_hidden = models.shared_prompt_hidden_states(
            cfg, params, first_of_group(batch.prompt_tokens), first_of_group(batch.prompt_mask) > 0,
            batch.completion_tokens, batch.completion_mask > 0, **options)  # [B/G, P, E], [B, L, E]
        last_prompt = jnp.repeat(prompt_hidden[:, -1:], shared_prompt_group, axis=0)  # [B, 1, E]
        predicting = jnp.concatenate([last_prompt, completion_hidden[:, :-1]], axis=1)  # [B, L, E]
    else:
        tokens = jnp.concatenate([batch.prompt_tokens, batch.completion_tokens], axis=1)  # [B, P+L]
        valid = jnp.concatenate([batch.prompt_mask > 0, batch.completion_mask > 0], axis=1)  # [B, P+L]
        hidden = models.hidden_states(cfg, params, tokens, valid, **options)  # [B, P+L, E]
        predicting = hidden[:, prompt_width - 1: prompt_width + completion_width - 1]  # [B, L, E]
    return models.token_logprobs(
        cfg, params, predicting, batch.completion_tokens, temperature, chunk_size, with_entropy
    )


# ----------------------------------------------------------------------------- the step's settings


def uses_reference(step_cfg) -> bool:
    """beta != 0: the step needs the reference model and runs its forward (the KL term)."""
    return float(step_cfg.beta) != 0.0


def runs_old_policy_forward(step_cfg) -> bool:
    """The step runs the policy once before its updates: for the old log-probs when μ > 1, and
    for the high-entropy selection when entropy_top_fraction < 1 (see `fixed_logprobs`)."""
    return int(step_cfg.num_iterations) > 1 or float(step_cfg.entropy_top_fraction) < 1


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Everything the step reads from its configs and layout, as Python constants: static under jit.

    Configs are frozen copies, so later edits of the caller's configs cannot change a step traced
    afterwards."""

    model_cfg: models.ModelConfig
    step_cfg: ml_collections.FrozenConfigDict
    gcfg: ml_collections.FrozenConfigDict
    optimizer: optax.GradientTransformation
    mesh: Optional[Mesh]
    rules: tuple
    num_shards: int  # S: pieces of the batch's leading axis
    num_problems: Optional[int]
    param_shardings: object = None  # the params' NamedShardings with a mesh, else None
    shared_prompts: bool = False  # the G rows of a group share their prompt: its forward runs once

    @property
    def group_size(self) -> int:
        return int(self.step_cfg.group_size)

    @property
    def use_kl(self) -> bool:
        return uses_reference(self.step_cfg)

    def constrain(self, x, spec: PartitionSpec):
        return x if self.mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def micro_batches(self, x: jax.Array, num_micro: int) -> jax.Array:
        """[B, ...] -> [k, B/k, ...], each micro-batch spread over all batch shards."""
        out = to_micro_batches(x, num_micro, self.num_shards, self.group_size)
        return self.constrain(out, PartitionSpec(None, dict(self.rules)["batch"]))

    def logprobs(self, params, batch: RolloutBatch, *, with_entropy: bool = False, remat: bool = False):
        activations = None if self.mesh is None else sharding_lib.batch_sharding(self.mesh, 3, self.rules)
        return compute_logprobs(self.model_cfg, params, batch, float(self.step_cfg.temperature),
                                chunk_size=int(self.step_cfg.logprob_chunk_size), remat=remat,
                                with_entropy=with_entropy, activation_sharding=activations,
                                shared_prompt_group=self.group_size if self.shared_prompts else 1)

    def micro_logprobs(self, params, micro_batches: RolloutBatch, with_entropy: bool = False):
        """No-gradient log-probs (and entropies) per micro-batch: [k, B/k, L] each."""
        return jax.lax.map(lambda mb: self.logprobs(params, mb, with_entropy=with_entropy), micro_batches)


# ----------------------------------------------------------------------------- stage 1: advantages


def advantages_and_normalizers(plan: StepPlan, batch: RolloutBatch, options: dict):
    """Group advantages [B], the zero-std rows [B], the batch the loss sees (dynamic sampling
    masks the rows of uninformative groups: they count as absent, grpo's convention) and the
    loss's denominators, from the whole batch so micro-batch gradients add up exactly."""
    cfg = plan.step_cfg
    rewards = batch.rewards.astype(jnp.float32)  # [B]
    advantages = grpo.group_advantages(
        rewards, plan.group_size, scale=cfg.scale_rewards, eps=float(cfg.advantage_eps),
        baseline=cfg.advantage_baseline, guided=batch.guided > 0,
    )  # [B]
    zero_std_rows = jnp.repeat(grpo.zero_std_groups(rewards, plan.group_size), plan.group_size)  # [B]
    if cfg.dynamic_sampling:
        batch = batch.replace(completion_mask=jnp.where(zero_std_rows[:, None], 0, batch.completion_mask))
    normalizers = dict(normalizer=grpo.loss_normalizer(
        options["loss_type"], batch.completion_mask, options["max_completion_length"],
        guided_mask=batch.guided_mask, guided=options["guided"],
    ))
    if options["guide_nll_coef"]:
        normalizers["guide_normalizer"] = grpo.guide_token_count(batch.completion_mask, batch.guided_mask)
    return batch, advantages, zero_std_rows, normalizers


# ----------------------------------------------------------------------------- stage 2: fixed log-probs


def fixed_logprobs(plan: StepPlan, params, ref_params, micro_batches: RolloutBatch, options: dict):
    """The log-probs that stay fixed over the μ updates, each [k, B/k, L] or None:
    (reference, old policy, high-entropy policy mask).

    The reference forward is skipped when beta = 0. With μ = 1 the old policy is the current one
    (ratio 1, stop-gradient inside the loss): None. With entropy_top_fraction < 1, one global
    selection from the policy before the first update, independent of the micro-batch split; with
    μ > 1 that same forward gives the old log-probs, with μ = 1 it is an extra forward."""
    num_iterations = int(plan.step_cfg.num_iterations)
    top_fraction = float(plan.step_cfg.entropy_top_fraction)
    ref_logprobs = plan.micro_logprobs(ref_params, micro_batches) if plan.use_kl else None
    old_logprobs = policy_mask = None
    if num_iterations > 1 and top_fraction == 1:
        old_logprobs = plan.micro_logprobs(params, micro_batches)
    if top_fraction < 1:
        logprobs_before, entropy_before = plan.micro_logprobs(params, micro_batches, with_entropy=True)
        old_logprobs = None if num_iterations == 1 else logprobs_before
        loss_tokens = grpo.loss_token_mask(micro_batches.completion_mask, micro_batches.guided_mask,
                                           options["guided"])
        policy_mask = grpo.high_entropy_mask(entropy_before, loss_tokens, top_fraction)
    return ref_logprobs, old_logprobs, policy_mask


# ----------------------------------------------------------------------------- stage 3: μ updates


def micro_batch_loss(plan: StepPlan, params, micro: RolloutBatch, advantages, old_logprobs, ref_logprobs,
                     policy_mask, normalizers: dict, options: dict):
    """The globally normalised loss of one micro-batch and (its metrics, its entropy sum).

    `micro.old_logprobs` holds the sampler's log-probs: against the trainer's old ones they give
    the `mismatch/*` drift metrics (not for `sft`, whose batches have no sampler) and, with
    step.tis, the truncated importance weights of the policy term."""
    cfg = plan.step_cfg
    logprobs, entropy = plan.logprobs(params, micro, with_entropy=True, remat=bool(cfg.remat))  # [b, L] each
    if old_logprobs is None:  # μ = 1: the batch was sampled by these very params
        old_logprobs = jax.lax.stop_gradient(logprobs)
    tis = dict(tis_level=cfg.tis, tis_cap=float(cfg.tis_cap), tis_weights=None)
    if cfg.tis != "none":
        tis["tis_weights"] = grpo.truncated_importance_weights(
            old_logprobs, micro.old_logprobs, micro.completion_mask, micro.guided_mask,
            level=cfg.tis, cap=tis["tis_cap"],
        )  # [b, L], no gradient
    loss, metrics = grpo.policy_loss(
        logprobs, old_logprobs, ref_logprobs, advantages, micro.completion_mask,
        guided_mask=micro.guided_mask, entropy=entropy if options["entropy_coef"] else None,
        policy_mask=policy_mask, tis_weights=tis["tis_weights"], parts=True, **normalizers, **options,
    )
    if options["loss_type"] != "sft":
        metrics.update(grpo.mismatch_metrics(old_logprobs, micro.old_logprobs, micro.completion_mask,
                                             micro.guided_mask, parts=True, **tis))
    completion = (micro.completion_mask > 0).astype(jnp.float32)
    entropy_sum = jnp.sum(jax.lax.stop_gradient(entropy) * completion)
    return loss, (metrics, entropy_sum)


def accumulate_gradients(plan: StepPlan, params, micro_batches, advantages, old_logprobs, ref_logprobs,
                         policy_mask, normalizers: dict, options: dict):
    """Sum over micro-batches (`lax.scan`) of the gradients of the globally normalised losses,
    and the whole batch's metrics."""
    grad_fn = jax.value_and_grad(functools.partial(micro_batch_loss, plan), has_aux=True)

    def add_micro_batch(grad_sum, xs):
        micro, adv, old, ref, selected = xs
        (_, (metrics, entropy_sum)), grads = grad_fn(params, micro, adv, old, ref, selected, normalizers, options)
        grad_sum = jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), grad_sum, grads)
        return grad_sum, (metrics, entropy_sum)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    if plan.param_shardings is not None:
        zeros = jax.lax.with_sharding_constraint(zeros, plan.param_shardings)
    grads, (per_micro, entropy_sums) = jax.lax.scan(
        add_micro_batch, zeros, (micro_batches, advantages, old_logprobs, ref_logprobs, policy_mask)
    )
    metrics = grpo.combine_metrics(per_micro)
    metrics["entropy"] = entropy_sums.sum() / jnp.maximum(metrics["num_completion_tokens"], 1.0)
    if policy_mask is not None:  # the share of loss tokens that keep their policy term
        metrics["policy_token_share"] = policy_mask.sum() / jnp.maximum(metrics["num_loss_tokens"], 1.0)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return grads, metrics


def guarded_update(optimizer: optax.GradientTransformation, params, opt_state, grads, metrics: dict):
    """One optimizer update, not applied when the loss or gradient is not finite.

    A non-finite update (an overflow, a NaN reward) would poison the params and Adam's moments for
    good. The select sits inside the update so XLA can fuse it with apply_updates (no second copy
    of params and moments). Adds `grad_norm`, `skipped_nonfinite` and `learning_rate` to metrics."""
    metrics["grad_norm"] = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), (new_params, new_opt_state), (params, opt_state))
    metrics["skipped_nonfinite"] = jnp.logical_not(finite).astype(jnp.float32)
    learning_rate = optim.current_learning_rate(opt_state)
    if learning_rate is not None:
        metrics["learning_rate"] = learning_rate
    return params, opt_state, metrics


def policy_updates(plan: StepPlan, params, opt_state, micro_batches, advantages, fixed, normalizers: dict,
                   options: dict):
    """μ guarded updates (`lax.scan`); metrics are means over the updates, `skipped_nonfinite` is 1
    when any update was skipped."""
    ref_logprobs, old_logprobs, policy_mask = fixed

    def one_update(carry, _):
        params, opt_state = carry
        grads, metrics = accumulate_gradients(plan, params, micro_batches, advantages, old_logprobs,
                                              ref_logprobs, policy_mask, normalizers, options)
        params, opt_state, metrics = guarded_update(plan.optimizer, params, opt_state, grads, metrics)
        return (params, opt_state), metrics

    (params, opt_state), per_iteration = jax.lax.scan(
        one_update, (params, opt_state), None, length=int(plan.step_cfg.num_iterations)
    )
    metrics = {key: jnp.mean(value) for key, value in per_iteration.items()}
    metrics["skipped_nonfinite"] = jnp.max(per_iteration["skipped_nonfinite"])
    return params, opt_state, metrics


# ----------------------------------------------------------------------------- stage 4: guidance


def next_guidance(plan: StepPlan, guidance, batch: RolloutBatch, reward: jax.Array, skipped: jax.Array):
    """The guidance state after this step: the global rule from the step's reward r_k and, with
    guidance.per_problem, each group's problem (its first row's id) from that group's mean reward
    (the same reward_source), groups applied in batch order. A step with a skipped update keeps the
    whole state, per-problem schedules included."""
    gcfg, group_size = plan.gcfg, plan.group_size
    new = guidance_lib.update(guidance, reward, gcfg)
    if gcfg.per_problem:
        table = guidance.per_problem
        if table is not None and table.current_length.shape[0] != plan.num_problems:
            raise ValueError(
                f"the state's guidance has {table.current_length.shape[0]} problems but the step was made "
                f"with num_problems={plan.num_problems}; build both with the same number of training problems")
        per_group = guidance_lib.group_rewards(batch.accuracy, batch.rewards, gcfg.reward_source, group_size)
        new = guidance_lib.update_problems(new, batch.problem_ids[::group_size], per_group, gcfg)
    return jax.tree.map(lambda after, before: jnp.where(skipped > 0, before, after), new, guidance)


def _mean_length(guidance, batch: RolloutBatch, group_size: int) -> jax.Array:
    """float32 []: the global ℓ, or with per-problem guidance the mean ℓ of the batch's groups."""
    if guidance.per_problem is None:
        return guidance_lib.length(guidance).astype(jnp.float32)
    return jnp.mean(guidance_lib.row_lengths(guidance, batch.problem_ids[::group_size]).astype(jnp.float32))


def batch_metrics(plan: StepPlan, guidance, new_guidance, batch: RolloutBatch, advantages, zero_std_rows,
                  reward) -> dict:
    """The guidance, reward and accuracy metrics of the batch as sampled. Guided vs unguided
    success is reported on the accuracy reward (what the schedule reads)."""
    rewards = batch.rewards.astype(jnp.float32)  # [B]
    metrics = guided_rollouts.guidance_metrics(
        _mean_length(guidance, batch, plan.group_size), batch.accuracy, advantages, batch.guided > 0,
        batch.completion_mask, batch.guided_mask,
    )
    metrics["guidance/next_length"] = _mean_length(new_guidance, batch, plan.group_size)
    metrics["guidance/step_reward"] = reward
    metrics["reward/mean"] = jnp.mean(rewards)
    metrics["reward/std"] = jnp.std(rewards)
    metrics["accuracy/mean"] = jnp.mean(batch.accuracy.astype(jnp.float32))
    metrics["zero_std_group_fraction"] = jnp.mean(zero_std_rows.astype(jnp.float32))
    return metrics


# ----------------------------------------------------------------------------- the step


def train_step(plan: StepPlan, state: TrainState, ref_params, batch: RolloutBatch):
    """One step, the four stages of the module docstring: `(state, ref_params, batch) -> (new state,
    metrics)`, metrics float32 scalars."""
    check_batch(batch)
    batch_size, completion_width = batch.completion_tokens.shape
    num_micro = validate_layout(batch_size, plan.group_size, int(plan.step_cfg.micro_batch_size),
                                plan.mesh, plan.rules)
    options = loss_options(plan.step_cfg, completion_width)

    # 1. Group advantages, and the loss's denominators from the whole batch.
    loss_batch, advantages, zero_std_rows, normalizers = advantages_and_normalizers(plan, batch, options)
    micro_batches = jax.tree.map(lambda x: plan.micro_batches(x, num_micro), loss_batch)
    # 2. Reference and old-policy log-probs, fixed over the updates.
    fixed = fixed_logprobs(plan, state.params, ref_params, micro_batches, options)
    # 3. μ updates, gradients accumulated over micro-batches.
    params, opt_state, metrics = policy_updates(
        plan, state.params, state.opt_state, micro_batches, plan.micro_batches(advantages, num_micro), fixed,
        normalizers, options)
    # 4. The guidance schedule from the step's reward, and the batch's metrics.
    reward = guidance_lib.step_reward(batch.accuracy, batch.rewards.astype(jnp.float32), plan.gcfg.reward_source)
    guidance = next_guidance(plan, state.guidance, batch, reward, metrics["skipped_nonfinite"])
    metrics.update(batch_metrics(plan, state.guidance, guidance, batch, advantages, zero_std_rows, reward))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, guidance=guidance)
    return new_state, {key: jnp.asarray(value, jnp.float32) for key, value in metrics.items()}


def model_flops(model_cfg: models.ModelConfig, step_cfg: ml_collections.ConfigDict, batch: RolloutBatch,
                shared_prompts: bool = False) -> float:
    """Model FLOPs (`g2rpo_jax.flops`) of one step on `batch`'s padded shapes: μ forward + backward
    passes, plus the reference and old-policy forwards the step runs (`fixed_logprobs`); with
    `shared_prompts` (as passed to `make_train_step`) each group's prompt counts once."""
    rows, prompt_len = batch.prompt_tokens.shape
    return flops.train_step_flops(
        model_cfg, rows, prompt_len, batch.completion_tokens.shape[1], num_updates=int(step_cfg.num_iterations),
        reference_forward=uses_reference(step_cfg), old_policy_forward=runs_old_policy_forward(step_cfg),
        shared_prompt_group=int(step_cfg.group_size) if shared_prompts else 1)


def _check_problem_count(num_problems: Optional[int], gcfg) -> None:
    if gcfg.per_problem and (num_problems is None or isinstance(num_problems, bool)
                             or not isinstance(num_problems, (int, np.integer)) or num_problems < 1):
        raise ValueError(
            f"guidance.per_problem=True needs make_train_step(..., num_problems=P), the number of "
            f"training problems (an integer >= 1), got num_problems={num_problems!r}; pass it, or "
            f"set guidance.per_problem=False")


def make_train_step(
    model_cfg: models.ModelConfig,
    step_cfg: ml_collections.ConfigDict,
    gcfg: ml_collections.ConfigDict,
    optimizer: optax.GradientTransformation,
    mesh: Optional[Mesh] = None,
    rules=sharding_lib.DEFAULT_RULES,
    *,
    donate: bool = True,
    num_problems: Optional[int] = None,
    shared_prompts: bool = False,
) -> Callable[[TrainState, object, RolloutBatch], tuple[TrainState, dict]]:
    """The jitted step `(state, ref_params, batch) -> (new state, metrics)`.

    With a mesh, the state is laid out by `train_state.state_shardings`, the reference params by
    the same rules, the batch over the batch axes, and metrics are replicated scalars; inputs are
    moved there if they are not. `donate` lets XLA reuse the old state's buffers (the caller must
    not touch the state passed in afterwards). `ref_params` may be None when beta = 0.
    The batch size is checked against the layout (`validate_layout`) when the step is traced.
    `num_problems` (P, the number of training problems) is required with guidance.per_problem
    (the state's per-problem guidance arrays are [P, ...]) and ignored otherwise.
    `shared_prompts` (a bool): every group's G rows carry the same prompt (rollouts of one problem
    with the guide in the completion), so the policy's and reference's forwards run each prompt
    once per group (`compute_logprobs`); the prompt's share of those FLOPs falls by G. The returned
    function then checks every batch on the host first (`check_shared_prompts`: ValueError naming
    the group whose rows differ). The default, False, runs every row's prompt; the training loop
    passes `rollout.shares_prompts(cfg)`.
    """
    validate_config(step_cfg)
    guidance_lib.validate(gcfg)
    _check_problem_count(num_problems, gcfg)
    if not isinstance(shared_prompts, (bool, np.bool_)):
        raise ValueError(f"shared_prompts={shared_prompts!r} is not valid; valid: True or False")
    rules = tuple(rules)
    plan = StepPlan(model_cfg, ml_collections.FrozenConfigDict(step_cfg), ml_collections.FrozenConfigDict(gcfg),
                    optimizer, mesh, rules, sharding_lib.batch_axis_size(mesh, rules), num_problems,
                    shared_prompts=bool(shared_prompts))
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        step = jax.jit(functools.partial(train_step, plan), donate_argnums=donate_argnums)
        return checking_shared_prompts(step, plan.group_size) if plan.shared_prompts else step
    abstract_params = jax.eval_shape(lambda: models.init_params(model_cfg, jax.random.key(0)))
    abstract = train_state_lib.abstract_state(abstract_params, optimizer, gcfg, num_problems)
    state_sh = train_state_lib.state_shardings(abstract, optimizer, mesh, models.param_logical_axes(model_cfg), rules)
    plan = dataclasses.replace(plan, param_shardings=state_sh.params)
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.jit(
        functools.partial(train_step, plan),
        in_shardings=(state_sh, state_sh.params if plan.use_kl else None, batch_shardings(mesh, rules)),
        out_shardings=(state_sh, replicated),
        donate_argnums=donate_argnums,
    )
    return checking_shared_prompts(step, plan.group_size) if plan.shared_prompts else step


def checking_shared_prompts(step, group_size: int):
    """`step` behind a host-side `check_shared_prompts` of each batch it is given: a step that runs
    one prompt per group must not be fed rows with their own prompts (it would train them on the
    group's first). `.lower` is the jitted step's, for ahead-of-time compilation."""
    @functools.wraps(step)
    def checked(state, ref_params, batch):
        check_shared_prompts(batch, group_size)
        return step(state, ref_params, batch)

    checked.lower = step.lower
    return checked

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

Layout: the batch's leading axis is sharded over the mesh's batch axes (S shards). A micro-batch
takes the same number of whole groups from every shard, so each micro-batch stays spread over all
devices and no group is ever split (`validate_layout` checks the sizes at config time).

Log-probs are those of the sampling distribution, log_softmax(logits / temperature), taken at
completion positions from one forward over prompt + completion.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import chex
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from g2rpo_jax import grpo
from g2rpo_jax import guidance as guidance_lib
from g2rpo_jax import models
from g2rpo_jax import optim
from g2rpo_jax import sharding as sharding_lib
from g2rpo_jax import train_state as train_state_lib
from g2rpo_jax.train_state import TrainState


@flax.struct.dataclass
class RolloutBatch:
    """One step's rollouts, B = number of prompts × G rows, the rollouts of a group adjacent."""

    prompt_tokens: jax.Array  # int32 [B, P], left-padded
    prompt_mask: jax.Array  # [B, P], 1 on real prompt tokens
    completion_tokens: jax.Array  # int32 [B, L], guide tokens then sampled ones
    completion_mask: jax.Array  # [B, L], 1 up to and including the first EOS
    guided_mask: jax.Array  # [B, L], 1 on forced guide tokens
    rewards: jax.Array  # float32 [B], total reward: drives the advantages
    accuracy: jax.Array  # float32 [B], accuracy reward: may drive the guidance schedule
    # float32 [B, L]: the sampler's log-probs (zeros when not kept). The step recomputes the old
    # policy's log-probs with the training numerics (as TRL does) for the PPO ratio; against these
    # it logs the sampler/trainer drift (`mismatch/*`) and, with step.tis, weights the policy term.
    old_logprobs: jax.Array
    # int32 [B]: 1 when the rollout carried a guide, in its completion or (as a hint) in its prompt.
    guided: jax.Array
    # int32 [B]: the training problem (its row index in the data) of each rollout; the same for
    # the G rollouts of a group. Drives the per-problem guidance schedule (guidance.per_problem).
    problem_ids: jax.Array

    @property
    def batch_size(self) -> int:
        return self.rewards.shape[0]


def make_batch(
    prompt_tokens,
    prompt_mask,
    completion_tokens,
    completion_mask,
    rewards,
    *,
    accuracy=None,
    guided_mask=None,
    old_logprobs=None,
    guided=None,
    problem_ids=None,
) -> RolloutBatch:
    """A host-side (numpy) RolloutBatch with canonical dtypes; missing optional fields are zeros
    (accuracy defaults to the rewards, `guided` to the rows with guide tokens; problem_ids, int
    [B], to zeros)."""
    completion_tokens = np.asarray(completion_tokens, np.int32)
    rewards = np.asarray(rewards, np.float32)
    guided_mask = (np.zeros(completion_tokens.shape, np.int32) if guided_mask is None
                   else np.asarray(guided_mask, np.int32))
    return RolloutBatch(
        prompt_tokens=np.asarray(prompt_tokens, np.int32),
        prompt_mask=np.asarray(prompt_mask, np.int32),
        completion_tokens=completion_tokens,
        completion_mask=np.asarray(completion_mask, np.int32),
        guided_mask=guided_mask,
        rewards=rewards,
        accuracy=rewards.copy() if accuracy is None else np.asarray(accuracy, np.float32),
        old_logprobs=np.zeros(completion_tokens.shape, np.float32) if old_logprobs is None
        else np.asarray(old_logprobs, np.float32),
        problem_ids=np.zeros(rewards.shape, np.int32) if problem_ids is None
        else np.asarray(problem_ids, np.int32),
        guided=(guided_mask.any(axis=1) if guided is None else np.asarray(guided)).astype(np.int32),
    )


def _check_batch(batch: RolloutBatch) -> None:
    chex.assert_rank(
        [batch.prompt_tokens, batch.prompt_mask, batch.completion_tokens, batch.completion_mask,
         batch.guided_mask, batch.rewards, batch.accuracy, batch.old_logprobs, batch.guided],
        [2, 2, 2, 2, 2, 1, 1, 2, 1],
    )
    chex.assert_equal_shape([batch.prompt_tokens, batch.prompt_mask])
    chex.assert_equal_shape([batch.completion_tokens, batch.completion_mask, batch.guided_mask, batch.old_logprobs])
    chex.assert_equal_shape_prefix(
        [batch.prompt_tokens, batch.completion_tokens, batch.rewards, batch.accuracy, batch.guided], 1)
    chex.assert_rank(batch.problem_ids, 1)
    chex.assert_type(batch.problem_ids, int)  # row indices: a float would index by truncation
    chex.assert_equal_shape([batch.rewards, batch.problem_ids])
    if batch.prompt_tokens.shape[1] < 1:
        raise ValueError("prompt_tokens has width 0; every row needs at least one prompt token")


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


def batch_shard_count(mesh: Optional[Mesh], rules=sharding_lib.DEFAULT_RULES) -> int:
    """How many pieces the batch's leading axis is cut into (1 without a mesh)."""
    if mesh is None:
        return 1
    axes = dict(rules)["batch"]
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    return math.prod(mesh.shape[name] for name in names)


def validate_layout(
    batch_size: int,
    group_size: int,
    micro_batch_size: int,
    mesh: Optional[Mesh] = None,
    rules=sharding_lib.DEFAULT_RULES,
) -> int:
    """Checks that no batch shard and no micro-batch splits a group; returns the micro-batch count.

    micro_batch_size 0 means the whole batch. Every micro-batch holds micro_batch_size / S rows of
    each of the S batch shards, so that must be a whole number of groups.
    """
    if group_size < 1 or batch_size < 1:
        raise ValueError(f"batch_size={batch_size} and group_size={group_size} must be positive integers")
    shards = batch_shard_count(mesh, rules)
    unit = shards * group_size  # the smallest micro-batch that keeps groups whole on every shard
    valid_micro = [m for m in range(unit, batch_size + 1, unit) if batch_size % m == 0]
    where = f" on {shards} batch shards" if shards > 1 else ""
    if batch_size % group_size:
        raise ValueError(
            f"batch_size={batch_size} is not a multiple of group_size={group_size}: a group would be split"
        )
    if batch_size % unit:
        raise ValueError(
            f"batch_size={batch_size} cannot be cut into {shards} batch shards of whole groups of "
            f"group_size={group_size}; use a batch_size that is a multiple of {unit} "
            f"(shards × group_size) or a mesh with fewer batch shards"
        )
    micro = micro_batch_size or batch_size
    if micro < 0 or batch_size % micro or micro % unit:
        raise ValueError(
            f"micro_batch_size={micro_batch_size} would split a group of group_size={group_size}"
            f"{where} (batch_size={batch_size}); each micro-batch must be a multiple of {unit} "
            f"that divides the batch: valid micro_batch_size values are {valid_micro} (or 0 = whole batch)"
        )
    return batch_size // micro


# ----------------------------------------------------------------------------- log-probs


def compute_logprobs(
    cfg: models.Qwen3Config,
    params,
    batch: RolloutBatch,
    temperature: float = 1.0,
    *,
    chunk_size: int = 128,
    remat: bool = False,
    with_entropy: bool = False,
):
    """log_softmax(logits / temperature) of each completion token given everything before it,
    from one forward over prompt + completion: float32 [B, L] (and the entropy [B, L]).

    The completion token j is predicted from the hidden state at position P + j − 1; the
    left-padded prompt always ends at column P − 1, so that is a real token for j = 0.
    """
    prompt_width = batch.prompt_tokens.shape[1]
    completion_width = batch.completion_tokens.shape[1]
    tokens = jnp.concatenate([batch.prompt_tokens, batch.completion_tokens], axis=1)  # [B, P+L]
    valid = jnp.concatenate([batch.prompt_mask > 0, batch.completion_mask > 0], axis=1)  # [B, P+L]
    hidden = models.hidden_states(cfg, params, tokens, valid, remat=remat)  # [B, P+L, E]
    predicting = hidden[:, prompt_width - 1: prompt_width + completion_width - 1]  # [B, L, E]
    return models.token_logprobs(
        cfg, params, predicting, batch.completion_tokens, temperature, chunk_size, with_entropy
    )


# ----------------------------------------------------------------------------- micro-batch layout


def to_micro_batches(x: jax.Array, num_micro: int, num_shards: int, group_size: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...]: micro-batch i takes the i-th run of whole groups of every shard.

    With shard s holding rows [s·B/S, (s+1)·B/S), micro-batch i gets rows
    s·B/S + i·r ... s·B/S + (i+1)·r − 1 of every shard s (r = B/(S·k) rows, a multiple of G).
    """
    batch = x.shape[0]
    rows = batch // (num_shards * num_micro)
    if rows * num_shards * num_micro != batch or rows % group_size:
        raise ValueError(
            f"cannot cut {batch} rows into {num_micro} micro-batches on {num_shards} shards without "
            f"splitting groups of {group_size}; check validate_layout"
        )
    rest = x.shape[1:]
    x = x.reshape(num_shards, num_micro, rows, *rest).swapaxes(0, 1)  # [k, S, r, ...]
    return x.reshape(num_micro, num_shards * rows, *rest)  # [k, B/k, ...]


def from_micro_batches(x: jax.Array, num_shards: int) -> jax.Array:
    """Inverse of `to_micro_batches`: [k, B/k, ...] -> [B, ...] in the original row order."""
    num_micro, per_micro = x.shape[:2]
    rest = x.shape[2:]
    rows = per_micro // num_shards
    x = x.reshape(num_micro, num_shards, rows, *rest).swapaxes(0, 1)  # [S, k, r, ...]
    return x.reshape(num_micro * per_micro, *rest)


# ----------------------------------------------------------------------------- dynamic sampling


def zero_std_row_mask(rewards: jax.Array, group_size: int) -> jax.Array:
    """bool [B]: rows whose group's rewards are all equal."""
    return jnp.repeat(grpo.zero_std_groups(rewards, group_size), group_size)


def drop_zero_std_groups(batch: RolloutBatch, group_size: int) -> tuple[RolloutBatch, float]:
    """Host-side DAPO filter: (the batch without its zero-std groups, the fraction dropped).

    Returns numpy arrays with fewer rows (B' = kept groups × G), for a loop that keeps sampling
    until it has filled a batch; to drop them without changing shapes, set the step's
    `dynamic_sampling` instead.
    """
    rewards = np.asarray(batch.rewards, np.float64)
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards of shape {rewards.shape} cannot be cut into groups of group_size={group_size}"
        )
    grouped = rewards.reshape(-1, group_size)  # [B/G, G]
    keep_group = grouped.max(axis=1) != grouped.min(axis=1)  # [B/G]
    keep_row = np.repeat(keep_group, group_size)  # [B]
    kept = jax.tree.map(lambda x: np.asarray(x)[keep_row], batch)
    return kept, float(1.0 - keep_group.mean())


# ----------------------------------------------------------------------------- the step


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


def _batch_shardings(mesh: Mesh, rules) -> RolloutBatch:
    """Leading-axis sharding over the batch axes for each field (a RolloutBatch of shardings)."""
    ranks = dict(prompt_tokens=2, prompt_mask=2, completion_tokens=2, completion_mask=2, guided_mask=2,
                 rewards=1, accuracy=1, old_logprobs=2, problem_ids=1, guided=1)
    return RolloutBatch(**{name: sharding_lib.batch_sharding(mesh, ndim, rules) for name, ndim in ranks.items()})


def _next_guidance(guidance, batch: RolloutBatch, reward: jax.Array, gcfg, group_size: int,
                   num_problems: Optional[int]):
    """The guidance state after this step: the global rule from the step's reward r_k and, with
    guidance.per_problem, each group's problem (its first row's id) from that group's mean reward
    (the same reward_source), groups applied in batch order."""
    new = guidance_lib.update(guidance, reward, gcfg)
    if not gcfg.per_problem:
        return new
    table = guidance.per_problem
    if table is not None and table.current_length.shape[0] != num_problems:
        raise ValueError(
            f"the state's guidance has {table.current_length.shape[0]} problems but the step was made "
            f"with num_problems={num_problems}; build both with the same number of training problems")
    per_group = guidance_lib.group_rewards(batch.accuracy, batch.rewards, gcfg.reward_source, group_size)
    return guidance_lib.update_problems(new, batch.problem_ids[::group_size], per_group, gcfg)


def _mean_length(guidance, batch: RolloutBatch, group_size: int) -> jax.Array:
    """float32 []: the global ℓ, or with per-problem guidance the mean ℓ of the batch's groups."""
    if guidance.per_problem is None:
        return guidance_lib.length(guidance).astype(jnp.float32)
    return jnp.mean(guidance_lib.row_lengths(guidance, batch.problem_ids[::group_size]).astype(jnp.float32))


def _check_problem_count(num_problems: Optional[int], gcfg) -> None:
    if gcfg.per_problem and (num_problems is None or isinstance(num_problems, bool)
                             or not isinstance(num_problems, (int, np.integer)) or num_problems < 1):
        raise ValueError(
            f"guidance.per_problem=True needs make_train_step(..., num_problems=P), the number of "
            f"training problems (an integer >= 1), got num_problems={num_problems!r}; pass it, or "
            f"set guidance.per_problem=False")


def make_train_step(
    model_cfg: models.Qwen3Config,
    step_cfg: ml_collections.ConfigDict,
    gcfg: ml_collections.ConfigDict,
    optimizer: optax.GradientTransformation,
    mesh: Optional[Mesh] = None,
    rules=sharding_lib.DEFAULT_RULES,
    *,
    donate: bool = True,
    num_problems: Optional[int] = None,
) -> Callable[[TrainState, object, RolloutBatch], tuple[TrainState, dict]]:
    """The jitted step `(state, ref_params, batch) -> (new state, metrics)`.

    With a mesh, the state is laid out by `train_state.state_shardings`, the reference params by
    the same rules, the batch over the batch axes, and metrics are replicated scalars; inputs are
    moved there if they are not. `donate` lets XLA reuse the old state's buffers (the caller must
    not touch the state passed in afterwards). `ref_params` may be None when beta = 0.
    The batch size is checked against the layout (`validate_layout`) when the step is traced.
    `num_problems` (P, the number of training problems) is required with guidance.per_problem
    (the state's per-problem guidance arrays are [P, ...]) and ignored otherwise.
    """
    validate_config(step_cfg)
    guidance_lib.validate(gcfg)
    _check_problem_count(num_problems, gcfg)
    # Frozen copies: later edits of the caller's configs cannot change a step traced afterwards.
    step_cfg = ml_collections.FrozenConfigDict(step_cfg)
    frozen_gcfg = ml_collections.FrozenConfigDict(gcfg)
    # Read the config once, as Python constants: they are static under jit.
    group_size = int(step_cfg.group_size)
    num_iterations = int(step_cfg.num_iterations)
    temperature = float(step_cfg.temperature)
    chunk_size = int(step_cfg.logprob_chunk_size)
    remat = bool(step_cfg.remat)
    use_kl = float(step_cfg.beta) != 0.0
    dynamic_sampling = bool(step_cfg.dynamic_sampling)
    scale_rewards = step_cfg.scale_rewards
    advantage_eps = float(step_cfg.advantage_eps)
    advantage_baseline = step_cfg.advantage_baseline
    entropy_top_fraction = float(step_cfg.entropy_top_fraction)
    micro_batch_size = int(step_cfg.micro_batch_size)
    num_shards = batch_shard_count(mesh, rules)
    batch_axes = dict(rules)["batch"]

    param_shardings = None
    if mesh is not None:
        abstract_params = jax.eval_shape(lambda: models.init_params(model_cfg, jax.random.key(0)))
        abstract = train_state_lib.abstract_state(abstract_params, optimizer, gcfg, num_problems)
        state_sh = train_state_lib.state_shardings(
            abstract, optimizer, mesh, models.param_logical_axes(model_cfg), rules
        )
        param_shardings = state_sh.params

    def constrain(x, spec):
        return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def micro_logprobs(params, micro_batches, with_entropy=False):  # -> [k, B/k, L] (each), no gradient
        return jax.lax.map(
            lambda mb: compute_logprobs(model_cfg, params, mb, temperature, chunk_size=chunk_size,
                                        with_entropy=with_entropy), micro_batches
        )

    def micro_loss(params, micro, advantages, old_logprobs, ref_logprobs, policy_mask, normalizers, options):
        """normalizers: the global denominators, keyword arguments of `grpo.policy_loss`.

        `micro.old_logprobs` holds the sampler's log-probs: against the trainer's old ones they
        give the `mismatch/*` drift metrics (not for `sft`, whose batches have no sampler) and,
        with step.tis, the truncated importance weights of the policy term."""
        logprobs, entropy = compute_logprobs(
            model_cfg, params, micro, temperature, chunk_size=chunk_size, remat=remat, with_entropy=True
        )  # [b, L] each
        if old_logprobs is None:  # μ = 1: the batch was sampled by these very params
            old_logprobs = jax.lax.stop_gradient(logprobs)
        tis = dict(tis_level=step_cfg.tis, tis_cap=float(step_cfg.tis_cap), tis_weights=None)
        if step_cfg.tis != "none":
            tis["tis_weights"] = grpo.truncated_importance_weights(
                old_logprobs, micro.old_logprobs, micro.completion_mask, micro.guided_mask,
                level=step_cfg.tis, cap=tis["tis_cap"],
            )  # [b, L], no gradient
        loss, metrics = grpo.policy_loss(
            logprobs, old_logprobs, ref_logprobs, advantages, micro.completion_mask,
            guided_mask=micro.guided_mask, entropy=entropy if options["entropy_coef"] else None,
            policy_mask=policy_mask, tis_weights=tis["tis_weights"], **normalizers, **options,
        )
        if options["loss_type"] != "sft":  # combine_metrics merges these over micro-batches too
            metrics.update(grpo.mismatch_metrics(old_logprobs, micro.old_logprobs, micro.completion_mask,
                                                 micro.guided_mask, **tis))
        completion = (micro.completion_mask > 0).astype(jnp.float32)
        entropy_sum = jnp.sum(jax.lax.stop_gradient(entropy) * completion)
        return loss, (metrics, entropy_sum)

    def accumulated_gradients(params, micro_batches, advantages, old_logprobs, ref_logprobs, normalizers,
                              options, policy_mask=None):
        """Sum over micro-batches of the gradients of the globally normalised losses."""
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def add_micro_batch(grad_sum, xs):
            micro, adv, old, ref, selected = xs
            (_, (metrics, entropy_sum)), grads = grad_fn(params, micro, adv, old, ref, selected, normalizers,
                                                         options)
            grad_sum = jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), grad_sum, grads)
            return grad_sum, (metrics, entropy_sum)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        if param_shardings is not None:
            zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
        grads, (per_micro, entropy_sums) = jax.lax.scan(
            add_micro_batch, zeros, (micro_batches, advantages, old_logprobs, ref_logprobs, policy_mask)
        )
        metrics = grpo.combine_metrics(per_micro)
        metrics["entropy"] = entropy_sums.sum() / jnp.maximum(metrics["num_completion_tokens"], 1.0)
        if policy_mask is not None:  # the share of loss tokens that keep their policy term
            metrics["policy_token_share"] = policy_mask.sum() / jnp.maximum(metrics["num_loss_tokens"], 1.0)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return grads, metrics

    def step(state: TrainState, ref_params, batch: RolloutBatch):
        _check_batch(batch)
        batch_size, completion_width = batch.completion_tokens.shape
        num_micro = validate_layout(batch_size, group_size, micro_batch_size, mesh, rules)

        def as_micro(x):  # [B, ...] -> [k, B/k, ...], each micro-batch spread over all batch shards
            out = to_micro_batches(x, num_micro, num_shards, group_size)
            return constrain(out, PartitionSpec(None, batch_axes))

        options = loss_options(step_cfg, completion_width)

        rewards = batch.rewards.astype(jnp.float32)  # [B]
        advantages = grpo.group_advantages(
            rewards, group_size, scale=scale_rewards, eps=advantage_eps, baseline=advantage_baseline,
            guided=batch.guided > 0,
        )  # [B]
        zero_std_rows = zero_std_row_mask(rewards, group_size)  # [B]
        completion_mask = batch.completion_mask  # [B, L] as sampled, for the guidance metrics
        if dynamic_sampling:  # rows of uninformative groups count as absent (grpo's convention)
            batch = batch.replace(completion_mask=jnp.where(zero_std_rows[:, None], 0, batch.completion_mask))
        # The loss's denominators, from the whole batch so micro-batch gradients add up exactly.
        normalizers = dict(normalizer=grpo.loss_normalizer(
            options["loss_type"], batch.completion_mask, options["max_completion_length"],
            guided_mask=batch.guided_mask, guided=options["guided"],
        ))
        if options["guide_nll_coef"]:
            normalizers["guide_normalizer"] = grpo.guide_token_count(batch.completion_mask, batch.guided_mask)

        micro_batches = jax.tree.map(as_micro, batch)
        micro_advantages = as_micro(advantages)  # [k, B/k]
        ref_logprobs = micro_logprobs(ref_params, micro_batches) if use_kl else None  # [k, B/k, L]
        # μ = 1: the old policy is the current one (ratio 1, stop-gradient inside the loss).
        old_logprobs = None
        if num_iterations > 1 and entropy_top_fraction == 1:
            old_logprobs = micro_logprobs(state.params, micro_batches)
        policy_mask = None  # [k, B/k, L]: the high-entropy tokens that keep their policy term
        if entropy_top_fraction < 1:
            # One global selection from the policy before the first update: independent of the
            # micro-batch split and fixed over the μ updates. With μ > 1 the same no-grad forward
            # gives the old log-probs; with μ = 1 it is an extra forward.
            logprobs_before, entropy_before = micro_logprobs(state.params, micro_batches, with_entropy=True)
            old_logprobs = None if num_iterations == 1 else logprobs_before
            loss_tokens = grpo.loss_token_mask(micro_batches.completion_mask, micro_batches.guided_mask,
                                               options["guided"])
            policy_mask = grpo.high_entropy_mask(entropy_before, loss_tokens, entropy_top_fraction)

        def one_update(carry, _):
            params, opt_state = carry
            grads, metrics = accumulated_gradients(
                params, micro_batches, micro_advantages, old_logprobs, ref_logprobs, normalizers, options,
                policy_mask,
            )
            metrics["grad_norm"] = optax.tree.norm(grads)
            # A non-finite loss or gradient (an overflow, a NaN reward) would poison the params and
            # Adam's moments for good: such an update is not applied. The select sits inside the
            # update so XLA can fuse it with apply_updates (no second copy of params and moments).
            finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            params, opt_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old), (new_params, new_opt_state), (params, opt_state))
            metrics["skipped_nonfinite"] = jnp.logical_not(finite).astype(jnp.float32)
            learning_rate = optim.current_learning_rate(opt_state)
            if learning_rate is not None:
                metrics["learning_rate"] = learning_rate
            return (params, opt_state), metrics

        (params, opt_state), per_iteration = jax.lax.scan(
            one_update, (state.params, state.opt_state), None, length=num_iterations
        )
        # Loss, clip fractions, grad norm, ...: the mean over the μ updates.
        metrics = {key: jnp.mean(value) for key, value in per_iteration.items()}
        # 1 when any of the μ updates was skipped; the schedule then keeps its state as well.
        skipped = jnp.max(per_iteration["skipped_nonfinite"])
        metrics["skipped_nonfinite"] = skipped

        reward = guidance_lib.step_reward(batch.accuracy, rewards, frozen_gcfg.reward_source)
        # A skipped update keeps the whole guidance state, per-problem schedules included.
        next_guidance = _next_guidance(state.guidance, batch, reward, frozen_gcfg, group_size, num_problems)
        new_guidance = jax.tree.map(lambda new, old: jnp.where(skipped > 0, old, new),
                                    next_guidance, state.guidance)
        guided_rows = batch.guided > 0  # [B]
        # Guided vs unguided success is reported on the accuracy reward (what the schedule reads).
        metrics.update(guidance_lib.guidance_metrics(
            _mean_length(state.guidance, batch, group_size), batch.accuracy, advantages, guided_rows,
            completion_mask, batch.guided_mask,
        ))
        metrics["guidance/next_length"] = _mean_length(new_guidance, batch, group_size)
        metrics["guidance/step_reward"] = reward
        metrics["reward/mean"] = jnp.mean(rewards)
        metrics["reward/std"] = jnp.std(rewards)
        metrics["accuracy/mean"] = jnp.mean(batch.accuracy.astype(jnp.float32))
        metrics["zero_std_group_fraction"] = jnp.mean(zero_std_rows.astype(jnp.float32))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, guidance=new_guidance)
        return new_state, {key: jnp.asarray(value, jnp.float32) for key, value in metrics.items()}

    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_sh, param_shardings if use_kl else None, _batch_shardings(mesh, rules)),
        out_shardings=(state_sh, replicated),
        donate_argnums=donate_argnums,
    )

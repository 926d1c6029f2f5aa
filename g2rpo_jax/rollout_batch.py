"""The train step's input: a batch of scored rollouts, its checks, and its micro-batch layout.

A batch holds B = number of prompts × G rows, the G rollouts of a group adjacent. Its leading axis
is sharded over the mesh's batch axes (S shards). A micro-batch takes the same number of whole
groups from every shard, so each micro-batch stays spread over all devices and no group is ever
split (`validate_layout` checks the sizes at config time).
"""

from __future__ import annotations

from typing import Optional

import chex
import flax.struct
import jax
import numpy as np
from jax.sharding import Mesh

from g2rpo_jax import grpo
from g2rpo_jax import sharding as sharding_lib


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


def check_batch(batch: RolloutBatch) -> None:
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


def check_shared_prompts(batch: RolloutBatch, group_size: int) -> None:
    """Raises ValueError, naming the first group and rows that differ, unless the G rows of every
    group carry the same prompt tokens and mask (a host-side check of a concrete batch, for a step
    made with `make_train_step(..., shared_prompts=True)`). Arrays spread over several hosts
    cannot be read here and are not checked."""
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} is not valid; valid: an integer >= 1")
    fields = (batch.prompt_tokens, batch.prompt_mask)
    if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in fields):
        return
    tokens, mask = (np.asarray(x) for x in fields)
    rows = tokens.shape[0]
    if rows % group_size:
        raise ValueError(f"batch of {rows} rows is not a whole number of groups of {group_size}")
    for name, x in (("prompt_tokens", tokens), ("prompt_mask", mask)):
        grouped = x.reshape(rows // group_size, group_size, -1)
        differs = np.any(grouped != grouped[:, :1], axis=2)  # [groups, G]
        if differs.any():
            group, member = np.argwhere(differs)[0]
            raise ValueError(
                f"group {group}: rows {group * group_size} and {group * group_size + member} have different "
                f"{name}, but the train step runs one prompt per group (shared_prompts=True); build the step "
                f"with shared_prompts=False for batches whose rollouts carry their own prompts")


def batch_shardings(mesh: Mesh, rules) -> RolloutBatch:
    """Leading-axis sharding over the batch axes for each field (a RolloutBatch of shardings)."""
    ranks = dict(prompt_tokens=2, prompt_mask=2, completion_tokens=2, completion_mask=2, guided_mask=2,
                 rewards=1, accuracy=1, old_logprobs=2, problem_ids=1, guided=1)
    return RolloutBatch(**{name: sharding_lib.batch_sharding(mesh, ndim, rules) for name, ndim in ranks.items()})


# ----------------------------------------------------------------------------- layout


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
    shards = sharding_lib.batch_axis_size(mesh, rules)
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


def drop_zero_std_groups(batch: RolloutBatch, group_size: int) -> tuple[RolloutBatch, float]:
    """Host-side DAPO filter: (the batch without its zero-std groups, the fraction dropped).

    Returns numpy arrays with fewer rows (B' = kept groups × G), for a loop that keeps sampling
    until it has filled a batch; to drop them without changing shapes, set the step's
    `dynamic_sampling` instead.
    """
    rewards = np.asarray(batch.rewards, np.float32)
    keep_group = ~np.asarray(grpo.zero_std_groups(rewards, group_size))  # [B/G]
    keep_row = np.repeat(keep_group, group_size)  # [B]
    kept = jax.tree.map(lambda x: np.asarray(x)[keep_row], batch)
    return kept, float(1.0 - keep_group.mean())

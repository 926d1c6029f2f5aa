"""The guidance-length schedule of G²RPO-A.

A guided rollout starts with the first ℓ tokens of a reference reasoning trajectory forced into its
completion; the model continues from there. This module holds

* the guidance-length schedule: `GuidanceState` (a pytree of arrays that lives in the train state),
  `init`, `update` (jittable, called once per optimizer step with the step's reward) and `length`
  (the integer ℓ used for the next rollouts);
* with `guidance.per_problem`, one such schedule per training problem beside the global one:
  `update_problems` (each group's problem, from that group's mean reward) and `row_lengths`
  (the ℓ of each listed problem);
* the step reward the schedule reads (`step_reward`, `group_rewards`).

Which rollouts of a group are guided, and the metrics that compare them with the unguided ones,
live in `guided_rollouts`.

Step numbering used throughout: `update` is called once after every training step; the k-th call
(k = 1, 2, ...) sees reward r_k, the reward of rollouts generated with the length in force before
that call, and the length it returns is used for the rollouts of step k + 1.

Numerics: ℓ is kept as a float32 between updates so the multiplicative `ratio` rule never
compounds integer truncation; `length` rounds it to the nearest integer (ties to even, as
`jnp.round`) only when it is used.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

MODES = ("none", "fixed", "adaptive", "ratio", "linear_decay")
REWARD_SOURCES = ("accuracy", "total")

# Window means are float32 sums; a reward closer to the mean than this (relative to
# max(1, largest |reward| in the window)) is a tie, so rounding noise never flips a plateau.
TIE_TOLERANCE = 1e-5


def get_default_config() -> ml_collections.ConfigDict:
    """Default guidance section: G²RPO-A's additive adaptive rule.

    Chosen values and why:
    * alpha 0.25: two guided rollouts in a group of 8, the split of the official verl recipe (the
      TRL fork guides 2 of 12); enough guided samples to lift sparse rewards while most of the
      group still explores on its own.
    * initial_length 3072, bounds [1, 3072]: the official code's start and clamp, so both rules
      begin from full-strength guidance and may shrink it almost to nothing but not to zero.
    * window 3: the official code compares the current reward with the two before it, i.e. a
      window of three rewards including the current one.
    * delta 256: a full sweep of the range takes 12 steps, about as fast as the multiplicative
      rule moves for reward swings of ~10% per cycle.
    * update_every 3: the official cycle length (used by `ratio` only).
    * total_steps 1000: horizon of the `linear_decay` baseline; set it to the run's step count.
    * reward_source "accuracy": the official code drives ℓ with the accuracy reward only.
    * per_problem False: one global ℓ, as in the paper.
    """
    cfg = ml_collections.ConfigDict()
    cfg.mode = "adaptive"
    cfg.alpha = 0.25
    cfg.window = 3
    cfg.delta = 256
    cfg.initial_length = 3072
    cfg.min_length = 1
    cfg.max_length = 3072
    cfg.update_every = 3
    cfg.total_steps = 1000
    cfg.reward_source = "accuracy"
    # True: every training problem keeps its own ℓ and reward history, moved by the same rule from
    # the mean reward of that problem's group whenever it is in a batch (the global ℓ still
    # updates, as a logging summary). Needs the problem count: `init(gcfg, num_problems)`.
    cfg.per_problem = False
    # Where and when guides go and what ℓ counts (g2rpo_jax/rollout.py says each in full):
    cfg.placement = "completion"  # completion (G²RPO-A) | prompt (a hint, never a training target)
    cfg.trigger = "always"  # always: α of every group | all_fail: only groups whose unguided rollouts all fail
    cfg.length_unit = "tokens"  # tokens | percent (of the trajectory) | steps (split on step_delimiter)
    cfg.step_delimiter = "\n\n"  # what ends a reasoning step, for length_unit='steps'
    return cfg


_REQUIRED_KEYS = (
    "mode", "alpha", "window", "delta", "initial_length", "min_length", "max_length",
    "update_every", "total_steps", "reward_source", "per_problem",
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def validate(gcfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key, its bad value and the valid options."""
    for key in _REQUIRED_KEYS:
        if key not in gcfg:
            raise ValueError(f"guidance config is missing key {key!r}; required keys: {_REQUIRED_KEYS}")
    if gcfg.mode not in MODES:
        raise ValueError(f"guidance.mode={gcfg.mode!r} is not valid; valid modes: {MODES}")
    if gcfg.reward_source not in REWARD_SOURCES:
        raise ValueError(
            f"guidance.reward_source={gcfg.reward_source!r} is not valid; valid: {REWARD_SOURCES}")
    if not _is_number(gcfg.alpha) or not 0.0 <= gcfg.alpha <= 1.0:
        raise ValueError(f"guidance.alpha={gcfg.alpha!r} is not valid; valid: a number in [0, 1]")
    for key in ("delta", "initial_length", "min_length", "max_length"):
        value = gcfg[key]
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"guidance.{key}={value!r} is not valid; valid: a finite number >= 0")
    if gcfg.min_length > gcfg.max_length:
        raise ValueError(
            f"guidance.min_length={gcfg.min_length!r} is not valid; valid: at most "
            f"guidance.max_length={gcfg.max_length!r}")
    if gcfg.mode in ("adaptive", "ratio") and not (
            gcfg.min_length <= gcfg.initial_length <= gcfg.max_length):
        raise ValueError(
            f"guidance.initial_length={gcfg.initial_length!r} is not valid for mode "
            f"{gcfg.mode!r}; valid: within [min_length, max_length] = "
            f"[{gcfg.min_length!r}, {gcfg.max_length!r}]")
    if gcfg.mode == "ratio" and gcfg.min_length <= 0:
        # ℓ · mean / r can never leave 0 once it gets there.
        raise ValueError(
            f"guidance.min_length={gcfg.min_length!r} is not valid for mode 'ratio'; valid: > 0")
    if not _is_int(gcfg.window) or gcfg.window < 1:
        raise ValueError(f"guidance.window={gcfg.window!r} is not valid; valid: an integer >= 1")
    if not _is_int(gcfg.update_every) or gcfg.update_every < 2:
        # A cycle needs at least one earlier reward to compare the current one with.
        raise ValueError(
            f"guidance.update_every={gcfg.update_every!r} is not valid; valid: an integer >= 2")
    if not _is_int(gcfg.total_steps) or gcfg.total_steps < 1:
        raise ValueError(
            f"guidance.total_steps={gcfg.total_steps!r} is not valid; valid: an integer >= 1")
    if not isinstance(gcfg.per_problem, (bool, np.bool_)):
        raise ValueError(
            f"guidance.per_problem={gcfg.per_problem!r} is not valid; valid: True (one ℓ per "
            f"training problem) or False (one global ℓ)")


@dataclasses.dataclass(frozen=True)
class GuidanceState:
    """Schedule state; arrays only, so it jits, scans, shards and checkpoints like any pytree.

    current_length: float32 []   ℓ before rounding.
    step:           int32 []     number of `update` calls so far (k after the k-th call).
    recent_rewards: float32 [R]  ring buffer of rewards; R is `reward_buffer_size(gcfg)`.
    per_problem:    None, or with `guidance.per_problem` a GuidanceState of P schedules, one per
                    training problem: current_length float32 [P], step int32 [P] (updates of
                    that problem so far), recent_rewards float32 [P, R], per_problem None.

    Registered by hand rather than as a flax struct: a None field would still be a node of the
    tree, and orbax records it (a `per_problem: None` entry in the checkpoint's metadata, which
    checkpoints written before the field existed lack, so they would no longer restore). Here a
    None `per_problem` is no child at all: without the option the tree's keyed leaves, and so
    the checkpoints, are exactly the three arrays above, as before the option existed.
    """

    current_length: jax.Array
    step: jax.Array
    recent_rewards: jax.Array
    per_problem: Optional["GuidanceState"] = None

    def replace(self, **updates) -> "GuidanceState":
        """A copy with the given fields replaced (as flax structs do)."""
        return dataclasses.replace(self, **updates)


_ARRAY_FIELDS = ("current_length", "step", "recent_rewards")


def _flatten_with_keys(state: GuidanceState):
    # The aux data (whether per_problem is present) keeps the two layouts distinct tree types.
    has_table = state.per_problem is not None
    names = _ARRAY_FIELDS + (("per_problem",) if has_table else ())
    return tuple((jax.tree_util.GetAttrKey(name), getattr(state, name)) for name in names), has_table


def _flatten(state: GuidanceState):
    children, has_table = _flatten_with_keys(state)
    return tuple(child for _, child in children), has_table


def _unflatten(has_table: bool, children) -> GuidanceState:
    return GuidanceState(*children)


jax.tree_util.register_pytree_with_keys(GuidanceState, _flatten_with_keys, _unflatten, _flatten)


def reward_buffer_size(gcfg: ml_collections.ConfigDict) -> int:
    """Static size of the reward buffer: the window for `adaptive`, the earlier rewards of a cycle
    for `ratio`, and 1 (unused) otherwise, so every mode has the same pytree structure."""
    if gcfg.mode == "adaptive":
        return int(gcfg.window)
    if gcfg.mode == "ratio":
        return int(gcfg.update_every) - 1
    return 1


def init(gcfg: ml_collections.ConfigDict, num_problems: Optional[int] = None) -> GuidanceState:
    """State before the first step: ℓ = 0 for `none`, otherwise `initial_length`.

    With `guidance.per_problem`, `num_problems` (P, the number of training problems, >= 1) is
    required and `per_problem` holds P copies of the global initial state; without it,
    `num_problems` is ignored (so a caller may always pass it). Raises ValueError otherwise.
    """
    validate(gcfg)
    start = 0.0 if gcfg.mode == "none" else float(gcfg.initial_length)
    state = GuidanceState(
        current_length=jnp.asarray(start, dtype=jnp.float32),
        step=jnp.asarray(0, dtype=jnp.int32),
        recent_rewards=jnp.zeros((reward_buffer_size(gcfg),), dtype=jnp.float32),
    )
    if not gcfg.per_problem:
        return state
    if num_problems is None or not _is_int(num_problems) or num_problems < 1:
        raise ValueError(
            f"guidance.per_problem=True needs num_problems, the number of training problems (an "
            f"integer >= 1), got num_problems={num_problems!r}; pass it to init / "
            f"train_state.create / abstract_state / make_train_step, or set guidance.per_problem=False")
    copies = jax.tree.map(lambda x: jnp.broadcast_to(x, (int(num_problems), *x.shape)), state)
    return state.replace(per_problem=copies)


def length(state: GuidanceState) -> jax.Array:
    """The ℓ to use for the next rollouts: int32 [], ℓ rounded to nearest (ties to even), >= 0."""
    return jnp.maximum(jnp.round(state.current_length), 0.0).astype(jnp.int32)


def _clamp(value: jax.Array, gcfg: ml_collections.ConfigDict) -> jax.Array:
    return jnp.clip(value, jnp.float32(gcfg.min_length), jnp.float32(gcfg.max_length))


def _adaptive_update(state: GuidanceState, reward: jax.Array, gcfg) -> GuidanceState:
    """Step k: m = min(T, k) over r_{k-m+1..k} (r_k included); r_k > mean → ℓ − Δ, else ℓ + Δ."""
    window = int(gcfg.window)
    k = state.step + 1
    rewards = state.recent_rewards.at[state.step % window].set(reward)  # [T]
    # The buffer fills slots 0..T-1 in order, so the first min(k, T) slots hold the window.
    num_valid = jnp.minimum(k, window)
    valid = jnp.arange(window) < num_valid  # [T]
    window_sum = jnp.sum(jnp.where(valid, rewards, 0.0))
    window_mean = window_sum / num_valid.astype(jnp.float32)
    scale = jnp.maximum(1.0, jnp.max(jnp.where(valid, jnp.abs(rewards), 0.0)))
    above_mean = (reward - window_mean) > TIE_TOLERANCE * scale
    delta = jnp.float32(gcfg.delta)
    stepped = jnp.where(above_mean, state.current_length - delta, state.current_length + delta)
    return GuidanceState(current_length=_clamp(stepped, gcfg), step=k, recent_rewards=rewards)


def _ratio_update(state: GuidanceState, reward: jax.Array, gcfg) -> GuidanceState:
    """Official multiplicative rule, cycles of U = update_every steps.

    Step k (1-based, the k-th `update` call) has cycle position p = (k − 1) mod U. Positions
    0..U−2 only record r_k (position 0 starts a new cycle; earlier cycles are forgotten). At
    position U−1, i.e. at k = U, 2U, 3U, ..., the "previous ones in the cycle" are
    r_{k−U+1}, ..., r_{k−1}; with mean their average, if r_k > 0 and mean > 0 then
    ℓ ← clamp(ℓ · mean / r_k, min_length, max_length), otherwise ℓ is unchanged. The new ℓ is
    used from step k + 1 on. With U = 3 this is the official schedule (global steps 1, 2 record,
    3 updates, ...). Unlike the official code, ℓ is not truncated to an integer after every
    update (truncation would compound); `length` rounds it when it is used.
    """
    cycle = int(gcfg.update_every)
    k = state.step + 1
    position = state.step % cycle
    is_update_step = position == cycle - 1
    recorded = state.recent_rewards.at[jnp.minimum(position, cycle - 2)].set(reward)  # [U-1]
    rewards = jnp.where(is_update_step, state.recent_rewards, recorded)
    # At an update step the buffer holds exactly the U−1 earlier rewards of this cycle.
    previous_mean = jnp.sum(state.recent_rewards) / jnp.float32(cycle - 1)
    can_scale = is_update_step & (reward > 0) & (previous_mean > 0)
    safe_reward = jnp.where(reward > 0, reward, 1.0)
    scaled = _clamp(state.current_length * (previous_mean / safe_reward), gcfg)
    new_length = jnp.where(can_scale, scaled, state.current_length)
    return GuidanceState(current_length=new_length, step=k, recent_rewards=rewards)


def _linear_decay_update(state: GuidanceState, gcfg) -> GuidanceState:
    """After k updates ℓ = initial_length · ((total_steps − min(k, total_steps)) / total_steps)."""
    total = int(gcfg.total_steps)
    k = state.step + 1
    remaining = jnp.maximum(total - k, 0).astype(jnp.float32)
    new_length = jnp.float32(gcfg.initial_length) * (remaining / jnp.float32(total))
    return GuidanceState(current_length=new_length, step=k, recent_rewards=state.recent_rewards)


def update(state: GuidanceState, reward: jax.Array, gcfg: ml_collections.ConfigDict) -> GuidanceState:
    """One schedule step from this step's reward r_k (a float32 scalar; see `step_reward`).

    `gcfg` is static: its values are read as Python constants while tracing, so close over it (or
    pass a FrozenConfigDict as a static argument) when jitting. Modes:
      none          ℓ = 0 always.
      fixed         ℓ = initial_length always.
      adaptive      see `_adaptive_update` (window includes r_k; ties, within TIE_TOLERANCE, grow ℓ).
      ratio         see `_ratio_update` (updates at k = U, 2U, ...).
      linear_decay  see `_linear_decay_update` (0 from step total_steps on).
    """
    validate(gcfg)
    expected = (reward_buffer_size(gcfg),)
    if state.recent_rewards.shape != expected:
        raise ValueError(
            f"state.recent_rewards has shape {state.recent_rewards.shape}, but guidance config "
            f"(mode={gcfg.mode!r}) needs {expected}; build the state with init(gcfg)")
    reward = jnp.asarray(reward, dtype=jnp.float32)
    if reward.shape != ():
        raise ValueError(f"reward must be a scalar (the step's mean reward), got shape {reward.shape}")
    if gcfg.mode == "adaptive":
        new_state = _adaptive_update(state, reward, gcfg)
    elif gcfg.mode == "ratio":
        new_state = _ratio_update(state, reward, gcfg)
    elif gcfg.mode == "linear_decay":
        new_state = _linear_decay_update(state, gcfg)
    else:  # none, fixed: ℓ never moves.
        new_state = state.replace(step=state.step + 1)
    # Strong dtypes keep the pytree type identical across steps (lax.scan carries, checkpoints).
    return GuidanceState(
        current_length=new_state.current_length.astype(jnp.float32),
        step=new_state.step.astype(jnp.int32),
        recent_rewards=new_state.recent_rewards.astype(jnp.float32),
        per_problem=state.per_problem,  # the global rule leaves the per-problem schedules alone
    )


def _problem_table(state: GuidanceState, caller: str) -> GuidanceState:
    """`state.per_problem`, or a ValueError saying how to build a state that has it."""
    if state.per_problem is None:
        raise ValueError(
            f"{caller} needs per-problem guidance state, but this state has none; set "
            f"guidance.per_problem=True and build the state with init(gcfg, num_problems)")
    return state.per_problem


def _problem_ids(problem_ids, num_problems: int) -> jax.Array:
    """int32 [num_groups]; concrete ids outside [0, P) raise (traced ones cannot, see callers)."""
    ids = jnp.asarray(problem_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"problem_ids must be integers of shape [num_groups], got {ids.dtype} {ids.shape}")
    if not isinstance(ids, jax.core.Tracer) and ids.size:
        low, high = int(jnp.min(ids)), int(jnp.max(ids))
        if low < 0 or high >= num_problems:
            raise ValueError(
                f"problem_ids must lie in [0, {num_problems}) (the number of training problems the "
                f"state was built for), got ids from {low} to {high}")
    return ids.astype(jnp.int32)


def update_problems(
    state: GuidanceState, problem_ids, group_rewards, gcfg: ml_collections.ConfigDict
) -> GuidanceState:
    """Per-problem schedule step: `update`'s rule (every mode) applied to the listed problems.

    problem_ids:   int [num_groups], the problem (row of `state.per_problem`) of each group.
    group_rewards: float32 [num_groups], that group's mean reward (see `group_rewards`).

    Groups are applied one after another, in order, with `lax.scan`: a problem listed twice is
    updated twice, first with its first group's reward, so the result is deterministic. Unlisted
    problems and the global fields are unchanged. Jittable with `gcfg` static (as `update`).
    Each problem's step count is its own number of updates, so `ratio` cycles and `linear_decay`
    run on the problem's own updates, not on train steps.
    Raises ValueError for a state without per-problem arrays, mismatched shapes, or concrete ids
    outside [0, P); under jit ids cannot be checked, and one outside [0, P) changes nothing.
    """
    table = _problem_table(state, "update_problems")
    num_problems = table.current_length.shape[0]
    ids = _problem_ids(problem_ids, num_problems)
    rewards = jnp.asarray(group_rewards, dtype=jnp.float32)
    if rewards.shape != ids.shape:
        raise ValueError(
            f"group_rewards has shape {rewards.shape}, problem_ids {ids.shape}; both must be "
            f"[num_groups], one reward per listed group")

    def one_group(table, id_and_reward):
        problem, reward = id_and_reward
        inside = (problem >= 0) & (problem < num_problems)
        row = jnp.clip(problem, 0, num_problems - 1)
        old = jax.tree.map(lambda x: x[row], table)
        new = update(old, reward, gcfg)
        new = jax.tree.map(lambda n, o: jnp.where(inside, n, o), new, old)
        return jax.tree.map(lambda t, n: t.at[row].set(n), table, new), None

    table, _ = jax.lax.scan(one_group, table, (ids, rewards))
    return state.replace(per_problem=table)


def row_lengths(state: GuidanceState, problem_ids) -> jax.Array:
    """int32 [num_groups]: the ℓ to use for each listed problem's next rollouts.

    With per-problem state, each problem's own ℓ rounded as `length` rounds; without it, the
    global `length(state)` for every entry. Jittable; on the host, ids outside [0, P) raise
    ValueError (under jit they cannot be checked and read as 0).
    """
    if state.per_problem is None:
        ids = jnp.asarray(problem_ids)
        return jnp.broadcast_to(length(state), ids.shape)
    num_problems = state.per_problem.current_length.shape[0]
    ids = _problem_ids(problem_ids, num_problems)
    return jnp.take(length(state.per_problem), ids, mode="fill", fill_value=0)


def group_rewards(accuracy_rewards: jax.Array, total_rewards: jax.Array, reward_source: str,
                  group_size: int) -> jax.Array:
    """Each group's mean of the chosen reward (as `step_reward`, per group): float32 [B / G]
    from [B] rewards whose groups are G adjacent rows."""
    if reward_source not in REWARD_SOURCES:
        raise ValueError(f"reward_source={reward_source!r} is not valid; valid: {REWARD_SOURCES}")
    chosen = jnp.asarray(accuracy_rewards if reward_source == "accuracy" else total_rewards, jnp.float32)
    if chosen.ndim != 1 or chosen.shape[0] % group_size:
        raise ValueError(f"rewards of shape {chosen.shape} cannot be cut into groups of {group_size}")
    return jnp.mean(chosen.reshape(-1, group_size), axis=1)


def step_reward(accuracy_rewards: jax.Array, total_rewards: jax.Array, reward_source: str) -> jax.Array:
    """r_k: the mean over all rollouts (guided and unguided) of the chosen reward; float32 []."""
    if reward_source not in REWARD_SOURCES:
        raise ValueError(f"reward_source={reward_source!r} is not valid; valid: {REWARD_SOURCES}")
    chosen = accuracy_rewards if reward_source == "accuracy" else total_rewards
    return jnp.mean(jnp.asarray(chosen, dtype=jnp.float32))

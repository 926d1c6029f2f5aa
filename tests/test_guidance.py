"""Tests for g2rpo_jax.guidance against the plain-Python rules in tests/reference/guidance_python.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from g2rpo_jax import guidance, guided_rollouts
from tests.reference import guidance_python as ref

NUM_STEPS = 60
# float32 ℓ against the float64 reference: XLA's division is not correctly rounded (and
# divisions by constants become reciprocal multiplies), so a few ulps per update can compound.
RTOL = 1e-5


def make_config(**overrides) -> ml_collections.ConfigDict:
    """Defaults plus overrides, built fresh so float overrides of int defaults are allowed."""
    values = guidance.get_default_config().to_dict()
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def reward_sequence(seed: int, num_steps: int = NUM_STEPS) -> np.ndarray:
    """Step rewards as a trainer sees them: means of 0/1 accuracies over 8 or 12 rollouts (many
    not exact in binary), exact zeros, plateaus that repeat a value, and a few continuous values."""
    rng = np.random.default_rng(seed)
    rewards = []
    while len(rewards) < num_steps:
        kind = rng.integers(4)
        if kind == 0:
            value = rng.integers(0, 9) / 8
        elif kind == 1:
            value = rng.integers(0, 13) / 12
        elif kind == 2:
            value = 0.0
        else:
            value = rng.uniform(0.0, 1.5)
        repeats = 1 if rng.uniform() < 0.6 else int(rng.integers(2, 6))
        rewards.extend([value] * repeats)
    return np.asarray(rewards[:num_steps], dtype=np.float32)


def run_jitted_steps(gcfg, rewards, step=None):
    """Step by step, one jitted update per reward; returns (ℓ floats, ℓ ints) per step."""
    if step is None:
        step = jax.jit(lambda state, reward: guidance.update(state, reward, gcfg))
    state = guidance.init(gcfg)
    floats, ints = [], []
    for reward in rewards:
        state = step(state, jnp.float32(reward))
        floats.append(np.float32(state.current_length))
        ints.append(int(guidance.length(state)))
    return np.asarray(floats), ints


def reference_schedule(gcfg, rewards):
    if gcfg.mode == "adaptive":
        return ref.adaptive_schedule(rewards, gcfg.initial_length, gcfg.delta, gcfg.window,
                                     gcfg.min_length, gcfg.max_length)
    if gcfg.mode == "ratio":
        return ref.ratio_schedule(rewards, gcfg.initial_length, gcfg.update_every,
                                  gcfg.min_length, gcfg.max_length)
    if gcfg.mode == "linear_decay":
        return ref.linear_decay_schedule(len(rewards), gcfg.initial_length, gcfg.total_steps)
    if gcfg.mode == "fixed":
        return ref.constant_schedule(len(rewards), gcfg.initial_length)
    return ref.constant_schedule(len(rewards), 0)


SCHEDULES = [
    # adaptive: (T, Δ, bounds) varied, including T = 1, a fractional Δ and official-like values.
    dict(mode="adaptive", window=1, delta=1, initial_length=5, min_length=0, max_length=10),
    dict(mode="adaptive", window=3, delta=256, initial_length=3072, min_length=1, max_length=3072),
    dict(mode="adaptive", window=5, delta=7, initial_length=20, min_length=2, max_length=50),
    dict(mode="adaptive", window=4, delta=2.5, initial_length=10.0, min_length=0, max_length=40),
    dict(mode="adaptive", window=8, delta=3, initial_length=30, min_length=0, max_length=60),
    # ratio: cycle lengths 2, 3 (official) and 4.
    dict(mode="ratio", update_every=3, initial_length=3072, min_length=1, max_length=3072),
    dict(mode="ratio", update_every=2, initial_length=50, min_length=1, max_length=100),
    dict(mode="ratio", update_every=4, initial_length=100, min_length=5, max_length=500),
    # linear decay: ending inside and beyond the run, and one barely moving.
    dict(mode="linear_decay", initial_length=3072, total_steps=40),
    dict(mode="linear_decay", initial_length=100, total_steps=7),
    dict(mode="linear_decay", initial_length=17, total_steps=1000),
    dict(mode="fixed", initial_length=64),
    dict(mode="none", initial_length=64),
]


@pytest.mark.parametrize("overrides", SCHEDULES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_schedule_matches_reference_under_jit_and_scan(overrides):
    gcfg = make_config(**overrides)
    step = jax.jit(lambda state, reward: guidance.update(state, reward, gcfg))
    scan = jax.jit(lambda rewards: jax.lax.scan(
        lambda state, reward: scan_body(state, reward, gcfg), guidance.init(gcfg), rewards))
    for seed in (0, 1):
        check_against_reference(gcfg, reward_sequence(seed), step, scan)


def scan_body(state, reward, gcfg):
    state = guidance.update(state, reward, gcfg)
    return state, (state.current_length, guidance.length(state))


def check_against_reference(gcfg, rewards, step, scan):
    expected = reference_schedule(gcfg, rewards.tolist())  # float64

    jit_floats, jit_ints = run_jitted_steps(gcfg, rewards, step)
    _, (scan_floats, scan_ints) = scan(jnp.asarray(rewards))
    scan_floats, scan_ints = np.asarray(scan_floats), np.asarray(scan_ints).tolist()

    np.testing.assert_allclose(jit_floats, expected, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(scan_floats, expected, rtol=RTOL, atol=1e-6)
    np.testing.assert_array_equal(jit_floats, scan_floats)
    assert jit_ints == scan_ints
    # The integer ℓ is the float ℓ (checked against the reference above) rounded by the
    # reference's rule; comparing it with the rounded reference float instead would be fragile
    # only where the two floats straddle a rounding boundary.
    assert jit_ints == [ref.rounded_length(x) for x in jit_floats]


@pytest.mark.parametrize("overrides", [o for o in SCHEDULES if o["mode"] in ("adaptive", "ratio")],
                         ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_reference_sequences_exercise_both_directions(overrides):
    """Guards the comparison above against passing on a schedule that never moves."""
    gcfg = make_config(**overrides)
    rewards = reward_sequence(0).tolist()
    lengths = [float(gcfg.initial_length)] + reference_schedule(gcfg, rewards)
    steps = np.diff(np.asarray(lengths))
    if gcfg.mode == "adaptive" and gcfg.window == 1:
        # m = 1: r_k is its own mean, never above it, so ℓ only grows (until the clamp).
        assert (steps >= 0).all() and (steps > 0).any()
    else:
        assert (steps > 0).any() and (steps < 0).any()


@pytest.mark.parametrize("value", [0.1, 1 / 3, 0.0, 7 / 12])
def test_adaptive_plateau_counts_as_not_above_mean(value):
    """A constant reward equals its window mean, so ℓ must grow by Δ every step (up to the max),
    even for values that are not exact in binary."""
    gcfg = make_config(mode="adaptive", window=4, delta=3, initial_length=2, min_length=0,
                       max_length=20)
    floats, _ = run_jitted_steps(gcfg, np.full((10,), value, dtype=np.float32))
    expected = [min(2 + 3 * k, 20) for k in range(1, 11)]
    np.testing.assert_array_equal(floats, np.asarray(expected, dtype=np.float32))


@pytest.mark.parametrize("update_every", [2, 3, 5])
def test_ratio_changes_only_at_multiples_of_update_every(update_every):
    gcfg = make_config(mode="ratio", update_every=update_every, initial_length=100, min_length=1,
                       max_length=1000)
    rng = np.random.default_rng(update_every)
    rewards = rng.uniform(0.05, 1.0, size=(30,)).astype(np.float32)  # positive: updates never skip
    floats, _ = run_jitted_steps(gcfg, rewards)
    previous = np.concatenate([[np.float32(100)], floats[:-1]])
    changed_at = [k for k in range(1, 31) if floats[k - 1] != previous[k - 1]]
    assert changed_at and all(k % update_every == 0 for k in changed_at)


def test_ratio_skips_when_reward_or_mean_is_zero():
    gcfg = make_config(mode="ratio", update_every=3, initial_length=100, min_length=1,
                       max_length=1000)
    # Cycle 1: mean of previous > 0 but r_3 = 0. Cycle 2: previous all 0, r_6 > 0.
    rewards = np.asarray([0.5, 0.25, 0.0, 0.0, 0.0, 0.75], dtype=np.float32)
    floats, _ = run_jitted_steps(gcfg, rewards)
    np.testing.assert_array_equal(floats, np.full((6,), 100, dtype=np.float32))


def test_linear_decay_reaches_zero_at_total_steps():
    gcfg = make_config(mode="linear_decay", initial_length=90, total_steps=9)
    _, ints = run_jitted_steps(gcfg, np.zeros((12,), np.float32))
    assert ints[:9] == [90 - 10 * k for k in range(1, 10)] and ints[9:] == [0, 0, 0]


def test_update_jits_with_frozen_config_as_static_argument():
    gcfg = ml_collections.FrozenConfigDict(make_config(mode="adaptive", window=2, delta=4,
                                                       initial_length=8, min_length=0, max_length=16))
    step = jax.jit(guidance.update, static_argnames="gcfg")
    state = guidance.init(gcfg)
    rewards = [0.5, 0.75, 0.25, 0.25]
    for reward in rewards:
        state = step(state, jnp.float32(reward), gcfg=gcfg)
    expected = ref.adaptive_schedule(rewards, 8, 4, 2, 0, 16)[-1]
    assert float(state.current_length) == expected


def test_init_length_per_mode():
    assert int(guidance.length(guidance.init(make_config(mode="none", initial_length=64)))) == 0
    for mode in ("fixed", "adaptive", "ratio", "linear_decay"):
        state = guidance.init(make_config(mode=mode, initial_length=64, max_length=100))
        assert int(guidance.length(state)) == 64
        assert state.current_length.dtype == jnp.float32 and state.step.dtype == jnp.int32


@pytest.mark.parametrize("value", [2.5, 3.5, 2.49, 2.51, 0.5, 1.5, 0.0, 3071.5])
def test_length_rounds_to_nearest_with_ties_to_even(value):
    state = guidance.init(make_config(mode="fixed", initial_length=1))
    state = state.replace(current_length=jnp.float32(value))
    assert int(guidance.length(state)) == ref.rounded_length(np.float32(value))
    assert guidance.length(state).dtype == jnp.int32


def test_state_buffer_sized_from_config():
    assert guidance.init(make_config(mode="adaptive", window=7)).recent_rewards.shape == (7,)
    assert guidance.init(make_config(mode="ratio", update_every=4)).recent_rewards.shape == (3,)
    assert guidance.init(make_config(mode="fixed")).recent_rewards.shape == (1,)


def test_update_rejects_mismatched_state_and_bad_reward():
    state = guidance.init(make_config(mode="adaptive", window=3))
    with pytest.raises(ValueError, match="recent_rewards"):
        guidance.update(state, 0.5, make_config(mode="adaptive", window=5))
    with pytest.raises(ValueError, match="scalar"):
        guidance.update(state, jnp.zeros((2,)), make_config(mode="adaptive", window=3))


def test_default_config_is_adaptive_and_valid():
    gcfg = guidance.get_default_config()
    assert gcfg.mode == "adaptive"
    guidance.validate(gcfg)
    for mode in guidance.MODES:
        guidance.validate(make_config(mode=mode))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(mode="cosine"), "mode"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=-0.1), "alpha"),
        (dict(window=0), "window"),
        (dict(delta=-1), "delta"),
        (dict(min_length=10, max_length=5, initial_length=5), "min_length"),
        (dict(mode="adaptive", initial_length=4000), "initial_length"),
        (dict(mode="ratio", min_length=0), "min_length"),
        (dict(update_every=1), "update_every"),
        (dict(total_steps=0), "total_steps"),
        (dict(reward_source="format"), "reward_source"),
    ],
)
def test_validate_names_key_and_bad_value(overrides, key):
    with pytest.raises(ValueError) as error:
        guidance.validate(make_config(**overrides))
    message = str(error.value)
    assert key in message and repr(overrides[key]) in message


def test_validate_reports_missing_key():
    values = guidance.get_default_config().to_dict()
    del values["window"]
    with pytest.raises(ValueError, match="window"):
        guidance.validate(ml_collections.ConfigDict(values))


@pytest.mark.parametrize("source", ["accuracy", "total"])
def test_step_reward_is_mean_of_chosen_source(source):
    rng = np.random.default_rng(3)
    accuracy = rng.integers(0, 2, size=(24,)).astype(np.float32)
    total = accuracy + rng.uniform(0, 0.5, size=(24,)).astype(np.float32)
    chosen = accuracy if source == "accuracy" else total
    got = guidance.step_reward(jnp.asarray(accuracy), jnp.asarray(total), source)
    np.testing.assert_allclose(float(got), float(np.mean(chosen.astype(np.float64))), rtol=1e-6)
    with pytest.raises(ValueError, match="reward_source"):
        guidance.step_reward(accuracy, total, "format")


def test_state_round_trips_through_orbax_checkpoint(tmp_path):
    gcfg = make_config(mode="adaptive", window=4, delta=5, initial_length=40, min_length=0,
                       max_length=80)
    step = jax.jit(lambda state, reward: guidance.update(state, reward, gcfg))
    state = guidance.init(gcfg)
    rewards = reward_sequence(5, 11)
    for reward in rewards[:7]:
        state = step(state, reward)
    # Nested the way a train state carries it.
    tree = {"step": jnp.int32(7), "guidance": state}

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", tree)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored = checkpointer.restore(tmp_path / "ckpt", abstract)

    assert isinstance(restored["guidance"], guidance.GuidanceState)
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    for original, loaded in zip(jax.tree.leaves(tree), jax.tree.leaves(restored)):
        assert original.dtype == loaded.dtype and original.shape == loaded.shape
        np.testing.assert_array_equal(np.asarray(original), np.asarray(loaded))
    # Training continues identically from the restored state.
    resumed, continued = restored["guidance"], state
    for reward in rewards[7:]:
        resumed, continued = step(resumed, reward), step(continued, reward)
    np.testing.assert_array_equal(np.asarray(resumed.current_length),
                                  np.asarray(continued.current_length))


# ---------------------------------------------------------------------------------------------
# Assignment of guided rollouts and their prefixes.

# Includes halves that round-half-to-even would send down (0.5·5, 0.25·10) and 0.58·25, whose
# binary product is 14.499999999999998 while the decimal one is 14.5.
ALPHA_GROUP_SIZES = [(0.0, 8), (0.25, 8), (0.05, 8), (0.5, 3), (0.35, 10), (1.0, 5), (0.3, 7),
                     (0.125, 16), (0.9, 4), (1 / 6, 12), (0.5, 5), (0.25, 10), (0.58, 25)]


@pytest.mark.parametrize("alpha, group_size", ALPHA_GROUP_SIZES)
def test_assign_guided_exact_count_per_group(alpha, group_size):
    num_groups = 6
    guided = np.asarray(guided_rollouts.assign_guided(jax.random.key(0), num_groups, group_size, alpha))
    assert guided.shape == (num_groups * group_size,) and guided.dtype == bool
    expected = ref.guided_count(alpha, group_size)
    assert guided_rollouts.guided_per_group(alpha, group_size) == expected
    np.testing.assert_array_equal(guided.reshape(num_groups, group_size).sum(axis=1),
                                  np.full((num_groups,), expected))


def test_assign_guided_is_deterministic_and_varies_with_rng():
    draw = functools.partial(guided_rollouts.assign_guided, num_groups=20, group_size=8, alpha=0.25)
    first = np.asarray(draw(jax.random.key(7)))
    np.testing.assert_array_equal(first, np.asarray(draw(jax.random.key(7))))
    others = [np.asarray(draw(jax.random.key(seed))) for seed in range(8, 12)]
    assert any(not np.array_equal(first, other) for other in others)
    # Groups of one draw are placed independently, not with one shared pattern.
    assert len({tuple(row) for row in first.reshape(20, 8)}) > 1


def test_assign_guided_positions_are_uniform_within_groups():
    guided = np.asarray(guided_rollouts.assign_guided(jax.random.key(3), 4000, 8, 0.25)).reshape(4000, 8)
    np.testing.assert_allclose(guided.mean(axis=0), np.full((8,), 0.25), atol=0.03)


def test_assign_guided_under_jit_matches_eager():
    key = jax.random.key(11)
    jitted = jax.jit(functools.partial(guided_rollouts.assign_guided, num_groups=5, group_size=6, alpha=0.5))
    np.testing.assert_array_equal(np.asarray(jitted(key)),
                                  np.asarray(guided_rollouts.assign_guided(key, 5, 6, 0.5)))


@pytest.mark.parametrize("alpha", [-0.1, 1.01])
def test_assign_guided_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        guided_rollouts.assign_guided(jax.random.key(0), 2, 4, alpha)


@pytest.mark.parametrize("guided_pattern", ["mixed", "all", "none"])
def test_guidance_metrics_match_reference(guided_pattern):
    rng = np.random.default_rng(4)
    n, width = 12, 9
    guided = {"mixed": rng.uniform(size=(n,)) < 0.4, "all": np.ones((n,), bool),
              "none": np.zeros((n,), bool)}[guided_pattern]
    rewards = rng.integers(0, 2, size=(n,)).astype(np.float32)
    advantages = rng.normal(size=(n,)).astype(np.float32)
    completion_lengths = rng.integers(1, width + 1, size=(n,))
    completion_mask = (np.arange(width)[None, :] < completion_lengths[:, None]).astype(np.int32)
    guide_lengths = np.where(guided, rng.integers(0, width + 1, size=(n,)), 0)
    guided_token_mask = (np.arange(width)[None, :] < guide_lengths[:, None]).astype(np.int32)

    got = jax.jit(guided_rollouts.guidance_metrics)(jnp.int32(7), rewards, advantages, guided,
                                             completion_mask, guided_token_mask)
    expected = ref.metrics(7, rewards, advantages, guided, completion_mask, guided_token_mask)
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(float(got[key]), value, rtol=1e-5, atol=1e-6, err_msg=key)

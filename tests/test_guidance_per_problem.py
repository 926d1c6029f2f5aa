"""Per-problem guidance (guidance.per_problem): the schedule of every training problem against the
plain-Python rules of tests/reference/guidance_python.py, and its wiring into the train step.

Two comparisons for every schedule, with different tolerances for different reasons:
* against the library's own single-problem `update` run on each problem's reward subsequence:
  exact, since `update_problems` must apply those very float32 operations, in the same order;
* against the float64 reference: the relative tolerance of tests/test_guidance.py (RTOL), since
  the library keeps ℓ in float32 (see the comment on RTOL there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from g2rpo_jax import guidance, sharding, train_state, train_step
from tests.reference import guidance_python as ref
from tests.test_guidance import RTOL, make_config, reference_schedule, reward_sequence
from tests.test_train_step import G, compile_step, guidance_config, model, rollout_batch, step_config  # noqa: F401

NUM_PROBLEMS = 6  # ids are drawn from 0..4: problem 5 is never listed, so it must never change
NUM_GROUPS = 4
NUM_STEPS = 30

PER_PROBLEM_SCHEDULES = [
    dict(mode="adaptive", window=3, delta=256, initial_length=3072, min_length=1, max_length=3072),
    dict(mode="adaptive", window=2, delta=2.5, initial_length=10.0, min_length=0, max_length=40),
    dict(mode="ratio", update_every=3, initial_length=3072, min_length=1, max_length=3072),
    dict(mode="ratio", update_every=2, initial_length=50, min_length=1, max_length=100),
    dict(mode="linear_decay", initial_length=100, total_steps=7),
    dict(mode="fixed", initial_length=64),
]


def per_problem_config(**overrides):
    return make_config(per_problem=True, **overrides)


def random_steps(seed: int):
    """(ids int32 [K, N], rewards float32 [K, N]): N groups per step, ids from 0..4, with a problem
    listed twice in one batch at steps 0 and 1 (and by chance elsewhere)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, NUM_PROBLEMS - 1, size=(NUM_STEPS, NUM_GROUPS))
    ids[0, :2] = 2
    ids[1, 3] = ids[1, 1]
    rewards = reward_sequence(seed, NUM_STEPS * NUM_GROUPS).reshape(NUM_STEPS, NUM_GROUPS)
    return ids.astype(np.int32), rewards


def single_rule_tables(gcfg, ids, rewards) -> np.ndarray:
    """float32 [K, P]: every problem's ℓ after each step from the ordinary global `update`, run on
    that problem's own rewards in batch order (problems not yet listed keep the initial ℓ)."""
    step = jax.jit(lambda state, reward: guidance.update(state, reward, gcfg))
    states = [guidance.init(make_config(**{**gcfg.to_dict(), "per_problem": False}))] * NUM_PROBLEMS
    tables = []
    for step_ids, step_rewards in zip(ids, rewards):
        for problem, reward in zip(step_ids, step_rewards):
            states[problem] = step(states[problem], jnp.float32(reward))
        tables.append([np.float32(s.current_length) for s in states])
    return np.asarray(tables, np.float32)


def reference_tables(gcfg, ids, rewards) -> np.ndarray:
    steps = [list(zip(i.tolist(), r.tolist())) for i, r in zip(ids, rewards)]
    schedule = functools.partial(reference_schedule, gcfg)
    return np.asarray(ref.per_problem_schedules(NUM_PROBLEMS, steps, schedule, gcfg.initial_length))


@pytest.mark.parametrize("overrides", PER_PROBLEM_SCHEDULES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_every_problem_follows_the_reference_under_jit_and_scan(overrides):
    gcfg = per_problem_config(**overrides)
    ids, rewards = random_steps(sum(map(ord, gcfg.mode)))
    start = guidance.init(gcfg, NUM_PROBLEMS)

    jitted = jax.jit(lambda state, i, r: guidance.update_problems(state, i, r, gcfg))
    state, jit_tables, jit_ints = start, [], []
    for step_ids, step_rewards in zip(ids, rewards):
        state = jitted(state, step_ids, step_rewards)
        jit_tables.append(np.asarray(state.per_problem.current_length))
        jit_ints.append(np.asarray(guidance.row_lengths(state, np.arange(NUM_PROBLEMS))))

    def body(state, xs):
        state = guidance.update_problems(state, *xs, gcfg)
        return state, state.per_problem.current_length

    scanned, scan_tables = jax.jit(lambda i, r: jax.lax.scan(body, start, (i, r)))(ids, rewards)

    exact = single_rule_tables(gcfg, ids, rewards)
    np.testing.assert_array_equal(np.asarray(jit_tables), exact)
    np.testing.assert_array_equal(np.asarray(scan_tables), exact)
    np.testing.assert_allclose(exact, reference_tables(gcfg, ids, rewards), rtol=RTOL, atol=1e-6)
    # ℓ as used: the float ℓ rounded by the reference's rule (halves to even).
    np.testing.assert_array_equal(np.asarray(jit_ints), np.vectorize(ref.rounded_length)(exact))
    # The whole final state agrees, step counts and reward buffers included; the global fields and
    # the never-listed problem 5 are untouched.
    jax.tree.map(np.testing.assert_array_equal, scanned, state)
    for field in ("current_length", "step", "recent_rewards"):
        np.testing.assert_array_equal(getattr(state, field), getattr(start, field))
        np.testing.assert_array_equal(getattr(state.per_problem, field)[5], getattr(start.per_problem, field)[5])
    counts = np.bincount(ids.ravel(), minlength=NUM_PROBLEMS)
    np.testing.assert_array_equal(state.per_problem.step, counts)


@pytest.mark.parametrize("overrides", [o for o in PER_PROBLEM_SCHEDULES if o["mode"] in ("adaptive", "ratio")],
                         ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_reference_problems_move_both_ways_and_apart(overrides):
    """Guards the comparison above against passing on schedules that never move or never differ."""
    gcfg = per_problem_config(**overrides)
    ids, rewards = random_steps(sum(map(ord, gcfg.mode)))
    tables = reference_tables(gcfg, ids, rewards)  # [K, P]
    moves = np.diff(np.concatenate([np.full((1, NUM_PROBLEMS), float(gcfg.initial_length)), tables]), axis=0)
    assert (moves > 0).any() and (moves < 0).any()
    assert len(set(tables[-1, :5].tolist())) > 1  # the problems end on different ℓ


@pytest.mark.parametrize("rewards, expected", [((0.2, 0.8), 10.0), ((0.8, 0.2), 12.0)])
def test_a_problem_listed_twice_is_updated_twice_in_batch_order(rewards, expected):
    # Window 2: the second reward is compared with the mean of both, so the order matters.
    gcfg = per_problem_config(mode="adaptive", window=2, delta=1, initial_length=10, min_length=0, max_length=20)
    state = jax.jit(lambda s, r: guidance.update_problems(s, jnp.array([1, 1]), r, gcfg))(
        guidance.init(gcfg, 3), jnp.asarray(rewards, jnp.float32))
    assert state.per_problem.current_length.tolist() == [10.0, expected, 10.0]
    assert state.per_problem.step.tolist() == [0, 2, 0]
    assert expected == ref.adaptive_schedule(rewards, 10, 1, 2, 0, 20)[-1]


def test_global_update_keeps_the_per_problem_state():
    gcfg = per_problem_config(mode="adaptive", window=3, delta=4, initial_length=8, min_length=0, max_length=16)
    state = guidance.update_problems(guidance.init(gcfg, 4), np.array([2], np.int32), np.array([0.5], np.float32), gcfg)
    updated = jax.jit(lambda s: guidance.update(s, jnp.float32(0.25), gcfg))(state)
    assert float(updated.current_length) == ref.adaptive_schedule([0.25], 8, 4, 3, 0, 16)[-1]
    jax.tree.map(np.testing.assert_array_equal, updated.per_problem, state.per_problem)


def test_update_problems_errors_and_ids_outside_the_table_under_jit():
    gcfg = per_problem_config(mode="adaptive", window=3)
    state = guidance.init(gcfg, 4)
    with pytest.raises(ValueError, match=r"guidance.per_problem=True and build the state with init\(gcfg, num_problems\)"):
        guidance.update_problems(guidance.init(make_config()), np.array([0]), np.array([0.5]), gcfg)
    with pytest.raises(ValueError, match=r"group_rewards has shape \(3,\), problem_ids \(2,\)"):
        guidance.update_problems(state, np.array([0, 1]), np.zeros((3,)), gcfg)
    with pytest.raises(ValueError, match="problem_ids must be integers"):
        guidance.update_problems(state, np.array([0.0, 1.0]), np.zeros((2,)), gcfg)
    for bad in ([0, 4], [-1, 2]):
        with pytest.raises(ValueError, match=r"problem_ids must lie in \[0, 4\)"):
            guidance.update_problems(state, np.array(bad), np.zeros((2,)), gcfg)
    # Traced ids cannot raise: one outside [0, P) changes nothing (and is not wrapped around).
    jitted = jax.jit(lambda s, i: guidance.update_problems(s, i, jnp.full(i.shape, 0.5), gcfg))
    jax.tree.map(np.testing.assert_array_equal, jitted(state, jnp.array([4, -1, 9])), state)


def test_row_lengths_per_problem_and_global():
    gcfg = per_problem_config(mode="fixed", initial_length=7)
    state = guidance.init(gcfg, 5)
    values = np.asarray([2.5, 3.5, 0.49, 3071.5, 12.0], np.float32)  # ties round to even
    state = state.replace(per_problem=state.per_problem.replace(current_length=jnp.asarray(values)))
    ids = np.array([4, 0, 1, 1, 3, 2], np.int32)
    got = guidance.row_lengths(state, ids)
    assert got.dtype == jnp.int32
    assert got.tolist() == [ref.rounded_length(values[i]) for i in ids] == [12, 2, 4, 4, 3072, 0]
    np.testing.assert_array_equal(jax.jit(guidance.row_lengths)(state, ids), got)
    with pytest.raises(ValueError, match=r"problem_ids must lie in \[0, 5\) .*got ids from 0 to 5"):
        guidance.row_lengths(state, [0, 5])
    # Without per-problem state: the global ℓ for every listed problem (any ids).
    off = guidance.init(make_config(mode="fixed", initial_length=7)).replace(current_length=jnp.float32(6.5))
    assert guidance.row_lengths(off, [3, 0, 99]).tolist() == [6, 6, 6]


def test_init_per_problem_state_and_errors():
    gcfg = per_problem_config(mode="ratio", update_every=4, initial_length=30, max_length=100)
    state = guidance.init(gcfg, 3)
    single = guidance.init(make_config(mode="ratio", update_every=4, initial_length=30, max_length=100))
    assert state.per_problem.per_problem is None
    for field, shape, dtype in (("current_length", (3,), jnp.float32), ("step", (3,), jnp.int32),
                                ("recent_rewards", (3, 3), jnp.float32)):
        table = getattr(state.per_problem, field)
        assert table.shape == shape and table.dtype == dtype
        np.testing.assert_array_equal(table, np.broadcast_to(getattr(single, field), shape))
        np.testing.assert_array_equal(getattr(state, field), getattr(single, field))
    for bad in (None, 0, -2, 2.5, True, "3"):
        with pytest.raises(ValueError, match=rf"guidance.per_problem=True needs num_problems.*num_problems={bad!r}"):
            guidance.init(gcfg, bad)
    # Off: num_problems is ignored and the state is the three global arrays, as before the option.
    off = guidance.init(make_config(), 3)
    assert off.per_problem is None
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(off)[0]]
    assert paths == [".current_length", ".step", ".recent_rewards"]


def test_per_problem_flag_defaults_off_and_must_be_a_bool():
    assert guidance.get_default_config().per_problem is False
    guidance.validate(make_config(per_problem=np.bool_(True)))
    for bad in ("yes", 1, 0, None, "False"):
        with pytest.raises(ValueError) as error:
            guidance.validate(make_config(per_problem=bad))
        assert f"guidance.per_problem={bad!r} is not valid; valid: True" in str(error.value)


@pytest.mark.parametrize("source", ["accuracy", "total"])
def test_group_rewards_are_group_means_of_the_chosen_source(source):
    rng = np.random.default_rng(7)
    accuracy = rng.integers(0, 2, size=(24,)).astype(np.float32)
    total = accuracy + rng.uniform(0, 0.5, size=(24,)).astype(np.float32)
    chosen = accuracy if source == "accuracy" else total
    got = guidance.group_rewards(accuracy, total, source, 6)
    assert got.shape == (4,) and got.dtype == jnp.float32
    # A float32 sum of 6 terms in an order XLA chooses, then one division: a few ulps at most.
    np.testing.assert_allclose(got, chosen.astype(np.float64).reshape(4, 6).mean(axis=1),
                               rtol=6 * np.finfo(np.float32).eps)
    with pytest.raises(ValueError, match="cannot be cut into groups of 5"):
        guidance.group_rewards(accuracy, total, source, 5)


# ----------------------------------------------------------------------------- the train step

STEP_PROBLEMS = 5
# Two steps of 4 groups: problem 3 twice in the first batch, problem 1 twice in the second;
# problems 2 and 4 are never listed.
STEP_IDS = ([3, 1, 3, 0], [1, 1, 0, 3])


def step_guidance_config():
    gcfg = guidance_config()  # adaptive, window 3, ℓ from 64 by Δ = 8
    gcfg.per_problem = True
    return gcfg


@pytest.fixture(scope="module")
def per_problem_step(model):
    """(compiled step, fresh state, two batches) with per-problem guidance; compiled once."""
    cfg, params, _, _ = model
    gcfg = step_guidance_config()
    step_fn = train_step.make_train_step(cfg, step_config(beta=0.0), gcfg, optax.sgd(1.0), donate=False,
                                         num_problems=STEP_PROBLEMS)
    state = train_state.create(params, optax.sgd(1.0), gcfg, jax.random.key(0), num_problems=STEP_PROBLEMS)
    batches = [rollout_batch(4, seed=seed).replace(problem_ids=np.repeat(np.int32(ids), G))
               for seed, ids in enumerate(STEP_IDS)]
    return compile_step(step_fn, state, None, batches[0]), state, batches


def test_step_updates_exactly_the_listed_problems(per_problem_step):
    compiled, state, batches = per_problem_step
    gcfg = step_guidance_config()
    steps, lengths_used, next_lengths = [], [], []
    for batch, ids in zip(batches, STEP_IDS):
        before = state
        state, metrics = compiled(state, None, batch)
        group_accuracy = np.asarray(batch.accuracy).reshape(-1, G).mean(axis=1)  # k/4: exact
        steps.append(list(zip(ids, group_accuracy.tolist())))
        # Bitwise the library's update_problems after the global update, from the accuracy means.
        expected = guidance.update(before.guidance, np.mean(batch.accuracy), gcfg)
        expected = guidance.update_problems(expected, np.int32(ids), group_accuracy, gcfg)
        jax.tree.map(np.testing.assert_array_equal, state.guidance, expected)
        lengths_used.append(float(metrics["guidance/length"]))
        next_lengths.append(float(metrics["guidance/next_length"]))
    table = ref.per_problem_schedules(
        STEP_PROBLEMS, steps, lambda h: ref.adaptive_schedule(h, 64, 8, 3, 1, 3072), 64)
    # ℓ moves by whole Δ = 8 from 64: every value is an integer float32 holds exactly, so the
    # float32 rule and the float64 reference agree exactly.
    np.testing.assert_array_equal(state.guidance.per_problem.current_length, np.float32(table[-1]))
    assert table[-1][2] == table[-1][4] == 64.0 and len(set(table[-1])) > 1
    np.testing.assert_array_equal(state.guidance.per_problem.step, [2, 3, 0, 3, 0])  # groups seen
    # The metrics: the mean ℓ of the batch's groups, before (as used) and after the step.
    assert lengths_used == [64.0, float(np.mean([table[0][i] for i in STEP_IDS[1]]))]
    assert next_lengths == [float(np.mean([table[k][i] for i in ids])) for k, ids in enumerate(STEP_IDS)]


def test_skipped_step_keeps_the_per_problem_state(per_problem_step):
    compiled, state, batches = per_problem_step
    rewards = np.asarray(batches[0].rewards).copy()
    rewards[3] = np.nan
    new_state, metrics = compiled(state, None, batches[0].replace(rewards=rewards))
    assert float(metrics["skipped_nonfinite"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, new_state.guidance, state.guidance)


def test_step_without_per_problem_keeps_the_state_structure(model):
    """Traced only (no compile): the output state has the input's structure, and the guidance in
    it is the three global arrays of before the option."""
    cfg, params, _, _ = model
    step_fn = train_step.make_train_step(cfg, step_config(beta=0.0), guidance_config(), optax.sgd(1.0),
                                         donate=False)
    state = train_state.create(params, optax.sgd(1.0), guidance_config(), jax.random.key(0), num_problems=9)
    new_state, _ = jax.eval_shape(step_fn, state, None, rollout_batch(4))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    paths = [(jax.tree_util.keystr(p), x.shape) for p, x in jax.tree_util.tree_flatten_with_path(new_state.guidance)[0]]
    assert paths == [(".current_length", ()), (".step", ()), (".recent_rewards", (3,))]


def test_make_train_step_needs_num_problems_and_lays_out_the_table(model):
    cfg, params, _, _ = model
    gcfg = step_guidance_config()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    for bad in (None, 0):
        with pytest.raises(ValueError, match=rf"guidance.per_problem=True needs make_train_step\(\.\.\., "
                                             rf"num_problems=P\).*num_problems={bad!r}"):
            train_step.make_train_step(cfg, step_config(beta=0.0), gcfg, optax.sgd(1.0), mesh=mesh, num_problems=bad)
    # With a mesh the step's state shardings come from an abstract state with the table: lowering
    # (no compile) checks they fit a real per-problem state, and the batch's problem ids.
    step_fn = train_step.make_train_step(cfg, step_config(beta=0.0), gcfg, optax.sgd(1.0), mesh=mesh,
                                         donate=False, num_problems=STEP_PROBLEMS)
    state = train_state.create(params, optax.sgd(1.0), gcfg, jax.random.key(0), num_problems=STEP_PROBLEMS)
    step_fn.lower(state, None, rollout_batch(8))
    # A state built for another problem count is refused when the step is traced.
    other = train_state.create(params, optax.sgd(1.0), gcfg, jax.random.key(0), num_problems=STEP_PROBLEMS + 1)
    single = train_step.make_train_step(cfg, step_config(beta=0.0), gcfg, optax.sgd(1.0), donate=False,
                                        num_problems=STEP_PROBLEMS)
    with pytest.raises(ValueError, match="the state's guidance has 6 problems but the step was made with num_problems=5"):
        jax.eval_shape(single, other, None, rollout_batch(4))

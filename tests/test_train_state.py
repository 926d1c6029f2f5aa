"""TrainState, its shardings and orbax checkpoints; the optimizer against a numpy AdamW."""

from __future__ import annotations

import json
import logging
import math
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from g2rpo_jax import guidance, models, optim, sharding, train_state

TINY = models.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                          num_kv_heads=2, head_dim=8)


_init_params = jax.jit(models.init_params, static_argnums=0)  # one compile instead of eager flax init


def optimizer_config(**overrides):
    ocfg = optim.get_default_config()
    ocfg.update(dict(learning_rate=1e-2, min_learning_rate=1e-3, warmup_steps=2, total_steps=10,
                     weight_decay=0.1, max_grad_norm=0.5))
    ocfg.update(overrides)
    return ocfg


def random_like(tree, seed):
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(tree)))
    leaves = [jax.random.normal(k, x.shape, x.dtype) for x, k in zip(jax.tree.leaves(tree), keys)]
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def advanced_state(optimizer, gcfg, seed=0):
    """A state with nothing at its initial value: params, moments, counts, guidance, rng, step."""

    @jax.jit  # one compile instead of a hundred eager ones
    def advance(params, grads):
        state = train_state.create(params, optimizer, gcfg, jax.random.key(seed + 1))
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        state = state.replace(params=jax.tree.map(jnp.add, params, updates), opt_state=opt_state, step=jnp.int32(3))
        state = state.replace(guidance=guidance.update(state.guidance, jnp.float32(0.4), gcfg))
        return state.replace(rng=jax.random.key_data(state.step_key(7)))

    params = _init_params(TINY, jax.random.key(seed))
    return advance(params, random_like(params, seed + 2))


def assert_states_equal(restored, expected):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ----------------------------------------------------------------------------- optimizer


def reference_learning_rate(n, peak, floor, warmup, total):
    if n < warmup:
        return peak * n / warmup
    progress = min((n - warmup) / (total - warmup), 1.0)
    return floor + (peak - floor) * (1 + math.cos(math.pi * progress)) / 2


def test_schedule_warms_up_linearly_then_cosine_to_floor():
    schedule = optim.learning_rate_schedule(optimizer_config(warmup_steps=4, total_steps=20))
    for n in range(0, 25):
        expected = reference_learning_rate(n, 1e-2, 1e-3, 4, 20)
        # A few float32 operations (n / steps, cos, a product, a sum) on values up to the peak,
        # each rounding by eps of its operands: a handful of eps times the peak at any n.
        np.testing.assert_allclose(float(schedule(n)), expected, rtol=0, atol=8 * np.finfo(np.float32).eps * 1e-2)
    assert float(schedule(0)) == 0.0 and float(schedule(4)) == pytest.approx(1e-2)
    no_warmup = optim.learning_rate_schedule(optimizer_config(warmup_steps=0))
    assert float(no_warmup(0)) == pytest.approx(1e-2)  # the first update already uses the peak


def numpy_adamw(params, grads_per_step, lrs, *, b1, b2, eps, weight_decay, max_grad_norm):
    """Plain AdamW with global-norm clipping; decay only on matrices (float64)."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    nu = {k: np.zeros_like(v) for k, v in params.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        norm = math.sqrt(sum(float((np.asarray(g, np.float64) ** 2).sum()) for g in grads.values()))
        scale = min(1.0, max_grad_norm / norm)
        for k in params:
            g = np.asarray(grads[k], np.float64) * scale
            mu[k] = b1 * mu[k] + (1 - b1) * g
            nu[k] = b2 * nu[k] + (1 - b2) * g * g
            step = (mu[k] / (1 - b1**t)) / (np.sqrt(nu[k] / (1 - b2**t)) + eps)
            if params[k].ndim >= 2:
                step = step + weight_decay * params[k]
            params[k] = params[k] - lr * step
    return params


def test_optimizer_matches_numpy_adamw_with_clipping_and_decay_mask():
    ocfg = optimizer_config(warmup_steps=1, total_steps=4)
    optimizer = optim.make_optimizer(ocfg)
    rs = np.random.RandomState(0)
    params = {"matrix": jnp.asarray(rs.randn(3, 4), jnp.float32), "scale": jnp.asarray(rs.randn(4), jnp.float32)}
    grads_per_step = [{k: jnp.asarray(rs.randn(*v.shape), jnp.float32) for k, v in params.items()} for _ in range(3)]
    state, current, used = optimizer.init(params), params, []
    for grads in grads_per_step:
        updates, state = optimizer.update(grads, state, current)
        current = jax.tree.map(jnp.add, current, updates)
        used.append(float(optim.current_learning_rate(state)))
    lrs = [reference_learning_rate(n, 1e-2, 1e-3, 1, 4) for n in range(3)]
    np.testing.assert_allclose(used, lrs, rtol=1e-6)
    expected = numpy_adamw(params, grads_per_step, lrs, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1,
                           max_grad_norm=0.5)
    for key in params:
        np.testing.assert_allclose(np.asarray(current[key]), expected[key], rtol=1e-5, atol=1e-7)
    # The gradients are far above the clip norm, so clipping was exercised.
    assert all(math.sqrt(sum(float((g**2).sum()) for g in gs.values())) > 2 for gs in grads_per_step)


@pytest.mark.parametrize(
    "key,value,message",
    [("learning_rate", -1.0, "optim.learning_rate=-1.0"), ("b2", 1.0, "optim.b2=1.0"),
     ("total_steps", 1, "optim.total_steps=1 is not valid; valid: an integer >= max\\(1, warmup_steps=2\\)"),
     ("min_learning_rate", 1.0, "optim.min_learning_rate=1.0")],
)
def test_bad_optimizer_config_names_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(optimizer_config(**{key: value}))


# ----------------------------------------------------------------------------- state


def test_create_starts_at_step_zero_with_fresh_components():
    gcfg = guidance.get_default_config()
    optimizer = optim.make_optimizer(optimizer_config())
    params = _init_params(TINY, jax.random.key(0))
    state = train_state.create(params, optimizer, gcfg, jax.random.key(5))
    assert int(state.step) == 0 and state.step.dtype == jnp.int32
    assert state.params is params
    assert_states_equal(state.opt_state, optimizer.init(params))
    assert_states_equal(state.guidance, guidance.init(gcfg))
    np.testing.assert_array_equal(state.rng, jax.random.key_data(jax.random.key(5)))
    # Typed and raw keys give the same state; each step's key is the base key folded with the step.
    raw = train_state.create(params, optimizer, gcfg, jax.random.PRNGKey(5))
    np.testing.assert_array_equal(raw.rng, state.rng)
    keys = [jax.random.key_data(state.step_key(step)) for step in range(3)]
    np.testing.assert_array_equal(keys[2], jax.random.key_data(jax.random.fold_in(jax.random.key(5), 2)))
    assert len({tuple(np.asarray(k).tolist()) for k in keys}) == 3
    with pytest.raises(ValueError, match="rng must be a threefry key"):
        train_state.create(params, optimizer, gcfg, jnp.zeros((3,), jnp.uint32))


def test_state_shardings_follow_the_rules():
    gcfg = guidance.get_default_config()
    optimizer = optim.make_optimizer(optimizer_config())
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    params = _init_params(TINY, jax.random.key(0))
    shardings = train_state.state_shardings(
        train_state.abstract_state(params, optimizer, gcfg), optimizer, mesh, models.param_logical_axes(TINY)
    )
    adam = shardings.opt_state[1]
    for tree in (shardings.params, adam.mu, adam.nu):
        assert tree["layers_0"]["mlp"]["up_proj"]["kernel"].spec == PartitionSpec("fsdp", "tensor")
        assert tree["layers_0"]["self_attn"]["o_proj"]["kernel"].spec == PartitionSpec("tensor", "fsdp")
        assert tree["embedding"].spec == PartitionSpec("tensor", "fsdp")
        assert tree["norm"]["scale"].spec == PartitionSpec(None)
    replicated = [shardings.step, shardings.rng, adam.count, *jax.tree.leaves(shardings.guidance)]
    replicated += [optim_leaf for optim_leaf in jax.tree.leaves(shardings.opt_state[3])]  # lr stage
    assert all(s.spec == PartitionSpec() for s in replicated)
    assert all(s.mesh == mesh for s in jax.tree.leaves(shardings))


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_is_exact(tmp_path):
    gcfg = guidance.get_default_config()
    optimizer = optim.make_optimizer(optimizer_config())
    state = advanced_state(optimizer, gcfg)
    manager = train_state.make_checkpoint_manager(str(tmp_path), max_to_keep=2)
    assert train_state.save_checkpoint(manager, state)  # async: returns before the write ends
    later = state.replace(step=jnp.int32(5))
    assert train_state.save_checkpoint(manager, later)
    manager.wait_until_finished()
    assert manager.all_steps() == [3, 5]

    abstract = train_state.abstract_state(state.params, optimizer, gcfg)
    assert_states_equal(train_state.restore_checkpoint(manager, abstract, step=3), state)
    latest = train_state.restore_checkpoint(manager, state)  # a concrete target works too
    assert_states_equal(latest, later)
    with pytest.raises(ValueError, match="step=4 has no checkpoint"):
        train_state.restore_checkpoint(manager, abstract, step=4)
    manager.close()


def test_checkpoint_restores_onto_a_mesh_with_the_same_shardings(tmp_path):
    gcfg = guidance.get_default_config()
    gcfg.mode = "ratio"  # a different guidance buffer size, to be sure the target shape is used
    optimizer = optim.make_optimizer(optimizer_config())
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    state = advanced_state(optimizer, gcfg, seed=1)
    abstract = train_state.abstract_state(state.params, optimizer, gcfg)
    shardings = train_state.state_shardings(abstract, optimizer, mesh, models.param_logical_axes(TINY))
    sharded = train_state.shard_state(state, shardings)
    gate = sharded.params["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert gate.addressable_shards[0].data.shape == (16, 32)  # really split (32x64 over 2x2)

    manager = train_state.make_checkpoint_manager(str(tmp_path))
    train_state.save_checkpoint(manager, sharded)
    manager.wait_until_finished()
    restored = train_state.restore_checkpoint(manager, abstract, shardings=shardings)
    assert_states_equal(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert got.sharding == want
    # Without shardings a sharded target's own layout is used.
    again = train_state.restore_checkpoint(manager, sharded)
    assert again.params["embedding"].sharding == sharded.params["embedding"].sharding
    manager.close()


def test_host_state_travels_in_the_same_checkpoint(tmp_path):
    gcfg = guidance.get_default_config()
    optimizer = optim.make_optimizer(optimizer_config())
    state = advanced_state(optimizer, gcfg)
    manager = train_state.make_checkpoint_manager(str(tmp_path))
    host = {"data": {"grain": {"next_index": 7}}, "nonfinite_in_a_row": 1}
    train_state.save_checkpoint(manager, state, host)
    manager.wait_until_finished()
    assert {train_state.HOST_ITEM, train_state.STATE_ITEM} <= set(os.listdir(tmp_path / "3"))  # one step directory
    assert train_state.restore_host_state(manager, 3) == host
    manager.close()


def test_keeps_the_latest_and_the_best_scoring_step(tmp_path, caplog):
    state = train_state.create({"w": jnp.zeros(3)}, optim.make_optimizer(optimizer_config()),
                               guidance.get_default_config(), jax.random.key(0))
    manager = train_state.make_checkpoint_manager(str(tmp_path), max_to_keep=2, keep_best=True)
    scores = {2: 0.9, 4: 0.1}  # only evaluated steps carry a score
    with caplog.at_level(logging.WARNING):
        for step in range(1, 7):
            train_state.save_checkpoint(manager, state, {}, step=step, score=scores.get(step))
        manager.wait_until_finished()
    assert manager.all_steps() == [2, 5, 6]  # the latest two and the best
    assert manager.best_step() == 2
    manager.close()
    assert not [r.getMessage() for r in caplog.records if "tracked_metric" in r.getMessage()]  # a step without
    # a score is an ordinary save, not a warning
    reopened = train_state.make_checkpoint_manager(str(tmp_path), max_to_keep=2, keep_best=True)
    assert reopened.best_step() == 2  # the scores read back; unscored steps rank below every score
    reopened.close()


def _save_steps(directory, steps):
    gcfg = guidance.get_default_config()
    optimizer = optim.make_optimizer(optimizer_config())
    base = advanced_state(optimizer, gcfg)
    states = {s: base.replace(step=jnp.int32(s), params=jax.tree.map(lambda p: p + s, base.params)) for s in steps}
    manager = train_state.make_checkpoint_manager(str(directory))
    for s, state in states.items():
        train_state.save_checkpoint(manager, state, {"at": s})
    manager.wait_until_finished()
    return manager, states, train_state.abstract_state(states[steps[0]].params, optimizer, gcfg)


def _largest_file(directory):
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    return max(files, key=os.path.getsize)


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    manager, states, abstract = _save_steps(tmp_path / "checkpoints", [1, 2])
    victim = _largest_file(tmp_path / "checkpoints" / "2" / train_state.STATE_ITEM)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    seen = []
    resumed = train_state.restore_latest_intact(manager, abstract, check_host=lambda s, h: seen.append((s, h)))
    assert resumed.step == 1 and resumed.host == {"at": 1} and seen == [(2, {"at": 2}), (1, {"at": 1})]
    assert_states_equal(resumed.state, states[1])
    [(step, path, error)] = resumed.damaged
    assert step == 2 and path == str(tmp_path / "checkpoints" / "2") and "\n" not in error  # one line
    # Moved aside, so the run can write step 2 again.
    assert manager.all_steps() == [1] and os.path.isdir(tmp_path / "checkpoints_damaged" / "2")
    manager.close()


def test_no_readable_checkpoint_is_an_error_and_moves_nothing(tmp_path):
    manager, _, abstract = _save_steps(tmp_path / "checkpoints", [1, 2])
    for step in (1, 2):
        os.remove(os.path.join(tmp_path, "checkpoints", str(step), train_state.HOST_ITEM, "metadata"))
    with pytest.raises(RuntimeError, match=r"no checkpoint .* could be restored .*checkpoints/2: .*checkpoints/1"):
        train_state.restore_latest_intact(manager, abstract)
    assert manager.all_steps() == [1, 2]
    # A refusal from check_host (a config that cannot resume) is not damage: it propagates at once.
    _, _, abstract = _save_steps(tmp_path / "other", [1])
    manager = train_state.make_checkpoint_manager(str(tmp_path / "other"))

    def refuse(step, host):
        raise ValueError("guidance.mode differs")

    with pytest.raises(ValueError, match="guidance.mode"):
        train_state.restore_latest_intact(manager, abstract, check_host=refuse)
    assert manager.all_steps() == [1]
    manager.close()


# ----------------------------------------------------------------------------- per-problem guidance

NUM_PROBLEMS = 6


def per_problem_guidance_config():
    gcfg = guidance.get_default_config()
    gcfg.per_problem = True
    return gcfg


def advanced_per_problem_state(optimizer, seed=0):
    """`advanced_state` with per-problem guidance whose rows differ (two problems listed)."""
    gcfg = per_problem_guidance_config()

    @jax.jit
    def advance(params):
        state = train_state.create(params, optimizer, gcfg, jax.random.key(seed + 1), num_problems=NUM_PROBLEMS)
        table = guidance.update_problems(state.guidance, jnp.array([4, 1, 4]), jnp.array([0.5, 0.25, 0.75]), gcfg)
        return state.replace(step=jnp.int32(3), guidance=guidance.update(table, jnp.float32(0.4), gcfg))

    return advance(_init_params(TINY, jax.random.key(seed))), gcfg


def test_create_needs_num_problems_with_per_problem_guidance():
    optimizer = optim.make_optimizer(optimizer_config())
    params = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match="guidance.per_problem=True needs num_problems"):
        train_state.create(params, optimizer, per_problem_guidance_config(), jax.random.key(0))
    with pytest.raises(ValueError, match="guidance.per_problem=True needs num_problems"):
        train_state.abstract_state(params, optimizer, per_problem_guidance_config())
    abstract = train_state.abstract_state(params, optimizer, per_problem_guidance_config(), NUM_PROBLEMS)
    assert abstract.guidance.per_problem.recent_rewards.shape == (NUM_PROBLEMS, 3)


def test_default_state_leaves_are_unchanged():
    """Without per-problem guidance the state's leaves, with their paths, are those of before the
    option (the guidance's three arrays), whether or not num_problems is passed."""
    optimizer = optim.make_optimizer(optimizer_config())
    params = {"w": jnp.zeros(3)}
    for state in (train_state.create(params, optimizer, guidance.get_default_config(), jax.random.key(0)),
                  train_state.create(params, optimizer, guidance.get_default_config(), jax.random.key(0), 7)):
        guidance_leaves = [(jax.tree_util.keystr(path), leaf.shape, leaf.dtype)
                           for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
                           if jax.tree_util.keystr(path).startswith(".guidance")]
        assert guidance_leaves == [(".guidance.current_length", (), jnp.float32), (".guidance.step", (), jnp.int32),
                                   (".guidance.recent_rewards", (3,), jnp.float32)]


@flax.struct.dataclass
class _GuidanceBeforePerProblem:
    """GuidanceState as it was before the per-problem option (a flax struct of three arrays)."""

    current_length: jax.Array
    step: jax.Array
    recent_rewards: jax.Array


def test_checkpoints_without_per_problem_are_as_before_the_option(tmp_path):
    """A state written before the option existed restores into today's abstract state, and today's
    default state writes the very same checkpoint metadata."""
    gcfg = guidance.get_default_config()
    optimizer = optim.make_optimizer(optimizer_config())
    state = advanced_state(optimizer, gcfg)
    g = state.guidance
    legacy = state.replace(guidance=_GuidanceBeforePerProblem(g.current_length, g.step, g.recent_rewards))
    metadata = {}
    for name, tree in (("legacy", legacy), ("current", state)):
        manager = train_state.make_checkpoint_manager(str(tmp_path / name))
        train_state.save_checkpoint(manager, tree)
        manager.wait_until_finished()
        with open(tmp_path / name / "3" / train_state.STATE_ITEM / "_METADATA") as f:
            metadata[name] = json.load(f)["tree_metadata"]
        restored = train_state.restore_checkpoint(manager, train_state.abstract_state(state.params, optimizer, gcfg))
        assert_states_equal(restored, state)
        manager.close()
    assert metadata["legacy"] == metadata["current"]


def test_per_problem_checkpoint_round_trip_is_exact(tmp_path):
    optimizer = optim.make_optimizer(optimizer_config())
    state, gcfg = advanced_per_problem_state(optimizer)
    table = state.guidance.per_problem
    assert table.step.tolist() == [0, 1, 0, 0, 2, 0] and len(set(table.current_length.tolist())) > 1
    manager = train_state.make_checkpoint_manager(str(tmp_path))
    train_state.save_checkpoint(manager, state)
    manager.wait_until_finished()
    abstract = train_state.abstract_state(state.params, optimizer, gcfg, NUM_PROBLEMS)
    assert_states_equal(train_state.restore_checkpoint(manager, abstract), state)
    assert_states_equal(train_state.restore_checkpoint(manager, state), state)  # a concrete target
    # A target without the table (guidance.per_problem switched off) does not silently drop it.
    with pytest.raises(ValueError, match="per_problem"):
        train_state.restore_checkpoint(manager, train_state.abstract_state(
            state.params, optimizer, guidance.get_default_config()))
    manager.close()


def test_per_problem_state_is_replicated_and_restores_onto_a_mesh(tmp_path):
    optimizer = optim.make_optimizer(optimizer_config())
    state, gcfg = advanced_per_problem_state(optimizer, seed=1)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    abstract = train_state.abstract_state(state.params, optimizer, gcfg, NUM_PROBLEMS)
    shardings = train_state.state_shardings(abstract, optimizer, mesh, models.param_logical_axes(TINY))
    table_shardings = jax.tree.leaves(shardings.guidance.per_problem)
    assert len(table_shardings) == 3 and all(s.spec == PartitionSpec() for s in table_shardings)
    manager = train_state.make_checkpoint_manager(str(tmp_path))
    train_state.save_checkpoint(manager, train_state.shard_state(state, shardings))
    manager.wait_until_finished()
    restored = train_state.restore_checkpoint(manager, abstract, shardings=shardings)
    assert_states_equal(restored, state)
    assert restored.guidance.per_problem.recent_rewards.sharding == shardings.guidance.per_problem.recent_rewards
    manager.close()

"""The jitted GRPO train step: exact accumulation, sharding, the first-step loss and the log-probs.

Every step function here is compiled once per configuration (module-level cache) on the tiny
HF-built Qwen3 of conftest. Batches are 4 groups of G = 4 (8 on the mesh), prompt and completion
8 tokens, left-padded prompts of varied length, varied completion lengths and guided prefixes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.sharding import PartitionSpec

from g2rpo_jax import guidance, models, optim, sharding, train_state, train_step
from g2rpo_jax.grpo import policy_loss as grpo_loss
from tests.reference.grpo_numpy import (
    group_advantages_ref,
    group_advantages_split_ref,
    high_entropy_mask_ref,
    mismatch_metrics_ref,
    policy_loss_ref,
    tis_weights_ref,
)

G, P, L = 4, 8, 8
TEMPERATURE = 0.7
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# Guided-token treatment per loss type in the grid, so both loss-changing modes meet accumulation.
GUIDED_FOR = {"grpo": "train", "bnpo": "mask", "dr_grpo": "mask", "dapo": "train"}
# The tests check program semantics, not XLA's backend optimisations, so they skip the slow ones:
# this roughly halves compile time on 2 cores.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_step(step_fn, *args):
    return step_fn.lower(*args).compile(compiler_options=FAST_COMPILE)


def rollout_batch(num_groups: int, seed: int = 0, vocab: int = 256) -> train_step.RolloutBatch:
    """A host batch with left-padded prompts, ragged completions, guided prefixes and mixed groups.

    Group 0 has equal rewards (a zero-std group); one guided row is guided on every completion
    token, so under guided='mask' it has no loss token at all.
    """
    rs = np.random.RandomState(seed)
    batch = num_groups * G
    prompt_len = rs.randint(1, P + 1, batch)
    completion_len = rs.randint(1, L + 1, batch)
    prompt_mask = (np.arange(P)[None] >= P - prompt_len[:, None]).astype(np.int32)  # [B, P]
    completion_mask = (np.arange(L)[None] < completion_len[:, None]).astype(np.int32)  # [B, L]
    guide_len = np.where(np.arange(batch) % G == 1, 3, 0)  # one guided rollout per group
    guided_mask = (np.arange(L)[None] < guide_len[:, None]).astype(np.int32) * completion_mask
    completion_mask[5, :] = 0
    completion_mask[5, :2] = 1  # row 5 (guided, 3-token guide) is all guide tokens
    guided_mask[5] = completion_mask[5]
    rewards = rs.choice([0.0, 0.5, 1.0], batch).astype(np.float32)
    rewards[:G] = 1.0
    accuracy = (rewards == 1.0).astype(np.float32)
    return train_step.make_batch(
        rs.randint(2, vocab, (batch, P)) * prompt_mask, prompt_mask, rs.randint(2, vocab, (batch, L)),
        completion_mask, rewards, accuracy=accuracy, guided_mask=guided_mask,
    )


def with_group_prompts(batch: train_step.RolloutBatch) -> train_step.RolloutBatch:
    """The batch with each group's first prompt given to all G rows, as sampled rollouts have."""
    def first_of_group(x):
        x = np.asarray(x)
        return np.repeat(x[::G], G, axis=0)
    return batch.replace(prompt_tokens=first_of_group(batch.prompt_tokens),
                         prompt_mask=first_of_group(batch.prompt_mask))


def analytic_first_step_loss(batch, loss_type: str, guided: str) -> float:
    """Ratio 1 and no KL: the loss is minus the advantage-weighted token reduction of the loss type."""
    advantages = group_advantages_ref(batch.rewards, G)
    tokens = np.asarray(batch.completion_mask) > 0
    if guided == "mask":
        tokens = tokens & ~(np.asarray(batch.guided_mask) > 0)
    counts = tokens.sum(axis=1).astype(np.float64)  # loss tokens per row
    present = counts > 0
    if loss_type == "grpo":  # each present sequence's token mean of -A is -A
        return float(-advantages[present].sum() / present.sum())
    token_sum = float(-(advantages * counts).sum())
    if loss_type in ("bnpo", "dapo"):
        return token_sum / counts.sum()
    return token_sum / (present.sum() * L)  # dr_grpo


def step_config(**overrides):
    cfg = train_step.get_default_config()
    cfg.group_size = G
    cfg.temperature = TEMPERATURE
    cfg.beta = 0.04
    cfg.update(overrides)
    return cfg


def guidance_config():
    gcfg = guidance.get_default_config()
    gcfg.initial_length, gcfg.delta = 64, 8
    return gcfg


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    """(cfg, params, reference params): the reference differs so the KL term has a gradient."""
    path, torch_model = tiny_checkpoint
    cfg, params = models.load_hf(path)
    noise = jax.random.split(jax.random.key(7), len(jax.tree.leaves(params)))
    leaves = [p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(jax.tree.leaves(params), noise)]
    ref_params = jax.tree.unflatten(jax.tree.structure(params), leaves)
    return cfg, params, ref_params, torch_model


SGD_RATE = 1.0  # plain SGD: new params = params - gradient, so comparing params compares gradients


_GRID_CACHE: dict = {}


def grid_step(model, loss_type: str, micro_batch_size: int):
    """(compiled step, fresh state, batch) for one grid point; compiled once per module."""
    cfg, params, ref_params, _ = model
    state = train_state.create(params, optax.sgd(SGD_RATE), guidance_config(), jax.random.key(0))
    batch = rollout_batch(4)
    key = (loss_type, micro_batch_size)
    if key not in _GRID_CACHE:
        step_cfg = step_config(loss_type=loss_type, guided=GUIDED_FOR[loss_type], micro_batch_size=micro_batch_size)
        step_fn = train_step.make_train_step(cfg, step_cfg, guidance_config(), optax.sgd(SGD_RATE), donate=False)
        _GRID_CACHE[key] = compile_step(step_fn, state, ref_params, batch)
    return _GRID_CACHE[key], state, batch


def max_abs_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


F32_EPS = float(np.finfo(np.float32).eps)


def flat(tree) -> np.ndarray:
    """All leaves of a pytree as one float64 vector (same order for trees of the same structure)."""
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(tree)])


def sum_rounding(num_terms: int, magnitude: float) -> float:
    """How far two float32 evaluations of a sum of `num_terms` terms, added in different orders,
    can drift apart: about num_terms · eps · Σ|terms| (the classic bound for recursive summation).
    `magnitude` is Σ|terms|, or for a mean, the mean of |terms|."""
    return num_terms * F32_EPS * magnitude


def adam_first_update_drift(g: np.ndarray, grad_error: float, eps: float) -> np.ndarray:
    """Bound on how much Adam's first update direction g / (|g| + eps) can move when g moves by
    at most `grad_error`: its slope is eps / (|g| + eps)², so the bound is small only where |g| is
    well above both eps and grad_error. Entries with |g| <= grad_error may even flip sign (inf)."""
    margin = np.abs(g) - grad_error
    with np.errstate(divide="ignore"):
        return np.where(margin > 0, eps * grad_error / np.maximum(margin, 0.0) ** 2, np.inf)


def loss_term_size(batch, beta: float) -> float:
    """Mean size of the loss's per-token terms before they cancel: |A| (the ratio is about 1)
    plus beta times the k3 KL terms e^r, r and 1 (each about 1)."""
    advantages = group_advantages_ref(batch.rewards, G)
    weights = np.asarray(batch.completion_mask).sum(axis=1)
    return float(np.average(np.abs(advantages), weights=weights)) + 3 * beta


def assert_metrics_match(metrics, expected, n: int, term_size: float):
    """Step metrics of two evaluations that sum their n loss tokens in different orders. The
    loss and the KL cancel (±advantages; e^r − r − 1), so their bounds are absolute, from the
    size of their terms; the entropy (non-negative terms) and the gradient norm (bounded like the
    gradient, relative to its norm) get relative ones."""
    assert float(metrics["num_loss_tokens"]) == float(expected["num_loss_tokens"]) == n
    np.testing.assert_allclose(metrics["loss"], expected["loss"], rtol=0, atol=sum_rounding(n, term_size),
                               err_msg="loss")
    np.testing.assert_allclose(metrics["kl"], expected["kl"], rtol=0, atol=sum_rounding(n, 3.0), err_msg="kl")
    for key in ("entropy", "grad_norm"):
        np.testing.assert_allclose(metrics[key], expected[key], rtol=sum_rounding(n, 1.0), err_msg=key)


# ----------------------------------------------------------------------------- layout


def test_validate_layout_accepts_group_aligned_sizes():
    assert train_step.validate_layout(16, 4, 0) == 1
    assert train_step.validate_layout(16, 4, 4) == 4
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    assert train_step.validate_layout(32, 4, 16, mesh) == 2
    assert train_step.validate_layout(64, 2, 8, mesh) == 8


@pytest.mark.parametrize(
    "batch_size,group_size,micro,mesh_axes,message",
    [
        (18, 4, 0, None, "batch_size=18 is not a multiple of group_size=4"),
        (16, 4, 6, None, r"micro_batch_size=6 would split a group of group_size=4 .*\[4, 8, 16\]"),
        (16, 4, 2, None, "micro_batch_size=2 would split a group"),
        (16, 4, 5, None, "micro_batch_size=5"),
        # 4 batch shards (data 2 x fsdp 2): 16 rows are 4 per shard, one group each, so a
        # micro-batch of 8 would put half a group on every shard.
        (16, 4, 8, {"data": 2, "fsdp": 2, "tensor": 2},
         r"on 4 batch shards .*valid micro_batch_size values are \[16\]"),
        (8, 4, 0, {"data": 4, "fsdp": 1, "tensor": 2}, "cannot be cut into 4 batch shards of whole groups"),
    ],
)
def test_validate_layout_rejects_split_groups(batch_size, group_size, micro, mesh_axes, message):
    mesh = None if mesh_axes is None else sharding.make_mesh(mesh_axes, jax.devices()[:8])
    with pytest.raises(ValueError, match=message):
        train_step.validate_layout(batch_size, group_size, micro, mesh)


def test_split_group_is_refused_when_the_step_is_traced(model):
    cfg, params, _, _ = model
    step_fn = train_step.make_train_step(cfg, step_config(micro_batch_size=6, beta=0.0), guidance_config(),
                                         optax.sgd(1.0), donate=False)
    state = train_state.create(params, optax.sgd(1.0), guidance_config(), jax.random.key(0))
    with pytest.raises(ValueError, match="micro_batch_size=6 would split a group"):
        step_fn.lower(state, None, rollout_batch(4))


def test_bad_step_config_names_key_and_options(model):
    cfg = model[0]
    with pytest.raises(ValueError, match=r"step.loss_type='ppo' is not valid; valid: \('grpo'"):
        train_step.make_train_step(cfg, step_config(loss_type="ppo"), guidance_config(), optax.sgd(1.0))
    with pytest.raises(ValueError, match="step.num_iterations=0"):
        train_step.make_train_step(cfg, step_config(num_iterations=0), guidance_config(), optax.sgd(1.0))


def test_shared_prompt_errors_name_the_group_rows_and_values(model):
    cfg, params, ref_params, _ = model
    own = rollout_batch(4, seed=1)
    shared = with_group_prompts(own)
    train_step.check_shared_prompts(shared, G)
    # A step that runs one prompt per group refuses rows with their own prompts before it runs.
    step_fn = train_step.make_train_step(cfg, step_config(), guidance_config(), optax.sgd(1.0), donate=False,
                                         shared_prompts=True)
    state = train_state.create(params, optax.sgd(1.0), guidance_config(), jax.random.key(0))
    with pytest.raises(ValueError, match=r"group 0: rows 0 and 1 have different prompt_tokens"):
        step_fn(state, ref_params, own)
    with pytest.raises(ValueError, match=r"shared_prompts='no' is not valid; valid: True or False"):
        train_step.make_train_step(cfg, step_config(), guidance_config(), optax.sgd(1.0), shared_prompts="no")
    with pytest.raises(ValueError, match=r"shared_prompt_group=3 must be an integer >= 1 that divides the batch's 16"):
        train_step.compute_logprobs(cfg, params, shared, shared_prompt_group=3)
    with pytest.raises(ValueError, match=r"group_size=0 is not valid; valid: an integer >= 1"):
        train_step.check_shared_prompts(shared, 0)
    tokens = np.array(shared.prompt_tokens)
    tokens[G + 2, -1] += 1  # group 1's third row
    with pytest.raises(ValueError, match=r"group 1: rows 4 and 6 have different prompt_tokens.*shared_prompts=False"):
        train_step.check_shared_prompts(shared.replace(prompt_tokens=tokens), G)
    mask = np.array(shared.prompt_mask)
    mask[1, :] = 1
    with pytest.raises(ValueError, match="group 0: rows 0 and 1 have different prompt_mask"):
        train_step.check_shared_prompts(shared.replace(prompt_tokens=np.asarray(shared.prompt_tokens) * 0,
                                                       prompt_mask=mask), G)


def test_a_step_with_shared_prompts_runs_each_prompt_once(model):
    """XLA's FLOP count of the compiled step falls by what `model_flops` predicts for one prompt
    forward per group (policy forward and backward, and the reference's forward). XLA also counts
    the elementwise work, which sharing does not change, so the measured saving is a bit smaller."""
    cfg, params, ref_params, _ = model
    step_cfg = step_config(micro_batch_size=8)
    state = train_state.create(params, optax.sgd(SGD_RATE), guidance_config(), jax.random.key(0))
    batch = with_group_prompts(rollout_batch(4))
    counted = {}
    for shared in (False, True):
        step_fn = train_step.make_train_step(cfg, step_cfg, guidance_config(), optax.sgd(SGD_RATE), donate=False,
                                             shared_prompts=shared)
        cost = compile_step(step_fn, state, ref_params, batch).cost_analysis()
        counted[shared] = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    predicted = train_step.model_flops(cfg, step_cfg, batch, shared_prompts=True) / train_step.model_flops(
        cfg, step_cfg, batch)
    measured = counted[True] / counted[False]
    assert predicted < 0.8
    assert predicted - 0.02 <= measured <= 1 - 0.5 * (1 - predicted), (measured, predicted)


def test_micro_batch_layout_keeps_groups_whole_and_inverts():
    rows = np.arange(32)
    micro = train_step.to_micro_batches(rows, num_micro=2, num_shards=4, group_size=4)  # [2, 16]
    # Micro-batch i holds the i-th group of every shard (shards are 8 consecutive rows).
    np.testing.assert_array_equal(micro[0], [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27])
    for part in np.asarray(micro).reshape(-1, 4):
        assert part[0] % 4 == 0 and np.all(np.diff(part) == 1)  # a whole group, in order
    np.testing.assert_array_equal(train_step.from_micro_batches(micro, num_shards=4), rows)
    with pytest.raises(ValueError, match="without splitting groups of 4"):
        train_step.to_micro_batches(rows, num_micro=4, num_shards=4, group_size=4)


# ----------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("prompt_group", [1, G], ids=["own-prompts", "shared-prompts"])
def test_logprobs_and_entropy_match_torch_teacher_forcing(model, prompt_group):
    """Log-probs and the entropy of each completion position against transformers' logits: both
    are O(1) sums over the vocabulary in float32, so 1e-4 covers the two models' rounding. With
    shared prompts each group's prompt runs once and its cache is copied to the G rows."""
    cfg, params, _, torch_model = model
    batch = rollout_batch(2, seed=3)
    if prompt_group > 1:
        batch = with_group_prompts(batch)
    ours, entropy = jax.jit(functools.partial(train_step.compute_logprobs, cfg, temperature=TEMPERATURE,
                                              chunk_size=3, with_entropy=True,
                                              shared_prompt_group=prompt_group))(params, batch)
    prompt_len = np.asarray(batch.prompt_mask).sum(axis=1)
    completion_len = np.asarray(batch.completion_mask).sum(axis=1)
    checked = 0
    for b in range(batch.batch_size):
        prompt = np.asarray(batch.prompt_tokens[b, P - prompt_len[b]:])
        completion = np.asarray(batch.completion_tokens[b, : completion_len[b]])
        tokens = torch.as_tensor(np.concatenate([prompt, completion])[None], dtype=torch.long)
        with torch.no_grad():
            logprobs = torch.log_softmax(torch_model(tokens).logits[0].double() / TEMPERATURE, dim=-1).numpy()
        positions = prompt_len[b] - 1 + np.arange(completion_len[b])
        expected = logprobs[positions, completion]
        np.testing.assert_allclose(np.asarray(ours[b, : completion_len[b]]), expected, atol=1e-4, rtol=0)
        expected_entropy = -(np.exp(logprobs[positions]) * logprobs[positions]).sum(axis=-1)
        np.testing.assert_allclose(np.asarray(entropy[b, : completion_len[b]]), expected_entropy, atol=1e-4, rtol=0)
        checked += completion_len[b]
    assert checked > 20


# ----------------------------------------------------------------------------- accumulation and the loss


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_accumulation_equals_full_batch(model, loss_type):
    """k = 1, 2, 4 micro-batches give the same update (KL on, guided rows present, f32)."""
    _, params, ref_params, _ = model
    results = {}
    for micro_batch_size in (16, 8, 4):
        compiled, state, batch = grid_step(model, loss_type, micro_batch_size)
        results[micro_batch_size] = compiled(state, ref_params, batch)
    full_state, full_metrics = results[16]
    gradient_scale = max_abs_diff(full_state.params, params)  # = max |gradient| (SGD at rate 1)
    assert gradient_scale > 1e-3 and float(full_metrics["kl"]) > 1e-4
    n = int(full_metrics["num_loss_tokens"])
    batch = grid_step(model, loss_type, 16)[2]
    # SGD at rate 1: the params differ by the gradients' difference, whose rounding is bounded
    # relative to the gradient's norm (as in the sharded test), plus one rounding of the params.
    p_full = flat(full_state.params)
    bound = sum_rounding(n, float(full_metrics["grad_norm"])) + F32_EPS * np.abs(p_full).max()
    for micro_batch_size in (8, 4):
        new_state, metrics = results[micro_batch_size]
        assert np.abs(flat(new_state.params) - p_full).max() <= bound
        assert_metrics_match(metrics, full_metrics, n, loss_term_size(batch, step_config().beta))
        np.testing.assert_allclose(metrics["advantage/std"], full_metrics["advantage/std"],
                                   rtol=sum_rounding(batch.batch_size, 1.0))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_first_step_loss_is_the_analytic_value(model, loss_type):
    """μ = 1: ratio 1; with the reference equal to the policy the KL term vanishes too."""
    _, params, _, _ = model
    compiled, state, batch = grid_step(model, loss_type, 8)
    new_state, metrics = compiled(state, params, batch)
    expected = analytic_first_step_loss(batch, loss_type, GUIDED_FOR[loss_type])
    # A sum of ±advantages over the loss tokens: bounded by the size of its terms, not its value.
    n = int(metrics["num_loss_tokens"])
    np.testing.assert_allclose(metrics["loss"], expected, rtol=0, atol=sum_rounding(n, loss_term_size(batch, 0.0)))
    assert abs(float(metrics["kl"])) < 1e-6 and float(metrics["clip_ratio/region"]) == 0.0
    # Bookkeeping of the same step: step counter, guidance update from mean accuracy, logging.
    assert int(new_state.step) == 1
    expected_guidance = guidance.update(guidance.init(guidance_config()), np.mean(batch.accuracy), guidance_config())
    jax.tree.map(np.testing.assert_array_equal, new_state.guidance, expected_guidance)
    assert float(metrics["guidance/length"]) == 64.0
    assert float(metrics["guidance/next_length"]) == float(guidance.length(expected_guidance))
    rewards = np.asarray(batch.rewards).reshape(-1, G)
    np.testing.assert_allclose(metrics["zero_std_group_fraction"], np.mean(rewards.min(1) == rewards.max(1)))
    np.testing.assert_allclose(metrics["entropy"] > 0, True)


def test_nonfinite_gradient_skips_the_update_and_is_counted(model):
    """A NaN reward makes the advantages, the loss and the gradient NaN (the loop's test hook):
    the params and the guidance schedule stay bitwise as they were, the step counter advances
    and the step reports the skip; a finite batch through the same program is not skipped."""
    _, params, ref_params, _ = model
    compiled, state, batch = grid_step(model, "grpo", 8)
    rewards = np.asarray(batch.rewards).copy()
    rewards[3] = np.nan
    poisoned = batch.replace(rewards=rewards)
    new_state, metrics = compiled(state, ref_params, poisoned)
    assert not np.isfinite(float(metrics["grad_norm"])) and float(metrics["skipped_nonfinite"]) == 1.0
    assert int(new_state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, new_state.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, new_state.guidance, state.guidance)
    _, finite_metrics = compiled(state, ref_params, batch)
    assert float(finite_metrics["skipped_nonfinite"]) == 0.0 and np.isfinite(float(finite_metrics["grad_norm"]))


def test_dynamic_sampling_equals_dropping_zero_std_groups(model):
    """dynamic_sampling in the step = the batch without its zero-std groups; with beta = 0 the
    reference forward is skipped (ref_params=None) and the loss is still the analytic value."""
    cfg, params, _, _ = model
    batch = rollout_batch(4, seed=1)
    kept, fraction = train_step.drop_zero_std_groups(batch, G)
    rewards = np.asarray(batch.rewards).reshape(-1, G)
    informative = rewards.min(1) != rewards.max(1)
    assert fraction == 1 - informative.mean() and 0 < fraction < 1
    assert kept.batch_size == informative.sum() * G
    kept_rows = np.repeat(informative, G)
    np.testing.assert_array_equal(kept.completion_tokens, np.asarray(batch.completion_tokens)[kept_rows])

    step_cfg = step_config(beta=0.0, loss_type="dapo", dynamic_sampling=True, micro_batch_size=8)
    step_fn = train_step.make_train_step(cfg, step_cfg, guidance_config(), optax.sgd(SGD_RATE), donate=False)
    state = train_state.create(params, optax.sgd(SGD_RATE), guidance_config(), jax.random.key(0))
    _, metrics = compile_step(step_fn, state, None, batch)(state, None, batch)
    n = int(np.asarray(kept.completion_mask).sum())
    np.testing.assert_allclose(metrics["loss"], analytic_first_step_loss(kept, "dapo", "train"), rtol=0,
                               atol=sum_rounding(n, loss_term_size(kept, 0.0)))
    np.testing.assert_allclose(metrics["num_loss_tokens"], np.asarray(kept.completion_mask).sum())
    np.testing.assert_allclose(metrics["zero_std_group_fraction"], fraction)
    assert float(metrics["kl"]) == 0.0


def reference_two_updates(cfg, params, ref_params, batch, step_cfg, rate):
    """μ = 2 by hand on the full batch: two SGD steps on the clipped loss, both with the old
    log-probs of the parameters before the first one (plain jax.grad, no accumulation)."""
    options = train_step.loss_options(step_cfg, L)
    logprobs_of = functools.partial(train_step.compute_logprobs, cfg, batch=batch, temperature=TEMPERATURE)
    old, ref = jax.jit(logprobs_of)(params), jax.jit(logprobs_of)(ref_params)
    advantages = group_advantages_ref(batch.rewards, G).astype(np.float32)

    def loss(p):
        return grpo_loss(logprobs_of(p), old, ref, advantages, batch.completion_mask,
                         guided_mask=batch.guided_mask, **options)[0]

    @jax.jit
    def sgd(p):
        return jax.tree.map(lambda w, g: w - rate * g, p, jax.grad(loss)(p))

    return sgd(sgd(params))


def test_two_iterations_keep_old_logprobs_fixed(model):
    """μ = 2 over k = 2 micro-batches equals two hand-made full-batch updates that share the old
    log-probs of the starting parameters; the second update is really clipped."""
    cfg, params, ref_params, _ = model
    batch = rollout_batch(4, seed=2)
    rate = 3.0  # large steps so the second update leaves the clip range
    step_cfg = step_config(num_iterations=2, loss_type="bnpo", epsilon_high=0.28, micro_batch_size=8)
    expected = reference_two_updates(cfg, params, ref_params, batch, step_cfg, rate)
    step_fn = train_step.make_train_step(cfg, step_cfg, guidance_config(), optax.sgd(rate), donate=False)
    state = train_state.create(params, optax.sgd(rate), guidance_config(), jax.random.key(0))
    new_state, metrics = compile_step(step_fn, state, ref_params, batch)(state, ref_params, batch)
    assert max_abs_diff(new_state.params, expected) < 1e-4 * max_abs_diff(expected, params)
    assert float(metrics["clip_ratio/region"]) > 0.01  # mean over the 2 updates; the first has none
    assert int(new_state.step) == 1  # one train step, two optimizer updates


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("shared_prompts", [False, True], ids=["own-prompts", "shared-prompts"])
def test_sharded_step_equals_single_device(model, shared_prompts):
    """data=2, fsdp=2, tensor=2 versus one device: same loss, gradient (via Adam's moments) and
    parameters, each within the rounding its conditioning allows; params and moments laid out by
    the rules; the state is donated. With shared prompts the sharded step runs each group's
    prompt once (policy and reference) against the single-device step's forward of every row."""
    cfg, params, ref_params, _ = model
    ocfg = optim.get_default_config()
    ocfg.learning_rate, ocfg.weight_decay, ocfg.max_grad_norm = 1e-3, 0.1, 1.0
    optimizer = optim.make_optimizer(ocfg)
    gcfg = guidance_config()
    step_cfg = step_config(loss_type="dapo", micro_batch_size=16, guided="shaping")
    batch = rollout_batch(8, seed=4)
    if shared_prompts:
        batch = with_group_prompts(batch)
        train_step.check_shared_prompts(batch, G)

    state = train_state.create(params, optimizer, gcfg, jax.random.key(0))
    single_fn = train_step.make_train_step(cfg, step_cfg, gcfg, optimizer, donate=False)
    single_state, single_metrics = compile_step(single_fn, state, ref_params, batch)(state, ref_params, batch)

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    shardings = train_state.state_shardings(
        train_state.abstract_state(params, optimizer, gcfg), optimizer, mesh, models.param_logical_axes(cfg)
    )
    sharded_state = train_state.shard_state(state, shardings)
    sharded_ref = jax.device_put(ref_params, shardings.params)
    sharded_fn = train_step.make_train_step(cfg, step_cfg, gcfg, optimizer, mesh=mesh, shared_prompts=shared_prompts)
    compiled = compile_step(sharded_fn, sharded_state, sharded_ref, batch)
    new_state, metrics = compiled(sharded_state, sharded_ref, batch)
    assert sharded_state.params["embedding"].is_deleted()  # donated

    # Tolerances follow from the conditioning of each quantity, not from one CPU's rounding:
    # sharding reorders the sums over the n loss tokens (and over hidden and vocabulary axes).
    n = int(single_metrics["num_loss_tokens"])
    assert_metrics_match(metrics, single_metrics, n, loss_term_size(batch, step_cfg.beta))
    for key in ("clip_ratio/region", "learning_rate"):  # not sums: equal
        assert float(metrics[key]) == float(single_metrics[key]), key
    assert float(metrics["learning_rate"]) == pytest.approx(1e-3)

    # The clipped gradient, read from Adam's first moment m = (1 - b1) g. Its rounding scales
    # with the whole gradient (every entry is fed by the same token sums and hidden states), not
    # with the entry, so it is bounded relative to the gradient's norm. A dropped micro-batch or
    # shard moves it by a large fraction of the norm; a mis-scaled one moves grad_norm (the
    # gradient before clipping).
    adam = lambda s: s.opt_state[1]  # noqa: E731  (clip, adam, decay, lr)
    g_single = flat(adam(single_state).mu) / (1 - ocfg.b1)
    g_sharded = flat(adam(new_state).mu) / (1 - ocfg.b1)
    grad_error = sum_rounding(n, float(np.linalg.norm(g_single)))
    assert np.linalg.norm(g_sharded - g_single) <= grad_error
    nu_error = (1 - ocfg.b2) * grad_error * (2 * np.abs(g_single) + grad_error)  # v = (1 - b2) g²
    assert np.all(np.abs(flat(adam(new_state).nu) - flat(adam(single_state).nu)) <= nu_error)

    # Parameters: Adam's first step is p - lr (g / (|g| + eps) + wd p). Where |g| is near eps or
    # near the gradient's rounding the direction is ill-conditioned (any summation order moves it
    # by up to lr), so the update is compared only where it is well-conditioned, with the bound
    # its slope gives, plus float32 rounding of the parameter itself.
    lr = ocfg.learning_rate
    p_start, p_single, p_sharded = flat(params), flat(single_state.params), flat(new_state.params)
    drift = adam_first_update_drift(g_single, grad_error, ocfg.eps)
    well_conditioned = np.abs(g_single) > 10 * max(grad_error, ocfg.eps)
    assert well_conditioned.mean() > 0.5  # most weights are checked
    bound = lr * drift + 2 * F32_EPS * (np.abs(p_single) + lr)
    assert np.all(np.abs(p_sharded - p_single)[well_conditioned] <= bound[well_conditioned])
    assert np.max(np.abs(p_sharded - p_single)) <= 2 * lr * (1 + ocfg.weight_decay)  # |direction| <= 1 anywhere
    assert np.max(np.abs(p_single - p_start)) > 0.5 * lr

    gate = ("layers_0", "mlp", "gate_proj", "kernel")
    pick = lambda tree, path: functools.reduce(lambda node, key: node[key], path, tree)  # noqa: E731
    expected_specs = {
        gate: PartitionSpec("fsdp", "tensor"),  # (embed, mlp)
        ("layers_1", "mlp", "down_proj", "kernel"): PartitionSpec("tensor", "fsdp"),  # (mlp, embed)
        ("layers_0", "self_attn", "k_proj", "kernel"): PartitionSpec("fsdp", "tensor"),  # (embed, kv_heads)
        ("embedding",): PartitionSpec("tensor", "fsdp"),  # (vocab, embed)
        ("lm_head",): PartitionSpec("fsdp", "tensor"),  # (embed, vocab)
        ("norm", "scale"): PartitionSpec(None),
    }
    for path, spec in expected_specs.items():
        for tree in (new_state.params, adam(new_state).mu, adam(new_state).nu):
            assert pick(tree, path).sharding.spec == spec, path
    assert pick(new_state.params, gate).addressable_shards[0].data.shape == (32, 64)  # 64x128 over 2x2
    for scalar in (new_state.step, adam(new_state).count, new_state.guidance.current_length, new_state.rng):
        assert scalar.sharding.spec == PartitionSpec()
    jax.tree.map(np.testing.assert_array_equal, new_state.guidance, single_state.guidance)


# ----------------------------------------------------------------------------- objective options

ALL_OPTIONS = dict(dual_clip_c=1.5, kl_clamp=0.05, entropy_coef=0.01, entropy_top_fraction=0.5,
                   guide_nll_coef=0.1, advantage_baseline="guided_split")


def test_every_objective_option_runs_with_finite_metrics(model):
    """All six step options on at once, μ = 2 so the second update's ratios leave 1 (the dual
    bound can act), k = 2 micro-batches: finite metrics, and each option shows in them."""
    cfg, params, ref_params, _ = model
    rate = 3.0  # large steps, as in the μ = 2 test, so the second update is clipped
    step_cfg = step_config(loss_type="bnpo", num_iterations=2, micro_batch_size=8, **ALL_OPTIONS)
    step_fn = train_step.make_train_step(cfg, step_cfg, guidance_config(), optax.sgd(rate), donate=False)
    state = train_state.create(params, optax.sgd(rate), guidance_config(), jax.random.key(0))
    batch = rollout_batch(4, seed=2)
    new_state, metrics = compile_step(step_fn, state, ref_params, batch)(state, ref_params, batch)
    assert all(np.isfinite(float(value)) for value in metrics.values()), metrics
    assert max_abs_diff(new_state.params, params) > 1e-3
    assert float(metrics["num_guided_tokens"]) > 0 and float(metrics["guide_nll"]) > 0
    assert 0.4 < float(metrics["policy_token_share"]) < 0.7  # half the loss tokens, ties kept
    # Means over the 2 updates; the first has ratio 1 everywhere, the second leaves the clip range.
    assert float(metrics["clip_ratio/region"]) > 0 and float(metrics["clip_ratio/dual"]) > 0


def test_objective_options_accumulate_exactly_in_the_step(model):
    """Every option on (μ = 1): one micro-batch and two give the same update and metrics, so the
    entropy selection, the guide-token count and the guided_split advantages are all global; and
    both equal one SGD step on the full-batch loss written out by hand (so the entropy reaches the
    loss with its gradient, and the selection is the numpy reference's)."""
    cfg, params, ref_params, _ = model
    batch = rollout_batch(4, seed=5)
    state = train_state.create(params, optax.sgd(SGD_RATE), guidance_config(), jax.random.key(0))
    results = {}
    for micro_batch_size in (16, 8):
        step_cfg = step_config(loss_type="grpo", micro_batch_size=micro_batch_size, **ALL_OPTIONS)
        step_fn = train_step.make_train_step(cfg, step_cfg, guidance_config(), optax.sgd(SGD_RATE), donate=False)
        results[micro_batch_size] = compile_step(step_fn, state, ref_params, batch)(state, ref_params, batch)
    (full_state, full), (split_state, split) = results[16], results[8]

    # The selection is the same only if no two entropies sit within rounding of each other at the
    # cut: check that the gap there is far above float32 rounding of an entropy (≈ 1e-6).
    _, entropy = jax.jit(functools.partial(train_step.compute_logprobs, cfg, temperature=TEMPERATURE,
                                           with_entropy=True))(params, batch)
    loss_tokens = np.asarray(batch.completion_mask) > 0
    ordered = np.sort(np.asarray(entropy)[loss_tokens])[::-1]
    keep = 1 + int(np.floor(0.5 * (ordered.size - 1)))
    assert ordered[keep - 1] - ordered[keep] > 1e-4
    assert float(full["policy_token_share"]) == float(split["policy_token_share"]) == keep / ordered.size

    n = int(full["num_loss_tokens"])
    advantages = group_advantages_split_ref(batch.rewards, np.asarray(batch.guided_mask).any(axis=1), G)
    weights = np.asarray(batch.completion_mask).sum(axis=1)
    term_size = (float(np.average(np.abs(advantages), weights=weights)) + 3 * 0.04
                 + ALL_OPTIONS["entropy_coef"] * float(full["entropy"])
                 + ALL_OPTIONS["guide_nll_coef"] * float(full["guide_nll"]))
    assert_metrics_match(split, full, n, term_size)
    for key in ("policy_token_share", "num_guided_tokens", "clip_ratio/region"):
        assert float(split[key]) == float(full[key]), key
    np.testing.assert_allclose(split["guide_nll"], full["guide_nll"], rtol=sum_rounding(n, 1.0))
    bound = sum_rounding(n, float(full["grad_norm"])) + F32_EPS * np.abs(flat(full_state.params)).max()
    assert np.abs(flat(split_state.params) - flat(full_state.params)).max() <= bound

    selected = high_entropy_mask_ref(np.asarray(entropy), loss_tokens, ALL_OPTIONS["entropy_top_fraction"])
    options = train_step.loss_options(step_config(**ALL_OPTIONS), L)
    logprobs_of = functools.partial(train_step.compute_logprobs, cfg, batch=batch, temperature=TEMPERATURE)

    @jax.jit
    def sgd(p):
        def loss(p):
            logprobs, entropy = logprobs_of(p, with_entropy=True)
            return grpo_loss(logprobs, jax.lax.stop_gradient(logprobs), logprobs_of(ref_params), advantages,
                             batch.completion_mask, guided_mask=batch.guided_mask, entropy=entropy,
                             policy_mask=selected, **options)[0]
        return jax.tree.map(lambda w, g: w - SGD_RATE * g, p, jax.grad(loss)(p))

    expected = flat(sgd(params))
    assert np.abs(expected - flat(params)).max() > 1e3 * bound  # the update is far above rounding
    for new_state in (full_state, split_state):
        assert np.abs(flat(new_state.params) - expected).max() <= bound


def test_objective_option_defaults_change_nothing_and_bad_values_name_the_key(model):
    cfg = model[0]
    defaults = train_step.get_default_config()
    assert (defaults.dual_clip_c, defaults.kl_clamp, defaults.entropy_coef, defaults.entropy_top_fraction,
            defaults.guide_nll_coef, defaults.advantage_baseline) == (0.0, 0.0, 0.0, 1.0, 0.0, "group")
    options = train_step.loss_options(defaults, L)
    assert all(options[key] == 0.0 for key in ("dual_clip_c", "kl_clamp", "entropy_coef", "guide_nll_coef"))
    for key, value, message in [
        ("dual_clip_c", 0.9, r"step.dual_clip_c=0.9 is not valid; valid: 0 \(off\) or a number > 1"),
        ("kl_clamp", -1.0, r"step.kl_clamp=-1.0 is not valid; valid: a number >= 0"),
        ("entropy_coef", -0.1, r"step.entropy_coef=-0.1 is not valid"),
        ("entropy_top_fraction", 0.0, r"step.entropy_top_fraction=0.0 is not valid; valid: a number in \(0, 1\]"),
        ("guide_nll_coef", float("nan"), r"step.guide_nll_coef=nan is not valid"),
        ("advantage_baseline", "pairs",
         r"step.advantage_baseline='pairs' is not valid; valid: \('group', 'guided_split'\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            train_step.make_train_step(cfg, step_config(**{key: value}), guidance_config(), optax.sgd(1.0))



# ----------------------------------------------------------------------------- sampler/trainer mismatch (TIS)

_TIS_CACHE: dict = {}
TIS_SHIFT = 0.3  # nats: the sampler's log-prob of every sampled token is the trainer's minus this


def tis_step(model, tis: str):
    """(compiled step, fresh state) of the grid's grpo point (KL on, micro-batches of 8) with
    step.tis; "none" is the grid's own compiled step, so only two programs are added."""
    if tis == "none":
        return grid_step(model, "grpo", 8)[:2]
    cfg, params, ref_params, _ = model
    state = train_state.create(params, optax.sgd(SGD_RATE), guidance_config(), jax.random.key(0))
    if tis not in _TIS_CACHE:
        step_cfg = step_config(loss_type="grpo", guided=GUIDED_FOR["grpo"], micro_batch_size=8, tis=tis)
        step_fn = train_step.make_train_step(cfg, step_cfg, guidance_config(), optax.sgd(SGD_RATE), donate=False)
        _TIS_CACHE[tis] = compile_step(step_fn, state, ref_params, rollout_batch(4))
    return _TIS_CACHE[tis], state


def sampler_batches(model):
    """(the trainer's log-probs [B, L] from a separate jit, a batch whose sampler log-probs equal
    them, one whose sampled tokens have them minus TIS_SHIFT; guide tokens and padding hold 0)."""
    cfg, params, _, _ = model
    batch = rollout_batch(4)
    trainer = np.asarray(jax.jit(functools.partial(train_step.compute_logprobs, cfg, temperature=TEMPERATURE))(
        params, batch))
    sampled = (np.asarray(batch.completion_mask) > 0) & ~(np.asarray(batch.guided_mask) > 0)
    equal = np.where(sampled, trainer, 0.0).astype(np.float32)
    shifted = np.where(sampled, trainer - np.float32(TIS_SHIFT), 0.0).astype(np.float32)
    return trainer, batch.replace(old_logprobs=equal), batch.replace(old_logprobs=shifted)


def test_tis_with_the_trainers_logprobs_changes_nothing(model):
    """Sampler log-probs equal to the trainer's, as a separately compiled forward gives them: the
    step's own forward differs from that one by d, a few float32 roundings (on one CPU about
    1.4e-6, 3 ulps of log-probs near -5), which the step reports as mismatch/logprob_max_abs_diff.
    So the weights are exp(x) with |x| <= d per token, <= L·d per row, i.e. 1 within
    e^(L·d) - 1 (at d = 0 exactly 1, and multiplying by 1.0 is exact). Token, sequence and no TIS
    then give the same update up to (a) XLA's freedom to order sums differently in the three
    programs (the accumulation test's bound) and (b) that weight error times the sum of the
    per-token gradients' sizes, which the advantages' cancellation hides from grad_norm: it is
    estimated as n · grad_norm. The bound (about 1% of the update's largest entry) is a worst
    case; the observed difference is orders of magnitude smaller."""
    _, params, _, _ = model
    _, equal, _ = sampler_batches(model)
    none_compiled, state = tis_step(model, "none")
    none_state, none_metrics = none_compiled(state, params, equal)
    n = int(none_metrics["num_loss_tokens"])
    p_none = flat(none_state.params)
    grad_norm = float(none_metrics["grad_norm"])
    for tis in ("token", "sequence"):
        compiled, state = tis_step(model, tis)
        new_state, metrics = compiled(state, params, equal)
        drift = float(metrics["mismatch/logprob_max_abs_diff"])
        assert drift < 1e-5  # this program's own forward against the separate one
        weight_error = np.expm1(L * drift) + 4 * F32_EPS
        assert abs(float(metrics["mismatch/tis_weight_mean"]) - 1.0) <= weight_error
        assert float(metrics["mismatch/tis_clipped_fraction"]) == 0.0
        bound = sum_rounding(n, grad_norm) + F32_EPS * np.abs(p_none).max() + weight_error * n * grad_norm
        assert bound < 0.02 * np.abs(p_none - flat(params)).max()  # far below the update: not vacuous
        assert np.abs(flat(new_state.params) - p_none).max() <= bound, tis
        np.testing.assert_allclose(metrics["loss"], none_metrics["loss"], rtol=0,
                                   atol=sum_rounding(n, loss_term_size(equal, 0.04)) * (1 + n * weight_error))


def test_tis_drift_metrics_and_loss_match_numpy(model):
    """Sampler log-probs shifted by TIS_SHIFT on every sampled token: the step's drift metrics
    (merged over its 2 micro-batches) and its loss equal the float64 numpy reference's, computed
    from the separately compiled trainer log-probs. μ = 1, so the ratio is exactly 1 and with the
    reference equal to the policy the per-token loss is -w·A (the KL is rounding, < 1e-6).
    Tolerances: the step's old log-probs differ from those by d (the equal-batch drift, measured
    by the none step), each drift by one float32 rounding of the shift (eps·|log p|), and the
    means sum n terms (n·eps relative); a weight moves by e^(L·(d + eps·max|log p|)) - 1."""
    _, params, _, _ = model
    trainer, equal, shifted = sampler_batches(model)
    none_compiled, state = tis_step(model, "none")
    d = float(none_compiled(state, params, equal)[1]["mismatch/logprob_max_abs_diff"])
    per_token = d + F32_EPS * np.abs(trainer).max()  # error of one drift
    completion, guided = np.asarray(shifted.completion_mask), np.asarray(shifted.guided_mask)
    n_sampled = int(((completion > 0) & ~(guided > 0)).sum())
    advantages = group_advantages_ref(shifted.rewards, G)
    for tis in ("none", "token", "sequence"):
        compiled, state = tis_step(model, tis)
        _, metrics = compiled(state, params, shifted)
        weights = None if tis == "none" else tis_weights_ref(trainer, shifted.old_logprobs, completion, guided,
                                                             tis, 2.0)
        expected = mismatch_metrics_ref(trainer, shifted.old_logprobs, completion, guided, weights, tis, 2.0)
        assert expected["mismatch/logprob_abs_diff"] == pytest.approx(TIS_SHIFT, rel=1e-5)
        for key, value in expected.items():
            if key.startswith("mismatch/num_"):
                assert float(metrics[key]) == value, key
            elif key == "mismatch/tis_clipped_fraction":
                assert float(metrics[key]) == pytest.approx(value, rel=4 * F32_EPS), key
            elif key == "mismatch/tis_weight_mean":
                np.testing.assert_allclose(metrics[key], value, rtol=np.expm1(L * per_token) + n_sampled * F32_EPS,
                                           err_msg=key)
            else:  # drifts of size TIS_SHIFT: abs_diff, max and k1 (= -TIS_SHIFT)
                np.testing.assert_allclose(metrics[key], value, rtol=0,
                                           atol=per_token + n_sampled * F32_EPS * TIS_SHIFT, err_msg=key)
        assert float(metrics["mismatch/num_sampled_tokens"]) == n_sampled
        if tis == "none":
            assert not any(key in metrics for key in ("mismatch/tis_weight_mean", "mismatch/num_tis_units"))
            continue
        # Token weights e^0.3 are all below C = 2; at sequence level rows of 3+ sampled tokens
        # (e^0.9) reach it and shorter ones (e^0.3, e^0.6) do not: both sides of the cap.
        clipped = float(metrics["mismatch/tis_clipped_fraction"])
        assert clipped == 0.0 if tis == "token" else 0 < clipped < 1
        expected_loss, _ = policy_loss_ref(trainer, trainer, trainer, advantages, completion, guided_mask=guided,
                                           loss_type="grpo", guided=GUIDED_FOR["grpo"], beta=0.04,
                                           tis_weights=weights)
        n = int(metrics["num_loss_tokens"])
        assert abs(float(metrics["kl"])) < 1e-6
        term_size = 2.0 * loss_term_size(shifted, 0.04)  # weights up to C = 2
        np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=0,
                                   atol=sum_rounding(n, term_size) + np.expm1(L * per_token) * term_size, err_msg=tis)
        plain, _ = policy_loss_ref(trainer, trainer, trainer, advantages, completion, guided_mask=guided,
                                   loss_type="grpo", guided=GUIDED_FOR["grpo"], beta=0.04)
        assert abs(plain - expected_loss) > 0.01  # the weights really reach the loss


def test_tis_config_defaults_off_and_bad_values_name_the_key(model):
    cfg = model[0]
    defaults = train_step.get_default_config()
    assert (defaults.tis, defaults.tis_cap) == ("none", 2.0)
    for overrides, message in [
        (dict(tis="row"), r"step.tis='row' is not valid; valid: \('none', 'token', 'sequence'\)"),
        (dict(tis="token", tis_cap=0.0), r"step.tis_cap=0.0 is not valid; valid: a number > 0"),
        (dict(tis_cap=-1.0), r"step.tis_cap=-1.0 is not valid"),
        (dict(tis_cap=float("nan")), r"step.tis_cap=nan is not valid"),
        (dict(tis_cap=1e39), r"step.tis_cap=1e\+39 is not valid.*float32"),
        (dict(tis="sequence", loss_type="sft"),
         r"step.tis='sequence' is not valid with loss_type='sft'; valid: 'none'"),
    ]:
        with pytest.raises(ValueError, match=message):
            train_step.make_train_step(cfg, step_config(**overrides), guidance_config(), optax.sgd(1.0))

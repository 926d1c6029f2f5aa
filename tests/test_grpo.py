"""Tests for g2rpo_jax.grpo against the float64 numpy re-derivation in tests/reference/grpo_numpy.py."""

from __future__ import annotations

import itertools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2rpo_jax import grpo

sys.path.insert(0, str(pathlib.Path(__file__).parent / "reference"))
from grpo_numpy import (  # noqa: E402
    group_advantages_ref,
    loss_grad_fd,
    policy_loss_ref,
    token_entropy_ref,
)

B, T, G = 8, 10, 2
MAX_LEN = 12
BETA = 0.1

# Row lengths: full rows, a 1-token row, an empty (padding) row, ragged others.
LENGTHS = (10, 1, 7, 0, 4, 10, 9, 5)
# Guided prefix length per row; row 2 is guided over its whole completion (it has no loss
# tokens under guided="mask"); guided bits set in padding must be ignored.
GUIDE_PREFIX = (3, 0, 7, 2, 2, 0, 4, 0)


def make_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    logprobs = -rng.uniform(0.05, 3.0, (B, T))  # [B, T]
    # A per-sequence shift plus token noise: ratios leave the clip range on both sides at the
    # token level and at the sequence level.
    old = logprobs - rng.normal(0.0, 0.35, (B, 1)) - rng.normal(0.0, 0.4, (B, T))
    ref = logprobs + rng.normal(0.0, 0.3, (B, T))
    advantages = rng.normal(0.0, 1.0, B)
    advantages[0], advantages[1] = abs(advantages[0]) + 0.1, -abs(advantages[1]) - 0.1
    mask = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float32)
    guided_mask = (np.arange(T)[None, :] < np.array(GUIDE_PREFIX)[:, None]).astype(np.float32)
    guided_mask[4, 6:] = 1.0  # row 4 has length 4: these bits lie in padding and must be ignored
    # Padding positions hold garbage that must not leak into the loss or its gradient.
    for array in (logprobs, old, ref):
        array[mask == 0] = 7.5
    return dict(
        logprobs=logprobs.astype(np.float32),
        old_logprobs=old.astype(np.float32),
        ref_logprobs=ref.astype(np.float32),
        advantages=advantages.astype(np.float32),
        mask=mask,
        guided_mask=guided_mask,
    )


INPUTS = make_inputs()
OPTION_GRID = list(
    itertools.product(grpo.LOSS_TYPES, grpo.GUIDED_MODES, grpo.KL_ESTIMATORS, grpo.IMPORTANCE_LEVELS)
)


F32_EPS = float(np.finfo(np.float32).eps)


def loss_term_sizes(inputs) -> np.ndarray:
    """|terms| of the loss per loss token, before they cancel: |A| times the (clipped or not)
    ratio, plus BETA times the KL estimator's parts (e^r, r and 1, or r²/2)."""
    mask = inputs["mask"] > 0
    ratio = np.exp(inputs["logprobs"] - inputs["old_logprobs"])[mask]
    log_ref = (inputs["ref_logprobs"] - inputs["logprobs"])[mask]
    advantage = np.broadcast_to(np.abs(inputs["advantages"])[:, None], mask.shape)[mask]
    return advantage * (ratio + 1.5) + BETA * (np.exp(log_ref) + np.abs(log_ref) + 1 + log_ref**2)


def loss_rounding(inputs, normalizer=None) -> float:
    """How far two float32 evaluations of the loss that sum its n tokens in different orders may
    drift: about n · eps · Σ|terms| / normalizer. The terms cancel (advantages of both signs), so
    this is absolute, not relative to the loss; without a normalizer, the smallest any loss type
    uses (one per sequence)."""
    n = int(inputs["mask"].sum())
    normalizer = normalizer or int((inputs["mask"] > 0).any(axis=1).sum())
    return n * F32_EPS * float(loss_term_sizes(inputs).sum()) / normalizer


def metric_rounding(inputs) -> dict:
    """assert_allclose tolerances for token means of the same n terms: n · eps, relative for the
    ones that do not cancel, absolute (times the mean term size) for those that do."""
    n = int(inputs["mask"].sum())
    return dict(rtol=n * F32_EPS, atol=n * F32_EPS * float(loss_term_sizes(inputs).mean()))


def as_f64(inputs):
    return {key: np.asarray(value, np.float64) for key, value in inputs.items()}


def jax_loss(inputs, **options):
    return call_policy_loss(grpo.policy_loss, inputs, **options)


def call_policy_loss(loss_fn, inputs, **options):
    """Calls `grpo.policy_loss` (or a jitted copy of it) on the numpy test inputs."""
    arrays = {key: jnp.asarray(value) for key, value in inputs.items()}
    return loss_fn(
        arrays["logprobs"],
        arrays["old_logprobs"],
        arrays["ref_logprobs"],
        arrays["advantages"],
        arrays["mask"],
        guided_mask=arrays["guided_mask"],
        **options,
    )


def ref_loss(inputs, **options):
    x = as_f64(inputs)
    return policy_loss_ref(
        x["logprobs"],
        x["old_logprobs"],
        x["ref_logprobs"],
        x["advantages"],
        x["mask"],
        guided_mask=x["guided_mask"],
        **options,
    )


def assert_metrics_close(actual, expected, rtol=1e-5, atol=1e-6):
    assert set(actual) == set(expected) == set(grpo.METRIC_KEYS)
    for key in grpo.METRIC_KEYS:
        np.testing.assert_allclose(float(actual[key]), expected[key], rtol=rtol, atol=atol, err_msg=key)


# ----------------------------------------------------------------------------- the inputs


@pytest.mark.parametrize("importance_level", grpo.IMPORTANCE_LEVELS)
def test_inputs_exercise_clipping_kl_masking_and_guidance(importance_level):
    _, metrics = ref_loss(INPUTS, importance_level=importance_level, beta=BETA)
    assert metrics["clip_ratio/low"] > 0.05
    assert metrics["clip_ratio/high"] > 0.05
    assert metrics["clip_ratio/region"] < 1.0  # some tokens are also inside the trust region
    assert metrics["kl"] > 0
    assert 0 < metrics["guided_token_share"] < 1
    assert metrics["num_sequences"] == B - 1  # the padding row is not a sequence
    _, masked = ref_loss(INPUTS, importance_level=importance_level, guided="mask", beta=BETA)
    assert masked["num_loss_tokens"] < metrics["num_loss_tokens"]
    advantages = INPUTS["advantages"]
    assert (advantages > 0).any() and (advantages < 0).any()


# ----------------------------------------------------------------------------- loss vs reference


@pytest.mark.parametrize("loss_type,guided,kl,importance_level", OPTION_GRID)
def test_policy_loss_and_gradient_match_reference(loss_type, guided, kl, importance_level):
    options = dict(
        loss_type=loss_type,
        guided=guided,
        kl=kl,
        importance_level=importance_level,
        beta=BETA,
        epsilon_low=0.2,
        epsilon_high=0.28,
        max_completion_length=MAX_LEN,
        shaping_gamma=0.1,
    )
    loss, metrics = jax_loss(INPUTS, **options)
    expected_loss, expected_metrics = ref_loss(INPUTS, **options)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5, atol=1e-6)
    assert_metrics_close(metrics, expected_metrics)

    def loss_of_logprobs(logprobs):
        return jax_loss({**INPUTS, "logprobs": logprobs}, **options)[0]

    grad = jax.grad(loss_of_logprobs)(jnp.asarray(INPUTS["logprobs"]))
    expected_grad = loss_grad_fd(lambda lp: ref_loss({**INPUTS, "logprobs": lp}, **options)[0], INPUTS["logprobs"])
    assert np.abs(expected_grad).max() > 1e-3  # the check is not vacuous
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-4, atol=2e-6)
    assert np.all(np.asarray(grad)[INPUTS["mask"] == 0] == 0)


def test_bnpo_and_dapo_agree_on_a_full_batch():
    bnpo, _ = jax_loss(INPUTS, loss_type="bnpo")
    dapo, _ = jax_loss(INPUTS, loss_type="dapo")
    grpo_loss, _ = jax_loss(INPUTS, loss_type="grpo")
    assert float(bnpo) == float(dapo)
    assert abs(float(bnpo) - float(grpo_loss)) > 1e-4  # the length weighting really differs


def test_beta_zero_allows_missing_reference_and_drops_kl():
    arrays = {key: jnp.asarray(value) for key, value in INPUTS.items()}
    loss, metrics = grpo.policy_loss(
        arrays["logprobs"], arrays["old_logprobs"], None, arrays["advantages"], arrays["mask"], beta=0.0
    )
    expected_loss, _ = ref_loss(INPUTS, beta=0.0)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5, atol=1e-6)
    assert float(metrics["kl"]) == 0.0
    # With a reference and beta = 0 the KL is reported but not added.
    loss_with_ref, metrics_with_ref = jax_loss(INPUTS, beta=0.0)
    np.testing.assert_allclose(float(loss_with_ref), expected_loss, rtol=1e-5, atol=1e-6)
    assert float(metrics_with_ref["kl"]) > 0


def test_log_ratio_clamp_matches_reference():
    options = dict(log_ratio_clamp=0.3, epsilon_low=0.5, epsilon_high=0.5, beta=BETA, loss_type="dapo")
    log_ratio = (INPUTS["logprobs"] - INPUTS["old_logprobs"])[INPUTS["mask"] > 0]
    assert (log_ratio > 0.3).any() and (log_ratio < -0.3).any()
    loss, metrics = jax_loss(INPUTS, **options)
    expected_loss, expected_metrics = ref_loss(INPUTS, **options)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5, atol=1e-6)
    assert_metrics_close(metrics, expected_metrics)
    unclamped, _ = jax_loss(INPUTS, **{**options, "log_ratio_clamp": 20.0})
    assert abs(float(unclamped) - float(loss)) > 1e-4


@pytest.mark.parametrize("advantage", [-1.0, 1.0])
def test_clipping_uses_min_for_both_advantage_signs(advantage):
    """One token per case: the surrogate is flat exactly where PPO's pessimistic bound clips."""
    log_ratios = jnp.log(jnp.array([[0.5], [0.9], [1.1], [1.5]]))  # [4, 1]
    old = jnp.zeros((4, 1))
    advantages = jnp.full((4,), advantage)
    mask = jnp.ones((4, 1))

    def loss_fn(logprobs):
        return grpo.policy_loss(logprobs, old, None, advantages, mask, beta=0.0, loss_type="dapo")[0]

    grad = np.asarray(jax.grad(loss_fn)(old + log_ratios))[:, 0]
    # A < 0: a ratio far below 1 is clipped (flat), far above 1 is not (pessimistic).
    # A > 0: the mirror image.
    clipped = [True, False, False, False] if advantage < 0 else [False, False, False, True]
    assert [bool(g == 0) for g in grad] == clipped


# ----------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("num_micro_batches", [1, 2, 4])
def test_micro_batches_sum_to_full_batch(loss_type, num_micro_batches):
    arrays = {key: jnp.asarray(value) for key, value in INPUTS.items()}
    per_micro = B // num_micro_batches
    assert per_micro % G == 0  # groups stay whole
    for guided, importance_level in [("train", "token"), ("mask", "sequence"), ("shaping", "token")]:
        options = dict(
            loss_type=loss_type,
            guided=guided,
            importance_level=importance_level,
            beta=BETA,
            max_completion_length=MAX_LEN,
        )

        def loss_fn(logprobs, rows, normalizer):
            return grpo.policy_loss(
                logprobs,
                arrays["old_logprobs"][rows],
                arrays["ref_logprobs"][rows],
                arrays["advantages"][rows],
                arrays["mask"][rows],
                guided_mask=arrays["guided_mask"][rows],
                normalizer=normalizer,
                **options,
            )

        all_rows = slice(None)
        (full_loss, full_metrics), full_grad = jax.value_and_grad(loss_fn, has_aux=True)(
            arrays["logprobs"], all_rows, None
        )
        normalizer = grpo.loss_normalizer(
            loss_type, arrays["mask"], MAX_LEN, guided_mask=arrays["guided_mask"], guided=guided
        )
        micro_losses, micro_metrics, micro_grads = [], [], []
        for i in range(num_micro_batches):
            rows = slice(i * per_micro, (i + 1) * per_micro)
            (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(
                arrays["logprobs"][rows], rows, normalizer
            )
            micro_losses.append(float(loss))
            micro_metrics.append(metrics)
            micro_grads.append(np.asarray(grad))
        np.testing.assert_allclose(sum(micro_losses), float(full_loss), rtol=0, atol=loss_rounding(INPUTS))
        np.testing.assert_allclose(np.concatenate(micro_grads), np.asarray(full_grad), rtol=1e-6, atol=1e-8)
        stacked = {key: jnp.stack([m[key] for m in micro_metrics]) for key in grpo.METRIC_KEYS}
        combined = grpo.combine_metrics(stacked)
        expected = {key: float(value) for key, value in full_metrics.items()}
        assert_metrics_close(combined, expected, rtol=1e-5, atol=1e-6)


def test_loss_normalizer_counts_match_reference_conventions():
    mask, guided_mask = jnp.asarray(INPUTS["mask"]), jnp.asarray(INPUTS["guided_mask"])
    lengths = np.array(LENGTHS)
    guided_in_completion = np.minimum(np.array(GUIDE_PREFIX), lengths)
    unguided = lengths - guided_in_completion
    cases = {
        ("grpo", "train"): np.sum(lengths > 0),
        ("grpo", "mask"): np.sum(unguided > 0),
        ("bnpo", "train"): lengths.sum(),
        ("dapo", "mask"): unguided.sum(),
        ("dr_grpo", "shaping"): np.sum(lengths > 0) * MAX_LEN,
        ("dr_grpo", "mask"): np.sum(unguided > 0) * MAX_LEN,
    }
    for (loss_type, guided), expected in cases.items():
        value = grpo.loss_normalizer(loss_type, mask, MAX_LEN, guided_mask=guided_mask, guided=guided)
        assert float(value) == float(expected), (loss_type, guided)


# ----------------------------------------------------------------------------- jit


def test_policy_loss_is_jittable():
    static = ("loss_type", "kl", "guided", "importance_level", "max_completion_length", "beta")
    jitted = jax.jit(grpo.policy_loss, static_argnames=static)
    for loss_type, guided, importance_level in [("grpo", "shaping", "sequence"), ("dr_grpo", "mask", "token")]:
        options = dict(
            loss_type=loss_type,
            guided=guided,
            importance_level=importance_level,
            kl="k2",
            beta=BETA,
            max_completion_length=MAX_LEN,
        )
        # A traced normaliser, as in a micro-batch step.
        loss, metrics = call_policy_loss(jitted, INPUTS, normalizer=jnp.float32(5.0), **options)
        eager_loss, eager_metrics = jax_loss(INPUTS, normalizer=5.0, **options)
        # jit may fuse and order the sums differently from eager execution.
        np.testing.assert_allclose(float(loss), float(eager_loss), rtol=0, atol=loss_rounding(INPUTS, 5.0))
        for key in grpo.METRIC_KEYS:
            np.testing.assert_allclose(float(metrics[key]), float(eager_metrics[key]), err_msg=key,
                                       **metric_rounding(INPUTS))

    jitted_adv = jax.jit(grpo.group_advantages, static_argnames=("group_size", "scale"))
    rewards = jnp.array([1.0, 0.0, 0.5, 0.5, 0.0, 1.0])
    np.testing.assert_allclose(
        np.asarray(jitted_adv(rewards, group_size=2, scale="batch")),
        group_advantages_ref(np.asarray(rewards), 2, "batch"),
        rtol=1e-6,
    )


# ----------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("scale", grpo.ADVANTAGE_SCALES)
@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_group_advantages_match_reference(scale, group_size):
    rng = np.random.default_rng(group_size)
    # Discrete rewards make ties and some all-equal groups likely; add one explicit such group.
    rewards = rng.choice([0.0, 0.1, 0.5, 1.0], size=32).astype(np.float32)
    rewards[:group_size] = 0.1
    advantages = np.asarray(grpo.group_advantages(jnp.asarray(rewards), group_size, scale=scale))
    expected = group_advantages_ref(rewards, group_size, scale)
    np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-6)
    assert np.all(advantages[:group_size] == 0.0)  # exactly zero, not rounding noise
    zero_std = np.asarray(grpo.zero_std_groups(jnp.asarray(rewards), group_size))
    expected_zero_std = [len(set(rewards[i : i + group_size])) == 1 for i in range(0, 32, group_size)]
    assert zero_std.tolist() == expected_zero_std
    assert any(expected_zero_std) and not all(expected_zero_std)


def test_group_advantages_binary_rewards_follow_trl_formula():
    rewards = np.array([1, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1], np.float32)  # G = 4, int-like
    advantages = np.asarray(grpo.group_advantages(jnp.asarray(rewards, jnp.int32), 4))
    groups = rewards.reshape(3, 4).astype(np.float64)
    by_formula = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(advantages, by_formula.reshape(-1), rtol=1e-5)
    assert np.all(advantages[4:8] == 0.0)
    # "batch" divides every group by the same batch std; "none" only centres.
    batch = np.asarray(grpo.group_advantages(jnp.asarray(rewards), 4, scale="batch"))
    none = np.asarray(grpo.group_advantages(jnp.asarray(rewards), 4, scale="none"))
    np.testing.assert_allclose(batch * (np.std(rewards, ddof=1) + 1e-4), none, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(none, (groups - groups.mean(1, keepdims=True)).reshape(-1), atol=1e-7)


# ----------------------------------------------------------------------------- entropy


def test_token_entropy_matches_reference():
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 3.0, (3, 5, 11)).astype(np.float32)  # [B, T, V]
    mask = (rng.uniform(size=(3, 5)) < 0.6).astype(np.float32)
    value = grpo.token_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(mask))
    assert value.dtype == jnp.float32
    expected = token_entropy_ref(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), mask)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    assert float(grpo.token_entropy(jnp.asarray(logits), jnp.zeros((3, 5)))) == 0.0


# ----------------------------------------------------------------------------- errors


def test_misaligned_groups_raise_naming_both_numbers():
    with pytest.raises(ValueError, match=r"N=10.*group_size=4"):
        grpo.group_advantages(jnp.zeros(10), 4)
    with pytest.raises(ValueError, match=r"N=9.*group_size=2"):
        grpo.zero_std_groups(jnp.zeros(9), 2)
    with pytest.raises(ValueError, match=r"group_size=1"):
        grpo.group_advantages(jnp.zeros(4), 1, scale="group")


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda: grpo.group_advantages(jnp.zeros(4), 2, scale="rank"), r"scale='rank'.*'group', 'batch', 'none'"),
        (lambda: jax_loss(INPUTS, loss_type="ppo"), r"loss_type='ppo'.*'grpo', 'bnpo', 'dr_grpo', 'dapo'"),
        (lambda: jax_loss(INPUTS, kl="k4"), r"kl='k4'.*'k1', 'k2', 'k3'"),
        (lambda: jax_loss(INPUTS, guided="ignore"), r"guided='ignore'.*'train', 'mask', 'shaping'"),
        (lambda: jax_loss(INPUTS, importance_level="seq"), r"importance_level='seq'.*'token', 'sequence'"),
        (lambda: jax_loss(INPUTS, loss_type="dr_grpo"), r"max_completion_length=None"),
        (lambda: grpo.loss_normalizer("sum", jnp.ones((2, 3))), r"loss_type='sum'"),
        (
            lambda: grpo.policy_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), None, jnp.zeros(2), jnp.ones((2, 3))),
            r"ref_logprobs=None.*beta=0.04",
        ),
        (lambda: grpo.combine_metrics({"loss": jnp.zeros(2)}), r"missing.*num_sequences"),
    ],
)
def test_bad_options_raise_value_error_naming_value_and_options(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()

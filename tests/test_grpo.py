"""Tests for g2rpo_jax.grpo against the float64 numpy re-derivation in tests/reference/grpo_numpy.py."""

from __future__ import annotations

import itertools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2rpo_jax import grpo, partial_metrics

sys.path.insert(0, str(pathlib.Path(__file__).parent / "reference"))
from grpo_numpy import (  # noqa: E402
    group_advantages_ref,
    group_advantages_split_ref,
    high_entropy_mask_ref,
    loss_grad_fd,
    mismatch_metrics_ref,
    policy_loss_ref,
    tis_weights_ref,
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


def stack_parts(parts: list[dict]) -> dict:
    """Micro-batch metric parts stacked along a leading axis, as `lax.scan` would return them."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *parts)


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
                parts=True,
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
        combined = grpo.combine_metrics(stack_parts(micro_metrics))
        expected = {key: float(value) for key, value in partial_metrics.values(full_metrics).items()}
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
        (lambda: grpo.combine_metrics({"loss": jnp.zeros(2)}), r"metric 'loss' is a .* not a partial metric"),
    ],
)
def test_bad_options_raise_value_error_naming_value_and_options(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


# ----------------------------------------------------------------------------- objective options
# dual_clip_c, kl_clamp, entropy_coef, policy_mask (high-entropy tokens), guide_nll_coef and the
# guided_split advantage baseline, each against tests/reference/grpo_numpy.py.

SEEDS = (0, 1, 2)


def option_inputs(seed: int) -> dict[str, np.ndarray]:
    """`make_inputs` plus per-token entropies (garbage in padding), ratios far outside every clip
    range for both advantage signs, and a row with advantage exactly 0."""
    inputs = make_inputs(seed)
    rng = np.random.default_rng(100 + seed)
    entropy = rng.uniform(0.0, 4.0, (B, T)).astype(np.float32)
    entropy[inputs["mask"] == 0] = 7.5
    inputs["entropy"] = entropy
    old, logprobs = inputs["old_logprobs"], inputs["logprobs"]
    old[0, 1] = logprobs[0, 1] - 4.0  # A > 0, ratio e^4
    old[1, 0] = logprobs[1, 0] - 3.0  # A < 0, ratio e^3: far above any dual-clip bound used here
    old[5, 2] = logprobs[5, 2] + 4.0  # ratio e^-4
    inputs["advantages"][7] = 0.0
    return inputs


def jax_option_loss(inputs, **options):
    """`jax_loss` with the inputs' entropy passed along when the bonus is on."""
    if options.get("policy_mask") is not None:
        options = {**options, "policy_mask": jnp.asarray(options["policy_mask"])}
    if options.get("entropy_coef"):
        options = {**options, "entropy": jnp.asarray(inputs["entropy"])}
    return jax_loss(inputs, **options)


def ref_option_loss(inputs, **options):
    if options.get("entropy_coef"):
        options = {**options, "entropy": np.asarray(inputs["entropy"], np.float64)}
    return ref_loss(inputs, **options)


def option_loss(inputs, **options):
    """(jax (loss, metrics), reference (loss, metrics))."""
    return jax_option_loss(inputs, **options), ref_option_loss(inputs, **options)


def option_term_sizes(inputs, entropy_coef=0.0, guide_nll_coef=0.0, beta=BETA) -> np.ndarray:
    """[B, T] sizes of the terms each token adds to the loss before they cancel (0 on padding):
    those of `loss_term_sizes` (with this beta), the entropy bonus, and the token's share of the
    guide NLL mean."""
    mask = inputs["mask"] > 0
    ratio = np.exp(inputs["logprobs"] - inputs["old_logprobs"])[mask]
    log_ref = (inputs["ref_logprobs"] - inputs["logprobs"])[mask]
    advantage = np.broadcast_to(np.abs(inputs["advantages"])[:, None], mask.shape)[mask]
    sizes = np.zeros(mask.shape)
    sizes[mask] = (advantage * (ratio + 1.5) + beta * (np.exp(log_ref) + np.abs(log_ref) + 1 + log_ref**2)
                   + entropy_coef * np.abs(inputs["entropy"][mask]))
    guide = mask & (inputs["guided_mask"] > 0)
    sizes[guide] += guide_nll_coef * np.abs(inputs["logprobs"][guide]) / max(guide.sum(), 1)
    return sizes


def option_rounding(inputs, entropy_coef=0.0, guide_nll_coef=0.0, beta=BETA) -> float:
    """`loss_rounding` for the loss with these options: n · eps · Σ|terms| / (the smallest
    normaliser, one per sequence); the guide term has its own normaliser, folded into its sizes."""
    n = int(inputs["mask"].sum())
    sequences = int((inputs["mask"] > 0).any(axis=1).sum())
    sizes = option_term_sizes(inputs, entropy_coef, guide_nll_coef, beta)
    guide = (inputs["mask"] > 0) & (inputs["guided_mask"] > 0)
    return n * F32_EPS * (sizes[~guide].sum() / sequences + sizes[guide].sum())


def grad_rounding(inputs, entropy_coef=0.0, guide_nll_coef=0.0, beta=BETA) -> np.ndarray:
    """Per-entry atol for a float32 gradient against float64 central differences: each entry is a
    few float32 operations on its token's terms (T more for a sequence-level ratio, which sums the
    row) over a normaliser of at least one per sequence, plus the differences' own error
    (≈ eps64 · |loss| / h ≈ 1e-9 at h = 1e-6)."""
    sequences = int((inputs["mask"] > 0).any(axis=1).sum())
    sizes = option_term_sizes(inputs, entropy_coef, guide_nll_coef, beta)
    return (T + 8) * F32_EPS * np.maximum(sizes, sizes.max(axis=1, keepdims=True)) / sequences + 1e-8


def assert_option_grad(inputs, options, wrt="logprobs"):
    """jax.grad of the loss w.r.t. `wrt` against central differences of the reference."""
    tolerance = grad_rounding(inputs, options.get("entropy_coef", 0.0), options.get("guide_nll_coef", 0.0),
                              options.get("beta", BETA))

    def jax_of(values):
        return jax_option_loss({**inputs, wrt: values}, **options)[0]

    if options.get("tis_weights") is not None:  # weighted policy terms: their sizes scale with w
        tolerance = tolerance * max(1.0, float(np.max(options["tis_weights"])))
    grad = np.asarray(jax.grad(jax_of)(jnp.asarray(inputs[wrt])))
    expected = loss_grad_fd(lambda v: ref_option_loss({**inputs, wrt: v}, **options)[0], inputs[wrt])
    assert np.abs(expected).max() > 10 * tolerance.max()  # not vacuous
    np.testing.assert_array_less(np.abs(grad - expected), tolerance)
    assert np.all(grad[inputs["mask"] == 0] == 0)  # padding garbage never leaks
    return grad


def assert_option_metrics(metrics, expected, inputs, **options):
    """Token means: n · eps relative (or times the mean term size where they cancel)."""
    tolerance = metric_rounding(inputs)
    for key in grpo.METRIC_KEYS:
        if key == "loss":
            continue
        np.testing.assert_allclose(float(metrics[key]), expected[key], err_msg=key, **tolerance)


COMBOS = [("dapo", "token", "train"), ("grpo", "sequence", "shaping"), ("dr_grpo", "token", "mask")]


def combo_options(combo, **extra):
    loss_type, importance_level, guided = combo
    return dict(loss_type=loss_type, importance_level=importance_level, guided=guided, beta=BETA,
                epsilon_high=0.28, max_completion_length=MAX_LEN, **extra)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dual_clip_c", [1.5, 3.0])
@pytest.mark.parametrize("combo", COMBOS)
def test_dual_clip_matches_reference(seed, dual_clip_c, combo):
    inputs = option_inputs(seed)
    options = combo_options(combo, dual_clip_c=dual_clip_c)
    (loss, metrics), (expected_loss, expected_metrics) = option_loss(inputs, **options)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=0, atol=option_rounding(inputs))
    assert_option_metrics(metrics, expected_metrics, inputs)
    assert expected_metrics["clip_ratio/dual"] > 0  # the bound really holds somewhere
    plain, _ = ref_loss(inputs, **{**options, "dual_clip_c": 0.0})
    assert expected_loss < plain  # it only ever raises the objective of A < 0 tokens
    assert_option_grad(inputs, options)


def test_dual_clip_at_and_around_the_bound():
    """One token, A = -1: below c the objective is r·A (it is unclipped above 1 + epsilon_high),
    at c both branches agree, above c it is held at c·A with zero gradient. A >= 0 is untouched."""
    log_ratio = jnp.float32(np.log(2.5))
    c = float(jnp.exp(log_ratio))  # the float32 ratio the loss will compute, so r == c exactly
    steps = jnp.array([-1e-3, 0.0, 1e-3], jnp.float32)

    def loss_fn(logprobs, advantage, **options):  # logprobs [n, 1], one token per row
        n = logprobs.shape[0]
        return grpo.policy_loss(logprobs, jnp.zeros((n, 1)), None, jnp.full((n,), advantage), jnp.ones((n, 1)),
                                beta=0.0, loss_type="dapo", **options)

    logprobs = (log_ratio + steps)[:, None]  # [3, 1]
    ratios = np.exp(np.asarray(logprobs, np.float64)[:, 0])
    values = [float(loss_fn(lp[None], -1.0, dual_clip_c=c)[0]) for lp in logprobs]
    np.testing.assert_allclose(values, [ratios[0], c, c], rtol=4 * F32_EPS)
    grads = [float(jax.grad(lambda x: loss_fn(x, -1.0, dual_clip_c=c)[0])(lp[None])[0, 0]) for lp in logprobs]
    assert grads[0] != 0 and grads[2] == 0
    _, metrics = loss_fn(logprobs, -1.0, dual_clip_c=c)
    assert float(metrics["clip_ratio/dual"]) == pytest.approx(1 / 3)  # strictly above c only
    for advantage in (0.0, 1.0):
        for lp in (logprobs, logprobs + 3.0):
            with_bound, _ = loss_fn(lp, advantage, dual_clip_c=c)
            assert float(with_bound) == float(loss_fn(lp, advantage)[0])


def test_dual_clip_equals_trl_delta_above_the_clip_range():
    """TRL caps the unclipped ratio at delta for every token: -min(min(r, δ)·A, clip(r)·A). For
    δ >= 1 + epsilon_high that is the dual clip with c = δ (A > 0 never reaches the cap)."""
    rng = np.random.default_rng(5)
    log_ratio = rng.normal(0.0, 1.5, (16, 6)).astype(np.float32)
    advantages = rng.normal(0.0, 1.0, 16).astype(np.float32)
    delta, eps_low, eps_high = 2.0, 0.2, 0.28
    r = np.exp(log_ratio.astype(np.float64))
    a = advantages.astype(np.float64)[:, None]
    trl = -np.minimum(np.minimum(r, delta) * a, np.clip(r, 1 - eps_low, 1 + eps_high) * a).mean()
    loss, _ = grpo.policy_loss(jnp.asarray(log_ratio), jnp.zeros((16, 6)), None, jnp.asarray(advantages),
                               jnp.ones((16, 6)), beta=0.0, loss_type="dapo", epsilon_low=eps_low,
                               epsilon_high=eps_high, dual_clip_c=delta)
    sizes = np.abs(a) * (r + 1.5)
    np.testing.assert_allclose(float(loss), trl, rtol=0, atol=sizes.size * F32_EPS * sizes.mean())


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("kl_clamp", [0.02, 0.2])
@pytest.mark.parametrize("kl", grpo.KL_ESTIMATORS)
def test_kl_clamp_matches_reference(seed, kl_clamp, kl):
    inputs = option_inputs(seed)
    options = combo_options(COMBOS[seed % 3], kl=kl, kl_clamp=kl_clamp)
    options["beta"] = 1.0  # a KL weight that makes the clamp visible beside the surrogate's rounding
    tolerance = option_rounding(inputs, beta=1.0)
    (loss, metrics), (expected_loss, expected_metrics) = option_loss(inputs, **options)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=0, atol=tolerance)
    assert_option_metrics(metrics, expected_metrics, inputs)  # `kl` stays the unclamped estimator
    unclamped, unclamped_metrics = ref_loss(inputs, **{**options, "kl_clamp": 0.0})
    assert expected_metrics["kl"] == unclamped_metrics["kl"]
    assert abs(expected_loss - unclamped) > tolerance  # the check above would see a missing clamp
    assert_option_grad(inputs, options)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_entropy_bonus_matches_reference(seed, loss_type):
    inputs = option_inputs(seed)
    options = combo_options(COMBOS[seed], entropy_coef=0.05)
    options["loss_type"] = loss_type
    (loss, metrics), (expected_loss, expected_metrics) = option_loss(inputs, **options)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=0, atol=option_rounding(inputs, 0.05))
    assert_option_metrics(metrics, expected_metrics, inputs)
    assert_option_grad(inputs, options)
    # d loss / d entropy is -coef over the loss type's weight of each token, 0 on padding.
    grad = assert_option_grad(inputs, options, wrt="entropy")
    assert np.all(grad[inputs["mask"] > 0] <= 0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_fraction", [0.05, 0.2, 0.3, 0.5, 0.8, 0.9, 1.0])
def test_high_entropy_mask_matches_reference(seed, top_fraction):
    inputs = option_inputs(seed)
    rng = np.random.default_rng(seed)
    guided = grpo.GUIDED_MODES[seed % 2]  # two different token counts n
    loss_tokens = np.asarray(grpo.loss_token_mask(inputs["mask"], inputs["guided_mask"], guided))
    # Continuous entropies, then a handful of values so the cut falls on ties.
    for entropy in (inputs["entropy"], rng.choice([0.0, 0.5, 1.0, 2.0], (B, T)).astype(np.float32)):
        mask = np.asarray(grpo.high_entropy_mask(jnp.asarray(entropy), jnp.asarray(loss_tokens), top_fraction))
        expected = high_entropy_mask_ref(entropy, loss_tokens, top_fraction)
        np.testing.assert_array_equal(mask, expected)
        n = int(loss_tokens.sum())
        assert mask.sum() >= 1 + int(np.floor(top_fraction * (n - 1)))
        assert not np.any(mask & (loss_tokens == 0))
    if top_fraction == 1.0:
        np.testing.assert_array_equal(mask, loss_tokens > 0)


def test_high_entropy_mask_matches_trl_cases_and_edges():
    """TRL's unit cases for `get_high_entropy_mask` (its threshold argument is 1 - top_fraction)."""
    entropy = jnp.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.7, 0.8, 0.9, 1.0, 1.1, 1.2]])
    mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    cases = {
        0.2: [[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]],
        0.5: [[0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 0, 0]],
        1.0: [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]],
        1e-9: [[0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]],  # TRL's threshold 1.0: one token remains
    }
    for top_fraction, expected in cases.items():
        np.testing.assert_array_equal(grpo.high_entropy_mask(entropy, mask, top_fraction), np.array(expected, bool))
    other = jnp.array([[0.1, 0.2, 0.3, 1.4, 0.5, 0.14], [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]])
    half_mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(grpo.high_entropy_mask(other, half_mask, 0.2),
                                  np.array([[0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 0, 0]], bool))
    # The kept count is 1 + floor(q (n - 1)), not ceil(q n): n = 4, q = 0.3 keeps one token.
    np.testing.assert_array_equal(grpo.high_entropy_mask(jnp.array([[0.4, 0.1, 0.3, 0.2]]), jnp.ones((1, 4)), 0.3),
                                  np.array([[1, 0, 0, 0]], bool))
    assert not np.any(grpo.high_entropy_mask(entropy, jnp.zeros((2, 6)), 0.5))  # all masked
    ties = jnp.ones((2, 6))
    assert np.all(grpo.high_entropy_mask(ties, mask, 0.2) == (mask > 0))  # all tied at the cut: all kept


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("combo", COMBOS)
def test_policy_mask_matches_reference(seed, combo):
    """Unselected tokens keep their KL (and entropy) terms and stay in every normaliser."""
    inputs = option_inputs(seed)
    loss_tokens = np.asarray(grpo.loss_token_mask(inputs["mask"], inputs["guided_mask"], combo[2]))
    selected = high_entropy_mask_ref(inputs["entropy"], loss_tokens, 0.3)
    options = combo_options(combo, policy_mask=selected.astype(np.float32), entropy_coef=0.02)
    (loss, metrics), (expected_loss, expected_metrics) = option_loss(inputs, **options)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=0, atol=option_rounding(inputs, 0.02))
    assert_option_metrics(metrics, expected_metrics, inputs)
    assert metrics["num_loss_tokens"] == loss_tokens.sum()
    assert_option_grad(inputs, options)


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("guided", grpo.GUIDED_MODES)
def test_guide_nll_matches_reference(seed, loss_type, guided):
    inputs = option_inputs(seed)
    options = dict(loss_type=loss_type, guided=guided, beta=BETA, max_completion_length=MAX_LEN,
                   guide_nll_coef=0.3)
    (loss, metrics), (expected_loss, expected_metrics) = option_loss(inputs, **options)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=0, atol=option_rounding(inputs, 0, 0.3))
    assert_option_metrics(metrics, expected_metrics, inputs)
    guide = (inputs["mask"] > 0) & (inputs["guided_mask"] > 0)
    assert metrics["num_guided_tokens"] == guide.sum() > 0
    np.testing.assert_allclose(float(metrics["guide_nll"]), -inputs["logprobs"][guide].astype(np.float64).mean(),
                               rtol=guide.sum() * F32_EPS)
    grad = assert_option_grad(inputs, options)
    off, _ = jax_loss(inputs, **{**options, "guide_nll_coef": 0.0})
    off_grad = jax.grad(lambda lp: jax_loss({**inputs, "logprobs": lp}, **{**options, "guide_nll_coef": 0.0})[0])(
        jnp.asarray(inputs["logprobs"]))
    # The term only touches guide tokens: -coef / (number of guide tokens) each.
    np.testing.assert_allclose(grad - np.asarray(off_grad), np.where(guide, -0.3 / guide.sum(), 0.0),
                               rtol=0, atol=grad_rounding(inputs, 0, 0.3).max())
    assert float(loss) - float(off) == pytest.approx(0.3 * float(metrics["guide_nll"]), rel=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale", grpo.ADVANTAGE_SCALES)
@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_guided_split_advantages_match_reference(seed, scale, group_size):
    rng = np.random.default_rng(10 * seed + group_size)
    rewards = rng.choice([0.0, 0.1, 0.5, 1.0], size=32).astype(np.float32)
    guided = rng.uniform(size=32) < 0.5
    if group_size >= 4:
        rewards[:group_size] = 0.1  # a constant group
        guided[group_size : 2 * group_size] = np.arange(group_size) == 0  # a side of one rollout
        guided[2 * group_size : 3 * group_size] = False  # no guided rollout: the group baseline
        rewards[3 * group_size : 4 * group_size] = np.where(guided[3 * group_size : 4 * group_size], 1.0,
                                                            rng.choice([0.0, 0.5], group_size))
    advantages = np.asarray(grpo.group_advantages(jnp.asarray(rewards), group_size, scale=scale,
                                                  baseline="guided_split", guided=jnp.asarray(guided)))
    expected = group_advantages_split_ref(rewards, guided, group_size, scale)
    # A few float32 operations on rewards in [0, 1], divided by std + eps >= eps for "group".
    scale_bound = {"group": 1 / 1e-4, "batch": 1 / (np.std(rewards, ddof=1) + 1e-4), "none": 1.0}[scale]
    np.testing.assert_allclose(advantages, expected, rtol=16 * F32_EPS, atol=16 * F32_EPS * scale_bound)
    assert np.all(advantages[expected == 0] == 0.0)  # constant sides are exactly zero
    if group_size >= 4:
        assert advantages[group_size] == 0.0  # the lone guided rollout
        plain = np.asarray(grpo.group_advantages(jnp.asarray(rewards), group_size, scale=scale))
        part = slice(2 * group_size, 3 * group_size)
        np.testing.assert_allclose(advantages[part], plain[part], rtol=16 * F32_EPS, atol=16 * F32_EPS)
    jitted = jax.jit(grpo.group_advantages, static_argnames=("group_size", "scale", "baseline"))
    np.testing.assert_array_equal(
        jitted(jnp.asarray(rewards), group_size=group_size, scale=scale, baseline="guided_split",
               guided=jnp.asarray(guided)) == 0, advantages == 0)


def test_options_off_reproduce_the_default_loss_bit_for_bit():
    """Defaults, explicit zeros and inert settings (bounds never reached, every loss token selected)
    give the same bits, eagerly (op by op, so no fusion can reorder anything)."""
    inputs = option_inputs(0)
    loss_tokens = grpo.loss_token_mask(inputs["mask"], inputs["guided_mask"], "train")
    arrays = {key: jnp.asarray(value) for key, value in inputs.items()}
    variants = {
        "default": {},
        "zeros": dict(dual_clip_c=0.0, kl_clamp=0.0, entropy_coef=0.0, guide_nll_coef=0.0,
                      entropy=arrays["entropy"], guide_normalizer=jnp.float32(3.0)),
        "inert": dict(dual_clip_c=1e30, kl_clamp=1e30,
                      policy_mask=grpo.high_entropy_mask(arrays["entropy"], loss_tokens, 1.0)),
    }
    results = {}
    for name, extra in variants.items():
        def loss_fn(logprobs, extra=extra):
            return jax_loss({**inputs, "logprobs": logprobs}, beta=BETA, epsilon_high=0.28, **extra)

        (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(arrays["logprobs"])
        results[name] = (np.asarray(loss), {k: np.asarray(v) for k, v in metrics.items()}, np.asarray(grad))
    base_loss, base_metrics, base_grad = results["default"]
    for name in ("zeros", "inert"):
        loss, metrics, grad = results[name]
        assert loss.tobytes() == base_loss.tobytes(), name
        assert grad.tobytes() == base_grad.tobytes(), name
        for key in grpo.METRIC_KEYS:
            assert metrics[key].tobytes() == base_metrics[key].tobytes(), (name, key)
    rewards = jnp.asarray(np.random.default_rng(0).choice([0.0, 0.5, 1.0], 32), jnp.float32)
    default = np.asarray(grpo.group_advantages(rewards, 4))
    explicit = np.asarray(grpo.group_advantages(rewards, 4, baseline="group", guided=jnp.arange(32) % 2 == 0))
    assert default.tobytes() == explicit.tobytes()


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("num_micro_batches", [2, 4])
def test_objective_options_accumulate_exactly(loss_type, num_micro_batches):
    """Every option on: with the global normaliser, the global guide-token count and a policy mask
    chosen on the whole batch, micro-batch losses, gradients and metrics add up to the full batch."""
    inputs = option_inputs(1)
    arrays = {key: jnp.asarray(value) for key, value in inputs.items()}
    guided = "train"
    loss_tokens = grpo.loss_token_mask(arrays["mask"], arrays["guided_mask"], guided)
    selected = grpo.high_entropy_mask(arrays["entropy"], loss_tokens, 0.4)
    options = dict(loss_type=loss_type, guided=guided, beta=BETA, max_completion_length=MAX_LEN,
                   dual_clip_c=2.0, kl_clamp=0.05, entropy_coef=0.02, guide_nll_coef=0.3)

    def loss_fn(logprobs, rows, normalizer, guide_normalizer):
        return grpo.policy_loss(
            logprobs, arrays["old_logprobs"][rows], arrays["ref_logprobs"][rows], arrays["advantages"][rows],
            arrays["mask"][rows], guided_mask=arrays["guided_mask"][rows], entropy=arrays["entropy"][rows],
            policy_mask=selected[rows], normalizer=normalizer, guide_normalizer=guide_normalizer, parts=True,
            **options,
        )

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (full_loss, full_metrics), full_grad = grad_fn(arrays["logprobs"], slice(None), None, None)
    normalizer = grpo.loss_normalizer(loss_type, arrays["mask"], MAX_LEN, guided_mask=arrays["guided_mask"],
                                      guided=guided)
    guide_count = grpo.guide_token_count(arrays["mask"], arrays["guided_mask"])
    per_micro = B // num_micro_batches
    losses, metrics, grads = [], [], []
    for i in range(num_micro_batches):
        rows = slice(i * per_micro, (i + 1) * per_micro)
        (loss, m), g = grad_fn(arrays["logprobs"][rows], rows, normalizer, guide_count)
        losses.append(float(loss))
        metrics.append(m)
        grads.append(np.asarray(g))
    np.testing.assert_allclose(sum(losses), float(full_loss), rtol=0, atol=option_rounding(inputs, 0.02, 0.3))
    np.testing.assert_array_less(np.abs(np.concatenate(grads) - np.asarray(full_grad)),
                                 grad_rounding(inputs, 0.02, 0.3))
    full_metrics = partial_metrics.values(full_metrics)
    combined = grpo.combine_metrics(stack_parts(metrics))
    assert_option_metrics(combined, {key: float(value) for key, value in full_metrics.items()}, inputs)
    assert float(full_metrics["num_guided_tokens"]) > 0
    assert float(full_metrics["clip_ratio/dual"]) > 0 or loss_type == "sft"  # sft has no ratio
    # Why the selection is global: thresholds taken per micro-batch would pick other tokens.
    local = jnp.concatenate([
        grpo.high_entropy_mask(arrays["entropy"][i * per_micro:(i + 1) * per_micro],
                               loss_tokens[i * per_micro:(i + 1) * per_micro], 0.4)
        for i in range(num_micro_batches)
    ])
    assert np.any(np.asarray(local) != np.asarray(selected))


def test_objective_options_are_jittable():
    static = ("loss_type", "kl", "guided", "importance_level", "max_completion_length", "beta",
              "dual_clip_c", "kl_clamp", "entropy_coef", "guide_nll_coef")
    jitted = jax.jit(grpo.policy_loss, static_argnames=static)
    inputs = option_inputs(2)
    arrays = {key: jnp.asarray(value) for key, value in inputs.items()}
    selected = jax.jit(grpo.high_entropy_mask, static_argnames="top_fraction")(
        arrays["entropy"], arrays["mask"], top_fraction=0.5)
    np.testing.assert_array_equal(selected, high_entropy_mask_ref(inputs["entropy"], inputs["mask"], 0.5))
    options = dict(loss_type="dapo", kl="k3", guided="shaping", importance_level="token", beta=BETA,
                   max_completion_length=MAX_LEN, dual_clip_c=2.0, kl_clamp=0.05, entropy_coef=0.02,
                   guide_nll_coef=0.3, entropy=arrays["entropy"], policy_mask=selected)
    loss, metrics = call_policy_loss(jitted, inputs, normalizer=jnp.float32(40.0),
                                     guide_normalizer=jnp.float32(12.0), **options)
    eager_loss, eager_metrics = jax_loss(inputs, normalizer=40.0, guide_normalizer=12.0, **options)
    np.testing.assert_allclose(float(loss), float(eager_loss), rtol=0, atol=option_rounding(inputs, 0.02, 0.3))
    for key in grpo.METRIC_KEYS:
        np.testing.assert_allclose(float(metrics[key]), float(eager_metrics[key]), err_msg=key,
                                   **metric_rounding(inputs))


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda: jax_loss(INPUTS, dual_clip_c=1.0),
         r"dual_clip_c=1.0 is not valid; expected 0 \(off\) or a number > 1"),
        (lambda: jax_loss(INPUTS, dual_clip_c=-2.0), r"dual_clip_c=-2.0"),
        (lambda: jax_loss(INPUTS, kl_clamp=-0.1), r"kl_clamp=-0.1 is not valid"),
        (lambda: jax_loss(INPUTS, entropy_coef=-1.0), r"entropy_coef=-1.0 is not valid"),
        (lambda: jax_loss(INPUTS, entropy_coef=0.1), r"entropy_coef=0.1 needs the per-token entropy"),
        (lambda: jax_loss(INPUTS, guide_nll_coef=float("nan")), r"guide_nll_coef=nan is not valid"),
        (lambda: grpo.high_entropy_mask(jnp.ones((2, 3)), jnp.ones((2, 3)), 0.0), r"top_fraction=0.0.*\(0, 1\]"),
        (lambda: grpo.high_entropy_mask(jnp.ones((2, 3)), jnp.ones((2, 3)), 1.5), r"top_fraction=1.5"),
        (lambda: grpo.group_advantages(jnp.zeros(4), 2, baseline="pair"), r"baseline='pair'.*'group', 'guided_split'"),
        (lambda: grpo.group_advantages(jnp.zeros(4), 2, baseline="guided_split"), r"needs guided=.*got None"),
    ],
)
def test_bad_objective_options_raise_naming_value_and_options(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()



# ----------------------------------------------------------------------------- truncated importance sampling
# truncated_importance_weights, mismatch_metrics and policy_loss's tis_weights against
# tests/reference/grpo_numpy.py.

TIS_CAP = 2.0
F32_MAX = float(np.finfo(np.float32).max)


def tis_inputs(seed: int) -> dict[str, np.ndarray]:
    """`option_inputs` plus the sampler's log-probs: the old ones minus a per-row offset and token
    noise (weights on both sides of 1; rows on both sides of the cap at sequence level), a token
    far above the cap (e^3), a huge gap (sampler -1e30, whose exp would overflow), 0 on guide
    tokens (the loop's convention) but -inf on one, and NaN in padding: neither may reach a weight."""
    inputs = option_inputs(seed)
    rng = np.random.default_rng(200 + seed)
    old = inputs["old_logprobs"]
    drift = rng.normal(0.0, 0.25, (B, 1)) + rng.normal(0.0, 0.3, (B, T))
    sampler = (old - drift).astype(np.float32)
    sampler[0, 4] = old[0, 4] - 3.0  # row 0: guide tokens 0-2, sampled from 3 on
    sampler[6, 5] = -1e30  # row 6: guide tokens 0-3
    guide = (inputs["mask"] > 0) & (inputs["guided_mask"] > 0)
    sampler[guide] = 0.0
    sampler[2, 1] = -np.inf  # row 2 is all guide tokens
    sampler[inputs["mask"] == 0] = np.nan
    inputs["sampler_logprobs"] = sampler
    return inputs


def tis_units(inputs, level: str) -> list[tuple[list[tuple[int, int]], float, float]]:
    """The TIS units in float64: (their positions, exponent x = old - sampler or its row sum over
    sampled tokens, bound on x's float32 rounding). A difference of two float32 numbers is rounded
    once (eps/2 · |d|); a sum of n of them adds at most (n - 1) · eps · Σ|d| (recursive summation)."""
    old = inputs["old_logprobs"].astype(np.float64)
    sampler = inputs["sampler_logprobs"].astype(np.float64)
    sampled = (inputs["mask"] > 0) & ~(inputs["guided_mask"] > 0)
    units = []
    for b in range(B):
        cols = [t for t in range(T) if sampled[b, t]]
        drifts = [old[b, t] - sampler[b, t] for t in cols]
        if level == "token":
            units.extend(([(b, t)], d, F32_EPS * abs(d)) for t, d in zip(cols, drifts))
        elif cols:
            size = sum(abs(d) for d in drifts)
            units.append(([(b, t) for t in cols], sum(drifts), len(cols) * F32_EPS * size))
    return units


@pytest.mark.parametrize("level", grpo.IMPORTANCE_LEVELS)
def test_tis_inputs_exercise_the_cap_and_both_sides_of_one(level):
    for seed in SEEDS:
        units = tis_units(tis_inputs(seed), level)
        exponents = np.array([x for _, x, _ in units])
        assert (exponents < 0).any() and (0 < exponents).any()
        assert (exponents > np.log(TIS_CAP)).any() and (exponents < np.log(TIS_CAP)).any()
        # No exponent sits within 10 × its float32 rounding of log C: the cap decision is robust.
        assert all(abs(x - np.log(TIS_CAP)) > 10 * bound for _, x, bound in units)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("level", grpo.IMPORTANCE_LEVELS)
def test_tis_weights_match_reference(seed, level):
    """Truncated weights exactly C, guide tokens and padding exactly 1, the others within the
    float32 rounding of their exponent (absolute error δ of x gives relative error δ in exp(x))
    plus 4 eps for exp itself."""
    inputs = tis_inputs(seed)
    weights = np.asarray(grpo.truncated_importance_weights(
        inputs["old_logprobs"], inputs["sampler_logprobs"], inputs["mask"], inputs["guided_mask"],
        level=level, cap=TIS_CAP))
    expected = tis_weights_ref(inputs["old_logprobs"], inputs["sampler_logprobs"], inputs["mask"],
                               inputs["guided_mask"], level, TIS_CAP)
    assert weights.dtype == np.float32 and np.all(np.isfinite(weights))
    covered = np.zeros((B, T), bool)
    for positions, x, bound in tis_units(inputs, level):
        rows, cols = zip(*positions)
        covered[rows, cols] = True
        if x >= np.log(TIS_CAP):
            assert np.all(weights[rows, cols] == np.float32(TIS_CAP))
        else:
            np.testing.assert_allclose(weights[rows, cols], expected[rows, cols], rtol=bound + 4 * F32_EPS, atol=0)
    assert np.all(weights[~covered] == 1.0) and np.all(expected[~covered] == 1.0)  # guide tokens, padding
    if level == "sequence":  # one weight per row
        assert all(len(set(weights[b][covered[b]])) <= 1 for b in range(B))


@pytest.mark.parametrize("level", grpo.IMPORTANCE_LEVELS)
def test_tis_weights_survive_huge_gaps(level):
    """Gaps whose exp overflows float32 (1e30, float32's max, +inf) give exactly C, even with C at
    float32's max; a huge negative gap gives 0; the loss and its gradient stay finite."""
    old = jnp.array([[-0.1, -0.2, -0.3, -0.4], [-1e30, -0.2, -0.3, -0.4], [-0.1, -0.2, -0.3, -0.4]])
    sampler = jnp.array([[-1e30, -F32_MAX, -jnp.inf, -0.4], [-0.1, -0.2, -0.3, -0.4], [-0.1, -0.2, -0.3, -50.0]])
    mask = jnp.ones((3, 4))
    for cap in (TIS_CAP, 1e38, F32_MAX):
        weights = np.asarray(grpo.truncated_importance_weights(old, sampler, mask, level=level, cap=cap))
        c = np.float32(cap)
        if level == "token":
            np.testing.assert_array_equal(weights[0], [c, c, c, 1.0])
            np.testing.assert_array_equal(weights[1], [0.0, 1.0, 1.0, 1.0])
            assert weights[2, 3] == min(c, np.float32(np.exp(np.float32(49.6))))
        else:
            np.testing.assert_array_equal(weights[:2], [[c] * 4, [0.0] * 4])
            assert np.all(weights[2] == min(c, np.float32(np.exp(np.float32(49.6)))))
    weights = grpo.truncated_importance_weights(old, sampler, mask, level=level, cap=TIS_CAP)

    def loss_fn(logprobs):
        return grpo.policy_loss(logprobs, logprobs - 0.1, None, jnp.array([1.0, -1.0, 0.5]), mask, beta=0.0,
                                tis_weights=weights)[0]

    loss, grad = jax.value_and_grad(loss_fn)(jnp.full((3, 4), -1.0))
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))


def tis_weights_of(inputs, level):
    return grpo.truncated_importance_weights(inputs["old_logprobs"], inputs["sampler_logprobs"], inputs["mask"],
                                             inputs["guided_mask"], level=level, cap=TIS_CAP)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("level", grpo.IMPORTANCE_LEVELS)
@pytest.mark.parametrize("combo", COMBOS + [("sft", "token", "train")])
def test_policy_loss_with_tis_matches_reference(seed, level, combo):
    """The library's float32 weights, given to both sides (the weights are checked above): the
    weighted loss, metrics and gradient match the reference, all options on. The loss's rounding
    bound scales with the largest weight, C, since every policy term is multiplied by its weight."""
    inputs = tis_inputs(seed)
    weights = np.asarray(tis_weights_of(inputs, level))
    options = combo_options(combo, tis_weights=weights, entropy_coef=0.02, guide_nll_coef=0.3)
    (loss, metrics), (expected_loss, expected_metrics) = option_loss(inputs, **options)
    tolerance = TIS_CAP * option_rounding(inputs, 0.02, 0.3)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=0, atol=tolerance)
    assert_option_metrics(metrics, expected_metrics, inputs)
    unweighted, _ = ref_option_loss(inputs, **{**options, "tis_weights": None})
    assert abs(unweighted - expected_loss) > 10 * tolerance  # the check above would see missing weights
    assert_option_grad(inputs, options)


def test_tis_weights_scale_the_policy_term_only_and_carry_no_gradient():
    """With every advantage 0 the policy term vanishes (and for sft it is what remains): the KL,
    entropy and guide-NLL terms are then unchanged by any weights, value and gradient alike."""
    inputs = tis_inputs(0)
    inputs["advantages"][:] = 0.0
    weights = tis_weights_of(inputs, "token")
    options = dict(loss_type="dapo", beta=BETA, entropy_coef=0.02, guide_nll_coef=0.3,
                   entropy=jnp.asarray(inputs["entropy"]))

    def loss_fn(logprobs, tis_weights):
        return jax_loss({**inputs, "logprobs": logprobs}, tis_weights=tis_weights, **options)[0]

    lp = jnp.asarray(inputs["logprobs"])
    loss, (grad, weight_grad) = jax.value_and_grad(loss_fn, argnums=(0, 1))(lp, weights)
    plain, plain_grad = jax.value_and_grad(loss_fn)(lp, None)
    assert float(loss) == float(plain)
    np.testing.assert_array_equal(grad, plain_grad)
    assert np.all(np.asarray(weight_grad) == 0)  # stop_gradient: the weights are constants
    # sft: the weight scales -log p, the whole per-token NLL.
    sft, _ = jax_loss(inputs, loss_type="sft", beta=0.0, tis_weights=jnp.full((B, T), 3.0))
    sft_plain, _ = jax_loss(inputs, loss_type="sft", beta=0.0)
    assert float(sft) == pytest.approx(3 * float(sft_plain), rel=4 * F32_EPS)


def test_tis_off_reproduces_the_default_loss_bit_for_bit():
    """tis_weights None (the default) is the untouched code path; weights of exactly 1 multiply
    every policy term and its cotangent by 1.0, which is exact: same bits, eagerly (op by op)."""
    inputs = tis_inputs(1)
    arrays = {key: jnp.asarray(value) for key, value in inputs.items()}
    results = {}
    for name, extra in {"default": {}, "none": dict(tis_weights=None),
                        "ones": dict(tis_weights=jnp.ones((B, T)))}.items():
        def loss_fn(logprobs, extra=extra):
            return jax_loss({**inputs, "logprobs": logprobs}, beta=BETA, epsilon_high=0.28, **extra)

        (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(arrays["logprobs"])
        results[name] = (np.asarray(loss), {k: np.asarray(v) for k, v in metrics.items()}, np.asarray(grad))
    base_loss, base_metrics, base_grad = results["default"]
    for name in ("none", "ones"):
        loss, metrics, grad = results[name]
        assert loss.tobytes() == base_loss.tobytes(), name
        assert grad.tobytes() == base_grad.tobytes(), name
        assert all(metrics[key].tobytes() == base_metrics[key].tobytes() for key in grpo.METRIC_KEYS), name


def mismatch_rounding(inputs) -> dict:
    """Tolerances of the drift means over the n sampled tokens, for two float32 evaluations that
    may sum them in different orders: n · eps relative for sums of non-negative terms (|d|,
    weights), and n · eps · mean|d| absolute for the k1 mean, whose terms cancel. The huge gap of
    `tis_inputs` (1e30) makes |d| useless as a scale, so the inputs here leave it out."""
    sampled = (inputs["mask"] > 0) & ~(inputs["guided_mask"] > 0)
    drift = (inputs["old_logprobs"] - inputs["sampler_logprobs"]).astype(np.float64)[sampled]
    n = int(sampled.sum())
    return dict(rtol=n * F32_EPS, k1_atol=n * F32_EPS * float(np.abs(drift).mean()))


def drift_inputs(seed):
    """`tis_inputs` without the huge gap (mean drifts stay in a range float32 sums resolve)."""
    inputs = tis_inputs(seed)
    inputs["sampler_logprobs"][6, 5] = inputs["old_logprobs"][6, 5] - 0.5
    return inputs


def assert_mismatch_close(actual, expected, tolerance):
    assert set(actual) == set(expected)
    for key, value in expected.items():
        if key.startswith("mismatch/num_") or key == "mismatch/logprob_max_abs_diff":
            assert float(actual[key]) == pytest.approx(value, rel=F32_EPS, abs=0), key  # one rounding
        elif key == "mismatch/k1":
            np.testing.assert_allclose(float(actual[key]), value, rtol=0, atol=tolerance["k1_atol"], err_msg=key)
        else:
            np.testing.assert_allclose(float(actual[key]), value, rtol=tolerance["rtol"], atol=0, err_msg=key)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("level", grpo.TIS_LEVELS)
def test_mismatch_metrics_match_reference(seed, level):
    inputs = drift_inputs(seed)
    weights = None if level == "none" else tis_weights_of(inputs, level)
    metrics = grpo.mismatch_metrics(inputs["old_logprobs"], inputs["sampler_logprobs"], inputs["mask"],
                                    inputs["guided_mask"], tis_weights=weights, tis_level=level, tis_cap=TIS_CAP)
    expected = mismatch_metrics_ref(inputs["old_logprobs"], inputs["sampler_logprobs"], inputs["mask"],
                                    inputs["guided_mask"], None if weights is None else np.asarray(weights),
                                    level, TIS_CAP)
    assert_mismatch_close(metrics, expected, mismatch_rounding(inputs))
    keys = grpo.MISMATCH_KEYS + (() if level == "none" else grpo.TIS_KEYS)
    assert set(metrics) == set(keys)
    if level != "none":
        assert 0 < expected["mismatch/tis_clipped_fraction"] < 1
        sampled = (inputs["mask"] > 0) & ~(inputs["guided_mask"] > 0)
        units = sampled.sum() if level == "token" else sampled.any(axis=1).sum()  # tokens, or rows
        assert expected["mismatch/num_tis_units"] == units
    # The huge gap: the max reports it, the weights stay bounded.
    huge = tis_inputs(seed)
    metrics = grpo.mismatch_metrics(huge["old_logprobs"], huge["sampler_logprobs"], huge["mask"],
                                    huge["guided_mask"], tis_weights=tis_weights_of(huge, "token"), tis_cap=TIS_CAP)
    assert float(metrics["mismatch/logprob_max_abs_diff"]) == pytest.approx(1e30, rel=F32_EPS)
    assert float(metrics["mismatch/tis_weight_mean"]) <= TIS_CAP


@pytest.mark.parametrize("level", grpo.TIS_LEVELS)
@pytest.mark.parametrize("num_micro_batches", [2, 4])
def test_mismatch_metrics_combine_across_micro_batches(level, num_micro_batches):
    """Per-micro-batch metrics (loss and mismatch together) merged by `combine_metrics` equal the
    whole batch's: counts add, means re-weight by their counts, the max is the max."""
    inputs = drift_inputs(2)
    arrays = {key: jnp.asarray(value) for key, value in inputs.items()}

    def metrics_of(rows):
        weights = None if level == "none" else tis_weights_of({k: v[rows] for k, v in inputs.items()}, level)
        _, loss_metrics = grpo.policy_loss(arrays["logprobs"][rows], arrays["old_logprobs"][rows], None,
                                           arrays["advantages"][rows], arrays["mask"][rows],
                                           guided_mask=arrays["guided_mask"][rows], beta=0.0, tis_weights=weights,
                                           parts=True)
        drift = grpo.mismatch_metrics(arrays["old_logprobs"][rows], arrays["sampler_logprobs"][rows],
                                      arrays["mask"][rows], arrays["guided_mask"][rows], tis_weights=weights,
                                      tis_level=level, tis_cap=TIS_CAP, parts=True)
        return {**loss_metrics, **drift}

    full = partial_metrics.values(metrics_of(slice(None)))
    per_micro = B // num_micro_batches
    parts = [metrics_of(slice(i * per_micro, (i + 1) * per_micro)) for i in range(num_micro_batches)]
    combined = grpo.combine_metrics(stack_parts(parts))
    assert set(combined) == set(full) and set(grpo.METRIC_KEYS) <= set(full)
    tolerance = mismatch_rounding(inputs)
    assert_mismatch_close({k: v for k, v in combined.items() if k.startswith("mismatch/")},
                          {k: float(v) for k, v in full.items() if k.startswith("mismatch/")}, tolerance)
    if level != "none":
        assert 0 < float(full["mismatch/tis_clipped_fraction"]) < 1


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda: grpo.truncated_importance_weights(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)),
                                                   level="none"),
         r"level='none' is not valid; expected one of \('token', 'sequence'\)"),
        (lambda: grpo.truncated_importance_weights(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)), cap=0.0),
         r"cap=0.0 is not valid; expected a number > 0"),
        (lambda: grpo.truncated_importance_weights(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)),
                                                   cap=float("nan")), r"cap=nan is not valid"),
        (lambda: grpo.truncated_importance_weights(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)), cap=1e39),
         r"cap=1e\+39 is not valid.*float32"),
        (lambda: grpo.mismatch_metrics(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)),
                                       tis_weights=jnp.ones((2, 3)), tis_level="tokens"), r"level='tokens'"),
        (lambda: grpo.combine_metrics({"mismatch/k1": partial_metrics.Mean(jnp.zeros(2), jnp.zeros(3))}),
         r"leaves of one shape \[k\]; got shapes \[\(2,\), \(3,\)\]"),
        (lambda: jax_loss(INPUTS, tis_weights=jnp.ones((B, T + 1))), r"shape"),
    ],
)
def test_bad_tis_options_raise_naming_value_and_options(call, pattern):
    with pytest.raises((ValueError, AssertionError), match=pattern):
        call()

"""Rollout collection options: guide placement, the all-fail trigger, guide length units and dynamic
sampling with refill, each against a plain-Python re-derivation of what it must do."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from g2rpo_jax import data, guidance, models, rollout, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATA = os.path.join(REPO, "experiments", "data")
GROUP = 4


# ----------------------------------------------------------------------------- references


def reference_step_ends(ids, tokenizer, delimiter):
    """A step ends after token k when the decoded prefix ids[:k] holds more delimiters than ids[:k-1]
    (whole prefixes decoded: quadratic, but independent of the one-token-at-a-time bookkeeping)."""
    counts = [tokenizer.decode(list(ids[:k])).count(delimiter) for k in range(len(ids) + 1)]
    ends = [k for k in range(1, len(ids) + 1) if counts[k] > counts[k - 1]]
    return ends if ends and ends[-1] == len(ids) else ends + [len(ids)]


@pytest.fixture(scope="module")
def char_tokenizer():
    return models.load_tokenizer(os.path.join(DEMO_DATA, "addition_tokenizer"))


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return models.load_tokenizer(models.qwen3_tokenizer_dir())


def test_step_ends_match_prefix_decoding_char_level(char_tokenizer):
    examples = data.load_examples(os.path.join(DEMO_DATA, "addition_train.jsonl"), "math", limit=20)
    for example in examples:
        ids = data.encode_trajectory(example, char_tokenizer)
        ends = rollout.trajectory_step_ends(ids, char_tokenizer, ";")
        assert list(ends) == reference_step_ends(ids, char_tokenizer, ";")
        assert len(ends) == 5  # four columns and the boxed answer


@pytest.mark.parametrize("delimiter", ["\n\n", ". ", "\n"])
def test_step_ends_match_prefix_decoding_bpe(bpe_tokenizer, delimiter):
    # Byte-level BPE merges delimiters with neighbouring text ("\n\n" is one token, ".\n\n" another).
    text = ("First, 3 + 4 = 7.\n\nThen 7 * 2 = 14. So far 14.\n\n\nNext: x^2 = 196 gives x = 14.\n"
            "Finally $\\boxed{14}$. Done.")
    ids = bpe_tokenizer(text, add_special_tokens=False)["input_ids"]
    ends = rollout.trajectory_step_ends(ids, bpe_tokenizer, delimiter)
    assert list(ends) == reference_step_ends(ids, bpe_tokenizer, delimiter)
    assert len(ends) >= 3


def test_step_ends_refuse_an_empty_delimiter(char_tokenizer):
    with pytest.raises(ValueError, match="guidance.step_delimiter"):
        rollout.trajectory_step_ends([5, 6], char_tokenizer, "")


def test_guide_token_count_per_unit():
    step_ends = (11, 23, 36, 50, 63)
    for length in range(0, 70):
        assert rollout.guide_token_count("tokens", length, 63) == min(length, 63)
        if length <= 100:
            # percent: length/100 of 63 tokens, halves up, computed in exact integer arithmetic
            assert rollout.guide_token_count("percent", length, 63) == (2 * length * 63 + 100) // 200
    assert [rollout.guide_token_count("steps", n, 63, step_ends) for n in range(8)] == [0, 11, 23, 36, 50, 63, 63, 63]
    assert rollout.guide_token_count("percent", 100, 63) == 63
    assert rollout.guide_token_count("tokens", 5, 0) == 0
    with pytest.raises(ValueError, match="guidance.length_unit"):
        rollout.guide_token_count("words", 3, 10)


# ----------------------------------------------------------------------------- group rules


def test_group_rules_match_loops():
    rng = np.random.default_rng(0)
    accuracy = rng.choice([0.0, 0.0, 1.0, 0.5], size=(40, GROUP))
    accuracy[:5] = 0.0
    accuracy[5:9] = 1.0
    flat = accuracy.reshape(-1)
    assert rollout.all_fail_groups(flat, GROUP).tolist() == [all(a <= 0 for a in g) for g in accuracy]
    assert rollout.informative_groups(flat, GROUP).tolist() == [len(set(g)) > 1 for g in accuracy]


def test_fill_order_takes_informative_groups_first_in_sampling_order():
    informative = np.array([False, True, False, True, True, False])
    assert rollout.fill_order(informative, 2).tolist() == [1, 3]
    assert rollout.fill_order(informative, 4).tolist() == [1, 3, 4, 0]
    assert rollout.fill_order(informative, 6).tolist() == [1, 3, 4, 0, 2, 5]
    with pytest.raises(ValueError, match="fewer than the batch"):
        rollout.fill_order(informative, 7)


# ----------------------------------------------------------------------------- the collector


@pytest.fixture(scope="module")
def setup(tmp_path_factory, char_tokenizer):
    """A random-init tiny Qwen3 on the demo's tokenizer and 12 demo training problems."""
    path = str(tmp_path_factory.mktemp("rollout_model"))
    models.write_random_checkpoint(path, models.tiny_qwen3_for(char_tokenizer), seed=0,
                                   tokenizer_dir=os.path.join(DEMO_DATA, "addition_tokenizer"))
    model_cfg, params = models.load_hf(path, dtype="float32")
    tokenizer = models.load_tokenizer(path)
    examples = data.load_examples(os.path.join(DEMO_DATA, "addition_train.jsonl"), "math", limit=12)
    prepared = data.prepare_prompts(examples, tokenizer, template="plain", instruction="")
    return model_cfg, params, tokenizer, prepared


def collector_config(**guidance_options):
    cfg = ml_collections.ConfigDict()
    cfg.step = ml_collections.ConfigDict({"group_size": GROUP, "temperature": 1.0, "loss_type": "grpo",
                                         "shared_prompts": True})
    cfg.sampling = ml_collections.ConfigDict(
        {"max_new_tokens": 68, "top_p": 1.0, "top_k": 0, "dtype": "", "refill_rounds": 0})
    cfg.guidance = guidance.get_default_config()
    cfg.guidance.update({"alpha": 0.5, "initial_length": 24, "max_length": 50, **guidance_options})
    return cfg


def scorer_by_problem(correct_problems):
    """Accuracy 1 for every rollout of the listed problem ids, whatever the text: the groups the
    all-fail trigger must guide are then known in advance."""
    def score(texts, examples):
        accuracy = np.array([float(e.id in correct_problems) for e in examples], np.float32)
        return accuracy, {"accuracy": accuracy, "format": np.zeros_like(accuracy)}, {"timeouts": 0}
    return score


def test_completion_placement_forces_the_trajectory_prefix(setup):
    model_cfg, params, tokenizer, prepared = setup
    cfg = collector_config()
    collector = rollout.RolloutCollector(cfg, model_cfg, tokenizer, prepared, scorer_by_problem(set()))
    rows = [0, 1, 2]
    rollouts, info = collector.collect(params, rows, lambda r: [24] * len(r), jax.random.key(0), None)
    assert rollouts.guided.reshape(3, GROUP).sum(axis=1).tolist() == [2, 2, 2]  # α = ½ of G = 4
    for i in range(len(rollouts)):
        trajectory = prepared.trajectory_ids[rollouts.problem_ids[i]]
        assert rollouts.prompts[i] == tuple(prepared.prompt_ids[rollouts.problem_ids[i]])
        if rollouts.guided[i]:
            assert rollouts.tokens[i, :24].tolist() == list(trajectory[:24])
            assert rollouts.guided_mask[i].tolist() == [1] * 24 + [0] * 44
        else:
            assert not rollouts.guided_mask[i].any()
    assert "rollout/extra_rollouts" not in info["metrics"]  # options off: nothing new logged
    batch = rollout.to_batch(rollouts, data.pad_token_id(tokenizer))
    assert batch.guided.tolist() == rollouts.guided.astype(int).tolist()
    assert batch.problem_ids.tolist() == np.repeat(rows, GROUP).tolist()
    # A group's rollouts share their prompt, so the train step may run it once per group.
    assert rollout.shares_prompts(cfg)
    train_step.check_shared_prompts(batch, GROUP)
    cfg.step.loss_type = "sft"  # the SFT baseline's rows are different problems
    assert not rollout.shares_prompts(cfg)
    cfg.step.update(loss_type="grpo", shared_prompts=False)  # turned off by hand
    assert not rollout.shares_prompts(cfg)


def test_prompt_placement_appends_a_hint_that_is_never_a_target(setup):
    model_cfg, params, tokenizer, prepared = setup
    cfg = collector_config(placement="prompt", length_unit="steps", step_delimiter=";")
    collector = rollout.RolloutCollector(cfg, model_cfg, tokenizer, prepared, scorer_by_problem(set()))
    rollouts, _ = collector.collect(params, [3, 4], lambda r: [2] * len(r), jax.random.key(1), None)
    assert not rollouts.guided_mask.any()
    for i in range(len(rollouts)):
        problem = rollouts.problem_ids[i]
        prompt, trajectory = tuple(prepared.prompt_ids[problem]), prepared.trajectory_ids[problem]
        hint = trajectory[:rollout.trajectory_step_ends(trajectory, tokenizer, ";")[1]] if rollouts.guided[i] else ()
        assert rollouts.prompts[i] == prompt + tuple(hint)
        if rollouts.guided[i]:
            assert tokenizer.decode(hint).count(";") == 2 and tokenizer.decode(hint).endswith(";")
            # rewards read the hint and the continuation together
            sampled = rollouts.tokens[i, :rollouts.mask[i].sum()]
            assert rollouts.texts[i] == tokenizer.decode(list(hint) + sampled.tolist(), skip_special_tokens=True)
    batch = rollout.to_batch(rollouts, data.pad_token_id(tokenizer))
    assert batch.guided.sum() == GROUP  # half of two groups
    assert not batch.guided_mask.any()
    # The hint makes a guided row's prompt its own: the train step must run every row's prompt.
    assert rollout.prompt_sharing(cfg) == (False, "guidance.placement='prompt' gives guided rows a prompt of their own")
    with pytest.raises(ValueError, match="group 0: rows 0 and .* have different prompt_tokens"):
        train_step.check_shared_prompts(batch, GROUP)
    cfg.guidance.mode = "none"
    assert rollout.shares_prompts(cfg)


def test_all_fail_trigger_guides_only_failing_groups(setup):
    model_cfg, params, tokenizer, prepared = setup
    correct = {prepared.examples[r].id for r in (0, 2)}
    cfg = collector_config(trigger="all_fail")
    collector = rollout.RolloutCollector(cfg, model_cfg, tokenizer, prepared, scorer_by_problem(correct))
    rows = [0, 1, 2, 3]
    rollouts, info = collector.collect(params, rows, lambda r: [24] * len(r), jax.random.key(2), None)
    guided_per_group = rollouts.guided.reshape(4, GROUP).sum(axis=1).tolist()
    assert guided_per_group == [0, 2, 0, 2]  # only groups 1 and 3 failed without a guide
    assert info["metrics"]["rollout/extra_rollouts"] == 4.0
    # The re-sampled rollouts start with the guide; the kept unguided ones are those of the first
    # pass, identical to an unguided collection with the same key.
    plain = rollout.RolloutCollector(collector_config(alpha=0.0), model_cfg, tokenizer, prepared,
                                     scorer_by_problem(correct))
    first_pass, _ = plain.collect(params, rows, lambda r: [0] * len(r), jax.random.key(2), None)
    for i in range(len(rollouts)):
        if rollouts.guided[i]:
            trajectory = prepared.trajectory_ids[rollouts.problem_ids[i]]
            assert rollouts.tokens[i, :24].tolist() == list(trajectory[:24])
        else:
            assert rollouts.tokens[i].tolist() == first_pass.tokens[i].tolist()


def test_chunked_sampling_with_overlapped_scoring_equals_one_sampler_call(setup):
    """sampling.chunk_rows splits a round into sampler calls scored in a helper thread while the
    next chunk samples; each rollout keeps its noise (its position in the round), so the tokens
    are those of one call. Log-probs may differ by the rounding of a differently shaped batch:
    sums of O(1) float32 terms over a 64-wide model, far below 1e-5."""
    model_cfg, params, tokenizer, prepared = setup
    rows, key = [0, 1, 2, 3], jax.random.key(5)
    whole = rollout.RolloutCollector(collector_config(), model_cfg, tokenizer, prepared, scorer_by_problem({1}))
    expected, _ = whole.collect(params, rows, lambda r: [24] * len(r), key, None)
    cfg = collector_config()
    cfg.sampling.chunk_rows = 6  # 16 rollouts: chunks of 6, 6 and 4
    chunked = rollout.RolloutCollector(cfg, model_cfg, tokenizer, prepared, scorer_by_problem({1}),
                                       overlap_scoring=True)
    actual, _ = chunked.collect(params, rows, lambda r: [24] * len(r), key, None)
    for name in ("problem_ids", "guided", "tokens", "mask", "guided_mask", "rewards"):
        np.testing.assert_array_equal(getattr(actual, name), getattr(expected, name), err_msg=name)
    assert actual.texts == expected.texts and actual.prompts == expected.prompts
    np.testing.assert_allclose(actual.sampler_logprobs, expected.sampler_logprobs, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"sampling.chunk_rows=-1 is not valid"):
        cfg.sampling.chunk_rows = -1
        rollout.validate_options(cfg.guidance, cfg.sampling)


def test_refill_keeps_informative_groups_and_counts_the_extra_sampling(setup):
    model_cfg, params, tokenizer, prepared = setup
    ids = [e.id for e in prepared.examples]

    def mixed(texts, examples):  # groups of rows 1, 5 and 6 get a reward spread; all others none
        accuracy = np.array([float(e.id in {ids[1], ids[5], ids[6]} and k % 2 == 0)
                             for k, e in enumerate(examples)], np.float32)
        return accuracy, {"accuracy": accuracy, "format": np.ones_like(accuracy)}, {"timeouts": 0}

    batches = iter([[3, 4, 5], [6, 7, 8], [9, 10, 11]])
    cfg = collector_config(mode="none", alpha=0.0)
    cfg.sampling.refill_rounds = 2
    collector = rollout.RolloutCollector(cfg, model_cfg, tokenizer, prepared, mixed)
    rollouts, info = collector.collect(params, [0, 1, 2], lambda r: [0] * len(r), jax.random.key(3),
                                       lambda: next(batches))
    # Round 1 finds group 1, round 2 group 5, round 3 group 6: three informative groups, then stop.
    assert rollouts.problem_ids.reshape(3, GROUP)[:, 0].tolist() == [1, 5, 6]
    assert info["metrics"]["rollout/sampling_rounds"] == 3.0
    assert info["metrics"]["rollout/kept_group_share"] == pytest.approx(3 / 9)
    assert info["metrics"]["rollout/uninformative_groups_kept"] == 0.0
    assert info["metrics"]["rollout/extra_rollouts"] == 6 * GROUP
    assert next(batches) == [9, 10, 11]  # the third batch was never drawn


def test_refill_completes_the_batch_with_dropped_groups_when_rounds_run_out(setup):
    model_cfg, params, tokenizer, prepared = setup
    cfg = collector_config(mode="none", alpha=0.0)
    cfg.sampling.refill_rounds = 1
    collector = rollout.RolloutCollector(cfg, model_cfg, tokenizer, prepared, scorer_by_problem(set()))
    rollouts, info = collector.collect(params, [0, 1], lambda r: [0] * len(r), jax.random.key(4), lambda: [2, 3])
    assert rollouts.problem_ids.reshape(2, GROUP)[:, 0].tolist() == [0, 1]  # sampling order
    assert info["metrics"]["rollout/uninformative_groups_kept"] == 2.0
    assert info["metrics"]["rollout/extra_rollouts"] == 2 * GROUP


def test_rollouts_with_rows_replaces_in_place(setup):
    model_cfg, params, tokenizer, prepared = setup
    collector = rollout.RolloutCollector(collector_config(alpha=0.0), model_cfg, tokenizer, prepared,
                                         scorer_by_problem(set()))
    a = collector.sample(params, [0, 0, 1, 1], [[]] * 4, jax.random.key(5))
    b = collector.sample(params, [7, 8], [[]] * 2, jax.random.key(6))
    merged = a.with_rows([1, 3], b)
    assert merged.problem_ids.tolist() == [0, 7, 1, 8]
    assert merged.tokens[1].tolist() == b.tokens[0].tolist() and merged.tokens[2].tolist() == a.tokens[2].tolist()
    assert merged.texts == [a.texts[0], b.texts[0], a.texts[2], b.texts[1]]


@pytest.mark.parametrize("key,value,message", [
    ("placement", "hint", "guidance.placement"), ("trigger", "sometimes", "guidance.trigger"),
    ("length_unit", "words", "guidance.length_unit"), ("max_length", 150, "guidance.max_length"),
])
def test_option_errors_name_the_key(key, value, message):
    cfg = collector_config(length_unit="percent", max_length=100)
    cfg.guidance[key] = value
    with pytest.raises(ValueError, match=message):
        rollout.validate_options(cfg.guidance, cfg.sampling)


def test_sampling_option_errors_name_the_key():
    cfg = collector_config()
    cfg.sampling.refill_rounds = -1
    with pytest.raises(ValueError, match="sampling.refill_rounds"):
        rollout.validate_options(cfg.guidance, cfg.sampling)
    cfg.sampling.refill_rounds, cfg.sampling.dtype = 0, "float8"
    with pytest.raises(ValueError, match="sampling.dtype"):
        rollout.validate_options(cfg.guidance, cfg.sampling)
    cfg.sampling.dtype, cfg.guidance.length_unit, cfg.guidance.step_delimiter = "", "steps", ""
    with pytest.raises(ValueError, match="guidance.step_delimiter"):
        rollout.validate_options(cfg.guidance, cfg.sampling)

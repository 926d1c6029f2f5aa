"""The sampler against transformers' PyTorch Qwen3: greedy tokens, log-probs, sampling distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from g2rpo_jax import models, sampling, sharding
from tests.reference import hf_models

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17], [20], [3, 4, 5, 6, 7]]
GUIDES = [[], [30, 31, 32], [40], [50, 51, 52, 53, 54, 55]]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    path, torch_model = tiny_checkpoint
    cfg, params = models.load_hf(path)
    return cfg, params, torch_model


def hf_greedy(torch_model, ids, max_new_tokens, eos_id):
    with torch.no_grad():
        out = torch_model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=eos_id, pad_token_id=0)
    return out[0, len(ids):].tolist()


def hf_logprobs(torch_model, prompt, completion, temperature):
    """Teacher-forced log_softmax(logits / T) of each completion token under the PyTorch model."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = torch_model(ids).logits[0].double() / temperature
    logps = torch.log_softmax(logits, dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logps[positions, torch.tensor(completion)].numpy()


def logprob_rounding(cfg, logprobs) -> float:
    """How far two float32 computations of the same log-probs (other batch shape, program or
    sharding) may drift: a log-prob is a logit minus a log-sum-exp over V terms, each rounding
    relative to the logits' size, so about V · eps · (1 + max |log-prob|)."""
    return cfg.vocab_size * float(np.finfo(np.float32).eps) * (1.0 + float(np.abs(logprobs).max()))


def completion(out, i):
    return out.tokens[i, : out.lengths[i]].tolist()


def recording(fn, calls: list):
    """`fn`, appending the keyword arguments of each call to `calls`."""
    def wrapper(*args, **kwargs):
        calls.append(kwargs)
        return fn(*args, **kwargs)
    return wrapper


# Two rows with long guides and two short unguided prompts. The unguided rows are prefilled over
# their own 16-slot bucket instead of the guided rows' 32, and once the guided rows finish, the 16
# empty slots in front of the unguided rows leave the cache.
SPLIT_PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14, 15, 16, 17, 18, 19]]
SPLIT_GUIDES = [list(range(30, 50)), [], list(range(60, 78)), []]


def test_greedy_equals_transformers_generate_with_and_without_guides(tiny):
    cfg, params, torch_model = tiny
    budget = 10
    out = sampling.sample(cfg, params, PROMPTS, GUIDES, max_new_tokens=budget, top_k=1, eos_ids=(1,))
    for i, (prompt, guide) in enumerate(zip(PROMPTS, GUIDES)):
        expected = guide + hf_greedy(torch_model, prompt + guide, budget - len(guide), eos_id=1)
        assert completion(out, i) == expected, f"row {i}"
        np.testing.assert_array_equal(out.guided_mask[i], np.arange(budget) < len(guide))
    assert out.guided_mask.sum() == sum(len(g) for g in GUIDES)


def test_unguided_rows_skip_the_guides_padding_and_still_equal_transformers(tiny, monkeypatch):
    cfg, params, torch_model = tiny
    prefill_calls, resize_calls = [], []
    monkeypatch.setattr(sampling, "_prefill", recording(sampling._prefill, prefill_calls))
    monkeypatch.setattr(sampling, "_resize", recording(sampling._resize, resize_calls))
    budget = 24
    out = sampling.sample(cfg, params, SPLIT_PROMPTS, SPLIT_GUIDES, max_new_tokens=budget, top_k=1, eos_ids=(1,),
                          batch_multiple=2)
    assert prefill_calls[0]["unguided_len"] == 16 and prefill_calls[0]["cache_length"] == 32 + 6 - 1
    assert [call["drop_slots"] for call in resize_calls][:1] == [16]
    for i, (prompt, guide) in enumerate(zip(SPLIT_PROMPTS, SPLIT_GUIDES)):
        tokens = completion(out, i)
        assert tokens == guide + hf_greedy(torch_model, prompt + guide, budget - len(guide), eos_id=1), f"row {i}"
        np.testing.assert_allclose(out.logprobs[i, : len(tokens)], hf_logprobs(torch_model, prompt, tokens, 1.0),
                                   atol=1e-4)


def test_greedy_stops_at_eos_and_masks_the_rest(tiny):
    cfg, params, torch_model = tiny
    free = sampling.sample(cfg, params, PROMPTS[:1], max_new_tokens=12, top_k=1)
    eos = int(free.tokens[0, 3])  # a token greedy decoding is known to produce
    first = free.tokens[0].tolist().index(eos)
    out = sampling.sample(cfg, params, PROMPTS[:1], max_new_tokens=12, top_k=1, eos_ids=(eos, 250), pad_id=0)
    assert out.lengths[0] == first + 1
    assert completion(out, 0) == hf_greedy(torch_model, PROMPTS[0], 12, eos_id=eos)
    assert out.mask[0].tolist() == [1] * (first + 1) + [0] * (11 - first)
    assert (out.tokens[0, first + 1:] == 0).all() and (out.logprobs[0, first + 1:] == 0).all()


def test_guide_containing_eos_ends_the_row(tiny):
    cfg, params, _ = tiny
    out = sampling.sample(cfg, params, [[5, 6]], [[7, 1, 8]], max_new_tokens=6, top_k=1, eos_ids=(1,))
    assert completion(out, 0) == [7, 1]
    assert out.guided_mask[0].tolist() == [1, 1, 0, 0, 0, 0]


def test_logprobs_match_teacher_forced_pytorch(tiny):
    cfg, params, torch_model = tiny
    temperature = 0.7
    out = sampling.sample(cfg, params, PROMPTS, GUIDES, max_new_tokens=9, temperature=temperature,
                          rng=jax.random.key(3))
    for i, prompt in enumerate(PROMPTS):
        tokens = completion(out, i)
        np.testing.assert_allclose(out.logprobs[i, : len(tokens)], hf_logprobs(torch_model, prompt, tokens, temperature),
                                   atol=1e-4)
        assert out.logprobs[i, : len(tokens)].max() < 0


def test_unscored_guides_change_nothing_else(tiny):
    cfg, params, _ = tiny
    kwargs = dict(max_new_tokens=9, temperature=0.7, rng=jax.random.key(3))
    scored = sampling.sample(cfg, params, PROMPTS, GUIDES, **kwargs)
    unscored = sampling.sample(cfg, params, PROMPTS, GUIDES, score_guides=False, **kwargs)
    np.testing.assert_array_equal(scored.tokens, unscored.tokens)
    np.testing.assert_array_equal(scored.guided_mask, unscored.guided_mask)
    sampled = (scored.mask == 1) & (scored.guided_mask == 0)
    np.testing.assert_allclose(unscored.logprobs[sampled], scored.logprobs[sampled],
                               atol=logprob_rounding(cfg, scored.logprobs))
    assert (unscored.logprobs[scored.guided_mask == 1] == 0).all() and (scored.logprobs[scored.guided_mask == 1] < 0).all()


def test_same_rng_same_samples_and_rows_get_independent_noise(tiny):
    cfg, params, _ = tiny
    prompts = [[5, 6, 7]] * 8
    a = sampling.sample(cfg, params, prompts, max_new_tokens=6, rng=jax.random.key(1))
    b = sampling.sample(cfg, params, prompts, max_new_tokens=6, rng=jax.random.key(1))
    c = sampling.sample(cfg, params, prompts, max_new_tokens=6, rng=jax.random.key(2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert len({tuple(row) for row in a.tokens}) == 8  # identical prompts, different noise per row
    assert (a.tokens != c.tokens).any()


def test_batch_sizes_take_two_steps_per_octave():
    assert sampling.batch_sizes(64, 8) == [8, 16, 24, 32, 48, 64]
    assert sampling.batch_sizes(24, 8) == [8, 16, 24]  # 12 is no multiple of 8 (the mesh's batch shards)
    assert sampling._smaller_batch(np.arange(64) >= 48, 8) == 48  # a quarter of the rows finished
    assert sampling._smaller_batch(np.arange(64) >= 50, 8) == 64


@pytest.mark.parametrize("running", [3, 12])
def test_dropping_finished_rows_leaves_the_other_rows_unchanged(tiny, running):
    """Rows that finish early are dropped from the decode batch; the rows still running must come
    out exactly as they do in a batch where nothing finishes early (same rng, same row index)."""
    cfg, params, _ = tiny
    budget = 12
    prompts = [[5 + i, 6, 7] for i in range(16)]
    guides = [[]] * running + [[40] * budget] * (16 - running)  # a guide filling the budget ends the row
    kwargs = dict(max_new_tokens=budget, temperature=1.0, rng=jax.random.key(4), batch_multiple=4)
    mixed = sampling.sample(cfg, params, prompts, guides, **kwargs)
    alone = sampling.sample(cfg, params, prompts, **kwargs)
    # 16 rows decode as 4 when 3 run on, as 12 when 12 do.
    assert sampling._smaller_batch(np.arange(16) >= running, 4) == {3: 4, 12: 12}[running]
    np.testing.assert_array_equal(mixed.tokens[:running], alone.tokens[:running])
    np.testing.assert_allclose(mixed.logprobs[:running], alone.logprobs[:running],
                               atol=logprob_rounding(cfg, alone.logprobs[:running]))
    assert (mixed.tokens[running:] == 40).all() and (mixed.guided_mask[running:] == 1).all()


def grouped_batch(num_prompts: int, group_size: int, guided_per_group: int):
    """num_prompts × G rows, each group's rows adjacent and sharing its prompt; the first
    `guided_per_group` rows of a group share the group's guide (guides differ across groups)."""
    prompts, guides = [], []
    for p in range(num_prompts):
        prompt = [5 + p] + list(range(20, 20 + p % 5))
        guide = [60 + p] * (2 + p % 3)
        prompts += [prompt] * group_size
        guides += [guide if g < guided_per_group else [] for g in range(group_size)]
    return prompts, guides


def test_distinct_prefills_groups_rows_in_order_of_appearance():
    prefill = np.array([[0, 5], [0, 5], [1, 2], [0, 5], [1, 2]])
    representatives, source = sampling.distinct_prefills(prefill, np.array([1, 1, 0, 0, 0]))
    # Rows 0 and 1 share a prefill; row 3 has the same tokens but another guide length.
    np.testing.assert_array_equal(representatives, [0, 2, 3])
    np.testing.assert_array_equal(source, [0, 0, 1, 2, 1])


def test_shared_prefix_prefill_gives_the_same_samples_as_one_prefill_per_row(tiny, monkeypatch):
    """A group's rows share one prefill (and its guided rows one more); the tokens must be the same,
    bit for bit, as when every row is prefilled on its own, and the log-probs agree to rounding."""
    cfg, params, _ = tiny
    prompts, guides = grouped_batch(num_prompts=6, group_size=8, guided_per_group=2)
    kwargs = dict(max_new_tokens=10, temperature=1.0, eos_ids=(3, 4), rng=jax.random.key(9), first_row=5)
    prefill_rows = []

    def counting(*args, **kw):
        prefill_rows.append(args[2].shape[0])  # prefill_tokens [D, P]
        return prefill(*args, **kw)

    prefill = sampling._prefill
    monkeypatch.setattr(sampling, "_prefill", counting)
    shared = sampling.sample(cfg, params, prompts, guides, **kwargs)
    monkeypatch.setattr(sampling, "distinct_prefills", lambda rows, _: (np.arange(len(rows)), np.arange(len(rows))))
    per_row = sampling.sample(cfg, params, prompts, guides, **kwargs)
    assert prefill_rows == [16, 48]  # 12 distinct prompt + guide rows, bucketed to 16, against 48
    np.testing.assert_array_equal(shared.tokens, per_row.tokens)
    np.testing.assert_array_equal(shared.mask, per_row.mask)
    np.testing.assert_array_equal(shared.guided_mask, per_row.guided_mask)
    np.testing.assert_allclose(shared.logprobs, per_row.logprobs, atol=logprob_rounding(cfg, per_row.logprobs))
    assert len({tuple(row) for row in shared.tokens[:8]}) > 2  # rows of a group still draw their own noise


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A model with a 32-token vocabulary and peaked logits, so empirical frequencies are measurable."""
    path = str(tmp_path_factory.mktemp("small_vocab"))
    torch_model = hf_models.build_and_save(path, dict(hf_models.TINY, vocab_size=32), seed=5)
    cfg, params = models.load_hf(path)
    return cfg, params, torch_model


def next_token_probs(torch_model, prompt, temperature):
    with torch.no_grad():
        logits = torch_model(torch.tensor([prompt])).logits[0, -1].double() / temperature
    return torch.softmax(logits, dim=-1).numpy()


def draw(cfg, params, prompt, n, **kwargs):
    out = sampling.sample(cfg, params, [prompt] * n, max_new_tokens=1, batch_multiple=n, **kwargs)
    return out.tokens[:, 0]


def test_sample_frequencies_match_softmax_over_temperature(small_vocab):
    cfg, params, torch_model = small_vocab
    # At T = 0.5 this distribution has 14 tokens above 1%; an exact sampler exceeds TV 0.04 over
    # 4000 draws with probability 5e-4 (at T = 1.5, 10%: too flat for this bound).
    prompt, temperature, n = [3, 9, 27], 0.5, 4000
    tokens = draw(cfg, params, prompt, n, temperature=temperature, rng=jax.random.key(7))
    probs = next_token_probs(torch_model, prompt, temperature)
    empirical = np.bincount(tokens, minlength=cfg.vocab_size) / n
    total_variation = 0.5 * np.abs(empirical - probs).sum()
    assert total_variation < 0.04, total_variation
    assert probs.max() < 0.9 and (probs > 0.01).sum() > 5  # the test distribution is not degenerate


def test_top_k_and_top_p_stay_inside_their_support(small_vocab):
    cfg, params, torch_model = small_vocab
    prompt, n = [3, 9, 27], 4000
    probs = next_token_probs(torch_model, prompt, 1.0)
    order = np.argsort(-probs)

    top_k = draw(cfg, params, prompt, n, top_k=5, rng=jax.random.key(8))
    assert set(top_k) <= set(order[:5]) and len(set(top_k)) == 5

    top_p = 0.6
    mass_before = np.cumsum(probs[order]) - probs[order]
    nucleus = set(order[mass_before < top_p])
    drawn = draw(cfg, params, prompt, n, top_p=top_p, rng=jax.random.key(9))
    assert set(drawn) <= nucleus and len(set(drawn)) == len(nucleus)
    # Within the nucleus the draw follows the renormalised distribution.
    kept = np.array(sorted(nucleus))
    expected = probs[kept] / probs[kept].sum()
    empirical = np.array([(drawn == t).mean() for t in kept])
    assert 0.5 * np.abs(expected - empirical).sum() < 0.04


@pytest.mark.parametrize("top_k", [33, 64, 10**6])
def test_top_k_beyond_the_vocabulary_keeps_every_token(small_vocab, top_k):
    """Like transformers, a k larger than the vocabulary (32 here) is the whole vocabulary."""
    cfg, params, _ = small_vocab
    prompt, n = [3, 9, 27], 64
    whole = sampling.sample(cfg, params, [prompt] * n, max_new_tokens=2, top_k=cfg.vocab_size, batch_multiple=n,
                            rng=jax.random.key(4))
    beyond = sampling.sample(cfg, params, [prompt] * n, max_new_tokens=2, top_k=top_k, batch_multiple=n,
                             rng=jax.random.key(4))
    np.testing.assert_array_equal(beyond.tokens, whole.tokens)
    np.testing.assert_array_equal(beyond.logprobs, whole.logprobs)
    assert len(set(beyond.tokens[:, 0].tolist())) > 5  # really sampled, not greedy


def test_sharded_batch_gives_the_same_greedy_completions(tiny):
    cfg, params, _ = tiny
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    sharded_params = jax.device_put(params, sharding.tree_shardings(models.param_logical_axes(cfg), params, mesh))
    # 12 of 16 rows end in the prefill (their guide fills the budget): the sharded batch shrinks too.
    guides = [[]] * 4 + [[40] * 8] * 12
    single = sampling.sample(cfg, params, PROMPTS * 4, guides, max_new_tokens=8, top_k=1)
    sharded = sampling.sample(cfg, sharded_params, PROMPTS * 4, guides, max_new_tokens=8, top_k=1, mesh=mesh)
    np.testing.assert_array_equal(single.tokens, sharded.tokens)
    np.testing.assert_allclose(single.logprobs, sharded.logprobs, atol=logprob_rounding(cfg, single.logprobs))
    # Guided and unguided rows prefilled apart, then the empty slots in front dropped from the cache.
    single = sampling.sample(cfg, params, SPLIT_PROMPTS * 4, SPLIT_GUIDES * 4, max_new_tokens=24, top_k=1)
    sharded = sampling.sample(cfg, sharded_params, SPLIT_PROMPTS * 4, SPLIT_GUIDES * 4, max_new_tokens=24, top_k=1,
                              mesh=mesh)
    np.testing.assert_array_equal(single.tokens, sharded.tokens)
    np.testing.assert_allclose(single.logprobs, sharded.logprobs, atol=logprob_rounding(cfg, single.logprobs))
    # The config's mesh.rules decide the rows' mesh axes (here the batch on 'tensor' alone).
    rules = (("batch", "tensor"),) + tuple(rule for rule in sharding.DEFAULT_RULES if rule[0] != "batch")
    by_rules = sampling.sample(cfg, sharded_params, SPLIT_PROMPTS * 4, SPLIT_GUIDES * 4, max_new_tokens=24, top_k=1,
                               mesh=mesh, rules=rules)
    np.testing.assert_array_equal(single.tokens, by_rules.tokens)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(guides=[[1] * 9]), r"guides\[0\] has 9 tokens but max_new_tokens=8"),
        (dict(temperature=0.0), r"temperature=0.0 must be > 0"),
        (dict(top_p=1.5), r"top_p=1.5"),
        (dict(top_k=-1), r"top_k=-1"),
        (dict(prompts=[[]]), r"prompts\[0\] is empty"),
        (dict(temperature=-1.0), r"temperature=-1.0 must be > 0"),
        (dict(temperature=float("nan")), r"temperature=nan must be > 0 and finite"),
        (dict(temperature=float("inf")), r"temperature=inf must be > 0 and finite"),
        (dict(top_p=0.0), r"top_p=0.0 is not valid; valid: a number in \(0, 1\]"),
        (dict(top_p=float("nan")), r"top_p=nan is not valid"),
        (dict(top_k=2.5), r"top_k=2.5 is not valid; valid: an integer >= 0"),
        (dict(max_new_tokens=0), r"max_new_tokens=0 is not valid; valid: an integer >= 1"),
        (dict(max_new_tokens=4.0), r"max_new_tokens=4.0 is not valid"),
        # Token ids outside the 256-token vocabulary: clamped by the gather or never met as EOS.
        (dict(eos_ids=(256,)), r"eos_ids holds token id 256; valid: integers in \[0, vocab_size=256\)"),
        (dict(eos_ids=(1, -1)), r"eos_ids holds token id -1"),
        (dict(pad_id=300), r"pad_id holds token id 300"),
        (dict(prompts=[[5, 256]]), r"prompts\[0\] holds token id 256"),
        (dict(guides=[[1, -3]]), r"guides\[0\] holds token id -3"),
    ],
)
def test_bad_arguments_are_named(tiny, kwargs, message):
    cfg, params, _ = tiny
    kwargs = dict(dict(prompts=[[5, 6]], max_new_tokens=8), **kwargs)
    with pytest.raises(ValueError, match=message):
        sampling.sample(cfg, params, **kwargs)


def test_buckets_bound_the_number_of_programs():
    assert [sampling.bucket_length(n) for n in (1, 16, 17, 100, 129)] == [16, 16, 32, 128, 256]
    assert sampling.round_up(13, 8) == 16


def test_decode_phases_end_at_the_budget_and_never_repeat():
    assert sampling.decode_phase_ends(128) == [32, 64, 96, 128]
    assert sampling.decode_phase_ends(10) == [3, 5, 8, 10]
    assert sampling.decode_phase_ends(2) == [1, 2]
    assert sampling.decode_phase_ends(1) == [1]


def test_sample_cli_marks_the_guided_part(tmp_path, capsys):
    from g2rpo_jax import sample as sample_cli

    cfg = models.TINY_QWEN3.replace(num_layers=1)
    models.write_random_checkpoint(str(tmp_path), cfg)
    status = sample_cli.main(["--checkpoint", str(tmp_path), "--prompt", "What is 3*7?", "--guide", "We multiply",
                              "--num_samples", "2", "--max_new_tokens", "6", "--top_k", "1"])
    printed = capsys.readouterr().out
    assert status == 0
    assert printed.count("=== sample") == 2
    assert printed.count("«We multiply»") == 2  # the forced text comes back verbatim, marked
    assert "(2 guided)" in printed  # "We multiply" is two Qwen3 tokens


def test_two_level_inverse_cdf_matches_the_distribution_across_blocks():
    rng = np.random.RandomState(0)
    scores = rng.normal(size=300).astype(np.float32) * 2  # spans three 128-entry blocks, the last one padded
    scores[rng.rand(300) < 0.5] = -np.inf  # masked entries must never be drawn
    n = 20000
    uniforms = np.concatenate([[0.0, 1 - 1e-7], jax.random.uniform(jax.random.key(4), (n - 2,))])
    drawn = np.asarray(sampling.inverse_cdf_choice(jnp.tile(jnp.asarray(scores), (n, 1)), jnp.asarray(uniforms)))
    assert np.isfinite(scores[drawn]).all()
    probs = np.exp(scores - scores[np.isfinite(scores)].max())
    probs /= probs.sum()
    empirical = np.bincount(drawn, minlength=300) / n
    assert 0.5 * np.abs(empirical - probs).sum() < 0.03
    ties = jnp.asarray([[1.0, 3.0, 3.0, -2.0]])
    assert int(sampling.first_argmax(ties)[0]) == 1

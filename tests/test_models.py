"""Qwen3 in Flax against transformers' PyTorch Qwen3ForCausalLM, plus checkpoint I/O, KV cache and sharding.
The other families (Qwen2, Llama 3) are covered in test_model_families.py."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from transformers import Qwen3ForCausalLM

from g2rpo_jax import models, sharding
from g2rpo_jax.models import rope
from tests.reference import hf_models


def relative_error(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())


def logit_rounding(cfg, logits) -> float:
    """How far two float32 computations of the same logits (other padding, cache layout or
    sharding, hence other summation orders) may drift: n · eps · max |logit|, n the longest
    contraction feeding them (the MLP width)."""
    return cfg.intermediate_size * float(np.finfo(np.float32).eps) * float(np.abs(logits).max())


def random_tokens(vocab: int, shape, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("variant", sorted(hf_models.VARIANTS))
def test_logits_match_transformers_f32(variant, tmp_path):
    settings = hf_models.VARIANTS[variant]
    torch_model = hf_models.build_and_save(str(tmp_path), settings)
    cfg, params = models.load_hf(str(tmp_path), dtype=jnp.float32)
    assert cfg.tie_word_embeddings == settings["tie_word_embeddings"]
    assert ("lm_head" in params) != cfg.tie_word_embeddings
    tokens = random_tokens(cfg.vocab_size, (2, 17))
    ours = models.forward(cfg, params, jnp.asarray(tokens))
    assert ours.shape == (2, 17, cfg.vocab_size)
    assert relative_error(ours, hf_models.torch_logits(torch_model, tokens)) < 1e-4


def test_logits_bf16_within_bf16_tolerance(tiny_checkpoint):
    path, torch_model = tiny_checkpoint
    cfg, params = models.load_hf(path, dtype=jnp.bfloat16)
    assert params["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    tokens = random_tokens(cfg.vocab_size, (2, 12), seed=1)
    error = relative_error(models.forward(cfg, params, jnp.asarray(tokens)), hf_models.torch_logits(torch_model, tokens))
    # bf16 keeps 8 mantissa bits; two layers of rounding stay within a few percent of max |logit|.
    assert error < 3e-2
    assert error > 1e-6  # it really ran in bf16


@pytest.mark.parametrize("max_shard_bytes", [4 << 30, 40_000])
def test_save_hf_loads_in_transformers(tiny_checkpoint, tmp_path, max_shard_bytes):
    path, torch_model = tiny_checkpoint
    cfg, params = models.load_hf(path)
    out = str(tmp_path / "saved")
    models.save_hf(out, cfg, params, max_shard_bytes=max_shard_bytes)
    sharded = os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert sharded == (max_shard_bytes < 4 << 30)
    reloaded = Qwen3ForCausalLM.from_pretrained(out).eval()
    tokens = random_tokens(cfg.vocab_size, (2, 9), seed=2)
    np.testing.assert_allclose(
        hf_models.torch_logits(reloaded, tokens), hf_models.torch_logits(torch_model, tokens), atol=1e-5, rtol=0
    )
    # ...and our own loader reads the (possibly sharded) directory back bit for bit.
    cfg2, params2 = models.load_hf(out)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_save_hf_bf16_roundtrip(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    cfg, params = models.load_hf(path)
    models.save_hf(str(tmp_path), cfg, params, dtype="bfloat16")
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    reloaded = Qwen3ForCausalLM.from_pretrained(str(tmp_path))
    assert str(reloaded.model.embed_tokens.weight.dtype) == "torch.bfloat16"
    _, params_bf16 = models.load_hf(str(tmp_path), dtype="bfloat16")
    expected = np.asarray(params["embedding"]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(params_bf16["embedding"]), expected)


def left_pad(rows, pad_id=0):
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    valid = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):] = row
        valid[i, width - len(row):] = True
    return tokens, valid


def test_left_padded_forward_matches_unpadded_rows(tiny_checkpoint):
    path, _ = tiny_checkpoint
    cfg, params = models.load_hf(path)
    rows = [list(random_tokens(cfg.vocab_size, (n,), seed=n)) for n in (3, 8, 5)]
    tokens, valid = left_pad(rows)
    padded = np.asarray(models.forward(cfg, params, jnp.asarray(tokens), jnp.asarray(valid)))
    for i, row in enumerate(rows):
        alone = np.asarray(models.forward(cfg, params, jnp.asarray([row])))[0]
        np.testing.assert_allclose(padded[i, -len(row):], alone, atol=logit_rounding(cfg, alone))


def assert_cache_decoding_matches_forward(cfg, params, prompt_lengths=(2, 6, 4), decode_steps=5):
    """Prefill into a cache whose first two slots stay empty, then decode one token at a time,
    dropping those slots and growing the cache half-way, as the sampler does; every step's logits
    equal the full forward's at that position."""
    batch = len(prompt_lengths)
    prompts = [list(random_tokens(cfg.vocab_size, (n,), seed=10 + n)) for n in prompt_lengths]
    continuation = random_tokens(cfg.vocab_size, (batch, decode_steps), seed=99)
    tokens, valid = left_pad(prompts)
    cache = models.init_cache(cfg, batch=batch, length=tokens.shape[1] + 4, start_slot=2)
    extend = jax.jit(lambda p, t, v, c: models.extend_cache(cfg, p, t, v, c))
    hidden, cache = extend(params, jnp.asarray(tokens), jnp.asarray(valid), cache)
    step_logits = [models.logits_from_hidden(cfg, params, hidden[:, -1])]
    for step in range(decode_steps):
        if step == 2:
            cache = models.drop_leading_slots(cache, 2)
            cache = models.grow_cache(cache, tokens.shape[1] + decode_steps + 3)
        hidden, cache = extend(params, jnp.asarray(continuation[:, step:step + 1]), jnp.ones((batch, 1), bool), cache)
        step_logits.append(models.logits_from_hidden(cfg, params, hidden[:, -1]))
    step_logits = np.stack([np.asarray(x) for x in step_logits], axis=1)  # [B, steps + 1, V]
    forward = jax.jit(lambda p, t: models.forward(cfg, p, t))
    for i, prompt in enumerate(prompts):
        full = np.asarray(forward(params, jnp.asarray([prompt + list(continuation[i])])))[0]
        expected = full[len(prompt) - 1:]
        np.testing.assert_allclose(step_logits[i], expected, atol=logit_rounding(cfg, expected))


def test_kv_cache_decoding_matches_full_forward(tiny_checkpoint):
    path, _ = tiny_checkpoint
    cfg, params = models.load_hf(path)
    assert_cache_decoding_matches_forward(cfg, params)


def test_shared_prompt_hidden_states_match_each_rows_forward(tiny_checkpoint):
    """Two left-padded prompts, three continuations each (the last ones shorter, right-padded):
    every real position's logits equal the plain forward over that row's prompt + continuation."""
    path, _ = tiny_checkpoint
    cfg, params = models.load_hf(path)
    prompts = [list(random_tokens(cfg.vocab_size, (n,), seed=20 + n)) for n in (3, 6)]
    prompt_tokens, prompt_valid = left_pad(prompts)
    continuation = random_tokens(cfg.vocab_size, (6, 5), seed=7)
    lengths = np.array([5, 4, 2, 5, 1, 3])
    valid = np.arange(5)[None] < lengths[:, None]
    prompt_hidden, hidden = jax.jit(functools.partial(models.shared_prompt_hidden_states, cfg))(
        params, jnp.asarray(prompt_tokens), jnp.asarray(prompt_valid), jnp.asarray(continuation * valid),
        jnp.asarray(valid))
    assert prompt_hidden.shape[:2] == (2, 6) and hidden.shape[:2] == (6, 5)
    for row in range(6):
        prompt = prompts[row // 3]
        full = np.asarray(models.forward(cfg, params, jnp.asarray([prompt + list(continuation[row, :lengths[row]])])))[0]
        ours = np.asarray(models.logits_from_hidden(cfg, params, hidden[row, :lengths[row]]))
        np.testing.assert_allclose(ours, full[len(prompt):], atol=logit_rounding(cfg, full))
        if row % 3 == 0:
            prompt_logits = np.asarray(models.logits_from_hidden(cfg, params, prompt_hidden[row // 3, -len(prompt):]))
            np.testing.assert_allclose(prompt_logits, full[:len(prompt)], atol=logit_rounding(cfg, full))
    with pytest.raises(ValueError, match="5 continuation rows do not split into equal groups for 2 prompts"):
        models.shared_prompt_hidden_states(cfg, params, jnp.asarray(prompt_tokens), jnp.asarray(prompt_valid),
                                           jnp.asarray(continuation[:5]), jnp.asarray(valid[:5]))


def test_cache_refuses_to_shrink_or_drop_too_much(tiny_checkpoint):
    path, _ = tiny_checkpoint
    cfg, _ = models.load_hf(path)
    cache = models.init_cache(cfg, batch=1, length=8)
    assert models.grow_cache(cache, 8) is cache
    assert models.grow_cache(cache, 12).valid.shape == (1, 12)
    with pytest.raises(ValueError, match="cannot shrink a cache of 8 slots to 4"):
        models.grow_cache(cache, 4)
    assert models.drop_leading_slots(cache, 3).valid.shape == (1, 5)
    with pytest.raises(ValueError, match="cannot drop 9 slots of a cache of 8"):
        models.drop_leading_slots(cache, 9)


def test_sharded_forward_equals_single_device(tiny_checkpoint):
    assert jax.device_count() >= 8, "conftest sets --xla_force_host_platform_device_count=8"
    path, _ = tiny_checkpoint
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    cfg, sharded_params = models.load_hf(path, mesh=mesh)
    cfg, params = models.load_hf(path)
    gate = sharded_params["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert gate.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert sharded_params["embedding"].sharding.spec == PartitionSpec("tensor", "fsdp")
    assert gate.addressable_shards[0].data.shape == (32, 64)  # really split (64x128 over 2x2), not replicated
    tokens = jax.device_put(jnp.asarray(random_tokens(cfg.vocab_size, (4, 11), seed=3)), sharding.batch_sharding(mesh, 2))
    sharded = jax.jit(lambda p, t: models.forward(cfg, p, t))(sharded_params, tokens)
    single = models.forward(cfg, params, np.asarray(tokens))
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=logit_rounding(cfg, single))


def test_logical_axes_cover_every_parameter(tiny_checkpoint):
    path, _ = tiny_checkpoint
    cfg, params = models.load_hf(path)
    specs = models.param_logical_axes(cfg)
    flat_params = jax.tree_util.tree_leaves_with_path(params)
    flat_specs = dict(jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)))
    for key, value in flat_params:
        assert len(flat_specs[key]) == value.ndim, key


def test_rejects_other_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match=r"MistralForCausalLM.*supported.*Qwen3ForCausalLM"):
        models.load_hf(str(tmp_path))


def test_reports_missing_and_misshapen_tensors(tiny_checkpoint, tmp_path):
    from g2rpo_jax.models import safetensors_io

    path, _ = tiny_checkpoint
    source = safetensors_io.SafetensorsFile(os.path.join(path, "model.safetensors"))
    tensors = {k: np.array(source.tensor(k)) for k in source.keys()}
    with open(os.path.join(path, "config.json")) as f:
        config_text = f.read()
    (tmp_path / "config.json").write_text(config_text)

    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    safetensors_io.write(str(tmp_path / "model.safetensors"), missing)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        models.load_hf(str(tmp_path))

    misshapen = dict(tensors, **{"model.norm.weight": np.ones(7, np.float32)})
    safetensors_io.write(str(tmp_path / "model.safetensors"), misshapen)
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(7,\).*\(64,\)"):
        models.load_hf(str(tmp_path))


def test_rejects_unsupported_dtype(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"float16.*bfloat16.*float32"):
        models.load_hf(tiny_checkpoint[0], dtype=jnp.float16)


def test_rope_theta_from_old_style_config(tiny_checkpoint):
    with open(os.path.join(tiny_checkpoint[0], "config.json")) as f:
        hf = json.load(f)
    hf.pop("rope_parameters")
    hf["rope_theta"] = 5e5
    assert models.config_from_hf(hf).rope_theta == 5e5


def test_real_qwen3_tokenizer_special_tokens():
    tokenizer = models.load_tokenizer(models.qwen3_tokenizer_dir())
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151643
    assert tokenizer.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668]
    messages = [{"role": "user", "content": "What is 1+1?"}]
    thinking_off = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 enable_thinking=False)
    thinking_on = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert thinking_on.endswith("<|im_start|>assistant\n")
    assert thinking_off == thinking_on + "<think>\n\n</think>\n\n"
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids[0] == 151644 and isinstance(ids[0], int)  # <|im_start|>


def test_tokenizer_loads_from_checkpoint_directory(tiny_checkpoint, tmp_path):
    tokenizer = models.load_tokenizer(models.qwen3_tokenizer_dir())
    tokenizer.save_pretrained(str(tmp_path))
    again = models.load_tokenizer(str(tmp_path))
    assert again.encode("\\boxed{42}") == tokenizer.encode("\\boxed{42}")
    with pytest.raises(ValueError, match="tokenizer"):
        models.load_tokenizer(str(tmp_path / "nowhere"))


def test_rope_matches_closed_form():
    positions = jnp.asarray([[0, 3]])
    sin, cos = rope.rope_tables(positions, rope.inverse_frequencies(head_dim=4, theta=100.0))
    freqs = 1.0 / 100.0 ** (np.arange(0, 4, 2) / 4)
    np.testing.assert_allclose(np.asarray(sin)[0, 1], np.sin(3 * freqs), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(cos)[0, 1], np.cos(3 * freqs), rtol=1e-6)


def test_random_checkpoint_with_tokenizer_loads_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    cfg = models.TINY_QWEN3.replace(num_layers=1)
    models.write_random_checkpoint(str(tmp_path), cfg, seed=1)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tokenizer.eos_token_id == cfg.eos_token_id
    loaded_cfg, params = models.load_hf(str(tmp_path))
    assert loaded_cfg == cfg
    reference = Qwen3ForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens = np.asarray([tokenizer.encode("What is 1+1? \\boxed{2}")], np.int32)
    expected = hf_models.torch_logits(reference, tokens)
    assert relative_error(models.forward(cfg, params, jnp.asarray(tokens)), expected) < 1e-4

"""Qwen2 / Qwen2.5 and Llama 3 through the one decoder: logits against transformers' PyTorch models,
checkpoint round trips, KV-cache decoding, refused architectures, and the sample CLI and a short
demo-preset training run on a random-init checkpoint of each family."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from g2rpo_jax import models, train
from g2rpo_jax.models import rope, safetensors_io
from tests.reference import hf_models
from tests.test_models import assert_cache_decoding_matches_forward, random_tokens, relative_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAR_TOKENIZER = os.path.join(REPO, "experiments", "data", "addition_tokenizer")  # the demo's 98 characters

# Small models covering what differs between the families. Llama: explicit head_dim != hidden/heads,
# GQA 4, and llama3 RoPE scaling with a 32-token original context, so that 6 of the 8 rotary
# frequencies are rescaled (wavelengths 6.3 kept, 20 blended, >= 63 divided by the factor) and the
# 80-token inputs below reach well past it.
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, eos_token_id=1, pad_token_id=0)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=1e4, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)
REFERENCES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(BASE, rope_parameters=dict(rope_type="default", rope_theta=1e4))),
    "qwen2_tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                   dict(BASE, tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(BASE, num_attention_heads=8, head_dim=16, rope_parameters=LLAMA3_ROPE, bos_token_id=2)),
    "llama3_biases": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                      dict(BASE, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                           rope_parameters=LLAMA3_ROPE, bos_token_id=2)),
    # Qwen3's attention_bias puts biases on o_proj as well as q/k/v (no released checkpoint sets it).
    "qwen3_biases": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                     dict(BASE, attention_bias=True, rope_parameters=dict(rope_type="default", rope_theta=1e4))),
}
# name -> (architecture, qk_norm, qkv_bias, o_proj_bias, mlp_bias) as loaded.
EXPECTED = {
    "qwen2": ("Qwen2ForCausalLM", False, True, False, False),
    "qwen2_tied": ("Qwen2ForCausalLM", False, True, False, False),
    "llama3": ("LlamaForCausalLM", False, False, False, False),
    "llama3_biases": ("LlamaForCausalLM", False, True, True, True),
    "qwen3_biases": ("Qwen3ForCausalLM", True, True, True, False),
}


def build_reference(name: str, seed: int = 0):
    """A random-init transformers model of family `name`, weights scaled as in hf_models.build so the
    logits are O(1); biases get their own noise so a dropped bias shows."""
    config_cls, model_cls, settings = REFERENCES[name]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**settings)).eval()
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if param_name.endswith(".bias"):
                p.normal_(0.0, 0.3)
            elif p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model


@pytest.fixture(scope="module", params=sorted(REFERENCES))
def reference_checkpoint(request, tmp_path_factory):
    """(name, directory saved by transformers, torch model) for each reference family."""
    path = str(tmp_path_factory.mktemp(request.param))
    model = build_reference(request.param)
    model.save_pretrained(path)
    return request.param, path, model


def test_logits_match_transformers_f32(reference_checkpoint):
    """Both sides in float32 differ only in summation order: about n·eps relative per matmul with
    n <= 128 (the MLP width), so ~1e-5 through two layers; 1e-4 leaves room without hiding a wrong
    bias, norm or frequency (each of those moves the logits by O(1e-1))."""
    name, path, torch_model = reference_checkpoint
    cfg, params = models.load_hf(path, dtype=jnp.float32)
    assert (cfg.architecture, cfg.qk_norm, cfg.qkv_bias, cfg.o_proj_bias, cfg.mlp_bias) == EXPECTED[name]
    attention, mlp = params["layers_0"]["self_attn"], params["layers_0"]["mlp"]
    assert ("q_norm" in attention, "bias" in attention["q_proj"], "bias" in attention["o_proj"],
            "bias" in mlp["up_proj"]) == EXPECTED[name][1:]
    specs = dict(jax.tree_util.tree_leaves_with_path(models.param_logical_axes(cfg),
                                                     is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    assert all(len(specs[key]) == value.ndim for key, value in jax.tree_util.tree_leaves_with_path(params))
    tokens = random_tokens(cfg.vocab_size, (2, 80), seed=4)
    ours = models.forward(cfg, params, jnp.asarray(tokens))
    assert relative_error(ours, hf_models.torch_logits(torch_model, tokens)) < 1e-4


def test_llama3_rope_scaling_matters_and_matches_transformers(tmp_path):
    torch_model = build_reference("llama3")
    config = torch_model.config
    reference, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    scaling = models.Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=32)
    ours = np.asarray(rope.inverse_frequencies(16, 1e4, scaling))
    np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-6)
    plain = np.asarray(rope.inverse_frequencies(16, 1e4))
    assert ours[0] == plain[0] and 0.125 * plain[1] < ours[1] < plain[1]  # kept, then blended
    np.testing.assert_allclose(ours[2:], plain[2:] / 8, rtol=1e-6)  # stretched by the factor
    # Through the model: without the scaling the logits of the same weights move far beyond rounding.
    torch_model.save_pretrained(str(tmp_path))
    cfg, params = models.load_hf(str(tmp_path))
    tokens = jnp.asarray(random_tokens(cfg.vocab_size, (1, 80), seed=5))
    scaled = models.forward(cfg, params, tokens)
    unscaled = models.forward(cfg.replace(rope_scaling=None), params, tokens)
    assert relative_error(unscaled, np.asarray(scaled)) > 1e-2


def saved_tensor_names(path: str) -> set:
    names = set()
    for file in os.listdir(path):
        if file.endswith(".safetensors"):
            names |= set(safetensors_io.SafetensorsFile(os.path.join(path, file)).keys())
    return names


def test_save_hf_round_trips_through_transformers(reference_checkpoint, tmp_path):
    """Same tensor names as transformers writes, loadable by its class for the family, and read back
    bit for bit (sharded into several files, as large checkpoints are)."""
    name, path, torch_model = reference_checkpoint
    cfg, params = models.load_hf(path)
    out = str(tmp_path / "saved")
    models.save_hf(out, cfg, params, max_shard_bytes=40_000)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert saved_tensor_names(out) == saved_tensor_names(path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == EXPECTED[name][0]
    assert reloaded.config.rope_parameters == torch_model.config.rope_parameters
    tokens = random_tokens(cfg.vocab_size, (2, 40), seed=2)
    np.testing.assert_allclose(
        hf_models.torch_logits(reloaded, tokens), hf_models.torch_logits(torch_model, tokens), atol=1e-5, rtol=0
    )
    cfg2, params2 = models.load_hf(out)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("name", ["qwen2", "llama3_biases"])
def test_kv_cache_decoding_matches_full_forward(name, tmp_path):
    """Cached prefill + decode equals the full forward (tolerance: test_models.logit_rounding)."""
    build_reference(name).save_pretrained(str(tmp_path))
    cfg, params = models.load_hf(str(tmp_path))
    # Prompts of up to 36 tokens: decoding runs at positions past the 32-token llama3 context.
    assert_cache_decoding_matches_forward(cfg, params, prompt_lengths=(20, 36, 29))


# ----------------------------------------------------------------------------- random-init checkpoints


@pytest.fixture(scope="module", params=["Qwen2ForCausalLM", "LlamaForCausalLM"])
def char_checkpoint(request, tmp_path_factory):
    """A one-layer random-init model of the family over the demo's character-level tokenizer."""
    path = str(tmp_path_factory.mktemp(request.param))
    tokenizer = models.load_tokenizer(CHAR_TOKENIZER)
    models.write_random_checkpoint(path, models.tiny_config_for(tokenizer, request.param).replace(num_layers=1),
                                   tokenizer_dir=CHAR_TOKENIZER)
    return request.param, path


def test_random_checkpoint_of_each_family_loads_in_transformers(char_checkpoint):
    """The random-init writer's checkpoint (HF config + tokenizer) is the family's transformers model,
    and our loader reads it back with the config it was written from."""
    architecture, path = char_checkpoint
    tokenizer = models.load_tokenizer(path)
    cfg = models.tiny_config_for(tokenizer, architecture).replace(num_layers=1)
    loaded_cfg, params = models.load_hf(path)
    assert loaded_cfg == cfg
    reference = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(reference).__name__ == architecture
    tokens = np.asarray([tokenizer.encode("Question:\n3482+1759=\n\nAnswer:\n")], np.int32)
    expected = hf_models.torch_logits(reference, tokens)
    assert relative_error(models.forward(cfg, params, jnp.asarray(tokens)), expected) < 1e-4


def test_family_argument_of_the_random_checkpoint_writer(tmp_path):
    models.write_random_checkpoint(str(tmp_path), models.TINY_QWEN3.replace(num_layers=1),
                                   architecture="Qwen2ForCausalLM")
    cfg = models.read_config(str(tmp_path))
    assert (cfg.architecture, cfg.qk_norm, cfg.qkv_bias) == ("Qwen2ForCausalLM", False, True)
    llama = models.tiny_config("LlamaForCausalLM")
    assert llama.rope_scaling.original_max_position_embeddings == 8192 and llama.rope_theta == 5e5


# ----------------------------------------------------------------------------- config.json parsing


def test_unsupported_architecture_is_named(tmp_path):
    config = {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"MistralForCausalLM.*'mistral'.*supported: Qwen3ForCausalLM.*"
                                         r"Qwen2ForCausalLM.*LlamaForCausalLM"):
        models.load_hf(str(tmp_path))
    with pytest.raises(ValueError, match=r"architecture='GPT2LMHeadModel' is not supported; valid: Qwen3ForCausalLM"):
        models.TINY_QWEN3.replace(architecture="GPT2LMHeadModel")


def hf_config(**keys):
    return dict(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, **keys)


def test_released_config_layouts():
    """config.json as the released checkpoints write it (older transformers: rope_theta at the top,
    the scaling in rope_scaling; only model_type when architectures is absent)."""
    qwen25 = models.config_from_hf(hf_config(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1e6, rope_scaling=None,
        use_sliding_window=False, sliding_window=131072, max_window_layers=21, tie_word_embeddings=True))
    assert (qwen25.architecture, qwen25.qkv_bias, qwen25.o_proj_bias, qwen25.rope_scaling) == (
        "Qwen2ForCausalLM", True, False, None)
    llama31 = models.config_from_hf(hf_config(
        architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=5e5, max_position_embeddings=131072,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        attention_bias=False, mlp_bias=False, eos_token_id=[128001, 128008, 128009]))
    assert llama31.rope_theta == 5e5 and llama31.rope_scaling == models.Llama3RopeScaling(8.0, 1.0, 4.0, 8192)
    assert llama31.eos_token_id == (128001, 128008, 128009) and not llama31.qkv_bias
    assert models.config_from_hf(hf_config(model_type="llama", rope_theta=5e5)).architecture == "LlamaForCausalLM"


@pytest.mark.parametrize(
    "keys, message",
    [
        (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, rope_theta=1e6),
         r"use_sliding_window=true in config.json \(Qwen2ForCausalLM\) is not supported; valid: false"),
        (dict(architectures=["LlamaForCausalLM"], rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_theta=1e4),
         r"rope_type='yarn' in config.json is not supported; valid: \('default', 'llama3'\)"),
        (dict(architectures=["LlamaForCausalLM"], rope_scaling={"rope_type": "llama3", "factor": 8.0}, rope_theta=1e4),
         r"rope_type='llama3' in config.json needs low_freq_factor"),
        (dict(architectures=["LlamaForCausalLM"], hidden_act="gelu", rope_theta=1e4),
         r"hidden_act='gelu' in config.json is not supported; valid: 'silu'"),
    ],
)
def test_unsupported_settings_are_refused(keys, message):
    with pytest.raises(ValueError, match=message):
        models.config_from_hf(hf_config(**keys))


def test_flags_a_family_cannot_express_are_refused():
    qwen2 = models.TINY_QWEN3.replace(architecture="Qwen2ForCausalLM")
    assert (qwen2.qk_norm, qwen2.qkv_bias, qwen2.o_proj_bias) == (False, True, False)
    with pytest.raises(ValueError, match=r"qk_norm=True is not valid for architecture='Qwen2ForCausalLM'"):
        qwen2.replace(qk_norm=True)
    with pytest.raises(ValueError, match=r"o_proj_bias=False is not valid for architecture='LlamaForCausalLM'"):
        models.tiny_config("LlamaForCausalLM").replace(qkv_bias=True, o_proj_bias=False)


# ----------------------------------------------------------------------------- entry points


def test_sample_cli_runs_on_each_family(char_checkpoint, capsys):
    from g2rpo_jax import sample as sample_cli

    _, path = char_checkpoint
    status = sample_cli.main(["--checkpoint", path, "--prompt", "3482+1759=", "--guide", "3482", "--num_samples", "2",
                              "--max_new_tokens", "8", "--no_chat_template", "--temperature", "0.7"])
    printed = capsys.readouterr().out
    assert status == 0 and printed.count("«3482»") == 2 and "(4 guided)" in printed


@pytest.mark.slow
def test_demo_preset_trains_on_each_family(char_checkpoint, tmp_path):
    """Two steps of the demo preset (adaptive guidance) from the family's checkpoint, at test size: a
    guide holding the whole worked solution makes guided rollouts score, so the step has a gradient
    and the exported policy differs from the start."""
    architecture, path = char_checkpoint
    spec = importlib.util.spec_from_file_location("g2rpo_config", os.path.join(REPO, "experiments/configs/g2rpo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("demo,adaptive")
    cfg.model.update({"random_init": False, "checkpoint": path})
    # As tests/test_train.py: 4 prompts x G=2 on the 8 test devices, one group per batch shard, and a
    # guide of 64 tokens (the worked solution, boxed answer included) for one rollout of each group.
    cfg.mesh.mesh.update({"data": 2, "fsdp": 2, "tensor": 2})
    cfg.data.batch_size, cfg.step.group_size = 4, 2
    cfg.guidance.update({"alpha": 0.5, "initial_length": 64, "max_length": 68})
    cfg.sampling.max_new_tokens = 68
    cfg.run.update({"workdir": str(tmp_path), "total_steps": 2, "eval_every": 0, "checkpoint_every": 100})
    train.train(cfg)
    with open(tmp_path / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["guidance/reward_guided"] == 1.0 and np.isfinite(m["loss"]) and m["grad_norm"] > 0
    start_cfg, start_params = models.load_hf(path)
    final_cfg, final_params = models.load_hf(str(tmp_path / "final_hf"))
    assert final_cfg == start_cfg and final_cfg.architecture == architecture
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), start_params, final_params)
    assert all(jax.tree.leaves(changed))  # every tensor, biases included, was trained

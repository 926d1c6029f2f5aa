"""The model shapes every benchmark script uses, as `g2rpo_jax.models.ModelConfig` fields."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from g2rpo_jax import models

# Qwen3-shaped (GQA 2:1, 64-dim heads, tied embeddings) with a 32,000-token vocabulary: `small`
# (256 / 4 layers) and `bench` (512 / 8 layers, 41.6M parameters) are the CPU acceptance sizes;
# `tiny` is for quick runs of the scripts in tests. Then the published Qwen3 shapes.
SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, tie_word_embeddings=True),
    "small": dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "bench": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                  num_kv_heads=4, head_dim=64, tie_word_embeddings=True),
    **models.QWEN3_SHAPES,
}


def model_config(name: str, dtype: str = "float32", **fields) -> models.ModelConfig:
    """The named shape with parameters and compute in `dtype`; `fields` override (e.g. vocab_size)."""
    return models.ModelConfig(**{**SHAPES[name], "param_dtype": dtype, "dtype": dtype, **fields})


def hf_config(name: str, dtype: str = "float32") -> dict:
    """The named shape as transformers' config.json fields (e.g. `Qwen3Config(**hf_config(name))`)."""
    return models.config_to_hf(model_config(name, dtype))


def random_params(cfg: models.ModelConfig, seed: int = 0):
    """Random parameters with the model's shapes, as the project initialises them: N(0, 0.02²)
    matrices, unit norm scales, zero biases. One small program per distinct shape: compiling
    `models.init_params` whole for a 28-layer model took 117 s on an H200 (a kernel per layer's
    initialiser), against seconds for this."""
    abstract = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    normal = jax.jit(lambda key, shape, dtype: 0.02 * jax.random.normal(key, shape, dtype), static_argnums=(1, 2))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def draw(key, path, leaf):
        name = jax.tree_util.keystr(path)
        if "'scale'" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        if "'bias'" in name:
            return jnp.zeros(leaf.shape, leaf.dtype)
        return normal(key, leaf.shape, leaf.dtype)

    return treedef.unflatten([draw(key, path, leaf) for key, (path, leaf) in zip(keys, leaves)])

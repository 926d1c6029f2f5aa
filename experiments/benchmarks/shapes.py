"""The model shapes every benchmark script uses, as `g2rpo_jax.models.ModelConfig` fields."""

from __future__ import annotations

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

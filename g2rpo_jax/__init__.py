"""g2rpo-jax: GRPO and G²RPO-A (guided GRPO with adaptive guidance) for Qwen3 models in JAX/Flax."""

__version__ = "0.1.0"

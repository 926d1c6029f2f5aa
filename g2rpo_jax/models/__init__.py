"""Qwen3 in Flax Linen with Hugging Face checkpoints in and out."""

from g2rpo_jax.models.config import Qwen3Config, config_from_hf, config_to_hf, resolve_dtype
from g2rpo_jax.models.hf import load_hf, read_config, save_hf
from g2rpo_jax.models.qwen3 import (
    KVCache,
    Qwen3Model,
    drop_leading_slots,
    extend_cache,
    grow_cache,
    forward,
    hidden_states,
    init_cache,
    init_params,
    lm_head_weight,
    logits_from_hidden,
    param_logical_axes,
    token_logprobs,
)
from g2rpo_jax.models.random_checkpoint import TINY_QWEN3, tiny_qwen3_for, write_random_checkpoint
from g2rpo_jax.models.tokenizer import load_tokenizer, qwen3_tokenizer_dir

__all__ = [
    "KVCache",
    "TINY_QWEN3",
    "tiny_qwen3_for",
    "Qwen3Config",
    "Qwen3Model",
    "config_from_hf",
    "config_to_hf",
    "drop_leading_slots",
    "extend_cache",
    "grow_cache",
    "forward",
    "hidden_states",
    "init_cache",
    "init_params",
    "lm_head_weight",
    "load_hf",
    "load_tokenizer",
    "logits_from_hidden",
    "param_logical_axes",
    "qwen3_tokenizer_dir",
    "read_config",
    "resolve_dtype",
    "save_hf",
    "token_logprobs",
    "write_random_checkpoint",
]

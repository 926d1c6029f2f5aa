"""Decoder LMs of the Qwen3, Qwen2 / Qwen2.5 and Llama 3 families in Flax Linen, with Hugging Face
checkpoints in and out. The family is read from config.json; everything else is family-blind."""

from g2rpo_jax.models.config import (
    QWEN3_SHAPES,
    SUPPORTED_ARCHITECTURES,
    Llama3RopeScaling,
    ModelConfig,
    Qwen3Config,
    config_from_hf,
    config_to_hf,
    resolve_dtype,
)
from g2rpo_jax.models.decoder import (
    DecoderModel,
    KVCache,
    drop_leading_slots,
    extend_cache,
    forward,
    grow_cache,
    hidden_states,
    init_cache,
    init_params,
    lm_head_weight,
    logits_from_hidden,
    param_logical_axes,
    shared_prompt_hidden_states,
)
from g2rpo_jax.models.hf import load_hf, read_config, save_hf
from g2rpo_jax.models.logprobs import log_softmax_at, token_logprobs
from g2rpo_jax.models.random_checkpoint import (
    TINY_QWEN3,
    tiny_config,
    tiny_config_for,
    tiny_qwen3_for,
    write_random_checkpoint,
)
from g2rpo_jax.models.tokenizer import load_tokenizer, qwen3_tokenizer_dir

Qwen3Model = DecoderModel  # the module's name while Qwen3 was the only family

__all__ = [
    "QWEN3_SHAPES",
    "DecoderModel",
    "KVCache",
    "Llama3RopeScaling",
    "ModelConfig",
    "Qwen3Config",
    "Qwen3Model",
    "SUPPORTED_ARCHITECTURES",
    "TINY_QWEN3",
    "config_from_hf",
    "config_to_hf",
    "drop_leading_slots",
    "extend_cache",
    "forward",
    "grow_cache",
    "hidden_states",
    "init_cache",
    "init_params",
    "lm_head_weight",
    "load_hf",
    "load_tokenizer",
    "log_softmax_at",
    "logits_from_hidden",
    "param_logical_axes",
    "qwen3_tokenizer_dir",
    "read_config",
    "resolve_dtype",
    "save_hf",
    "shared_prompt_hidden_states",
    "tiny_config",
    "tiny_config_for",
    "tiny_qwen3_for",
    "token_logprobs",
    "write_random_checkpoint",
]

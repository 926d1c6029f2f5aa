"""Datasets for RL with verifiable rewards: adapters, prompts, checkpointable batch iterators."""

from g2rpo_jax.data.adapters import ADAPTERS, get_adapter, last_boxed_answer
from g2rpo_jax.data.config import get_default_config, iterator_from_config, prepare_from_config
from g2rpo_jax.data.example import TEST_KINDS, Example
from g2rpo_jax.data.iterator import BatchIterator, curriculum_ranks, epoch_order
from g2rpo_jax.data.loading import load_examples, read_records
from g2rpo_jax.data.prompts import (
    DEFAULT_INSTRUCTIONS,
    OVERLONG_POLICIES,
    TEMPLATES,
    LengthReport,
    PreparedPrompts,
    PromptSettings,
    apply_length_policy,
    build_prompt,
    chat_messages,
    encode_trajectory,
    pad_token_id,
    prepare_prompts,
    prompt_text,
    stop_token_ids,
)

__all__ = [
    "ADAPTERS",
    "BatchIterator",
    "DEFAULT_INSTRUCTIONS",
    "Example",
    "LengthReport",
    "OVERLONG_POLICIES",
    "PreparedPrompts",
    "PromptSettings",
    "TEMPLATES",
    "TEST_KINDS",
    "apply_length_policy",
    "build_prompt",
    "chat_messages",
    "curriculum_ranks",
    "encode_trajectory",
    "epoch_order",
    "get_adapter",
    "get_default_config",
    "iterator_from_config",
    "last_boxed_answer",
    "load_examples",
    "pad_token_id",
    "prepare_from_config",
    "prepare_prompts",
    "prompt_text",
    "read_records",
    "stop_token_ids",
]

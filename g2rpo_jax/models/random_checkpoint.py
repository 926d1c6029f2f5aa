"""Random-init checkpoints of each supported family in Hugging Face format, with a real tokenizer
beside them.

Tests, the demo and benchmarks use these instead of downloaded weights; they load through exactly
the same `load_hf` path as a real checkpoint. Every family gets the Qwen3 tokenizer unless another
is given: a random model has no vocabulary of its own to match.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import jax

from g2rpo_jax.models.config import ModelConfig
from g2rpo_jax.models.decoder import init_params
from g2rpo_jax.models.families import family_of
from g2rpo_jax.models.hf import save_hf
from g2rpo_jax.models.rope import Llama3RopeScaling
from g2rpo_jax.models.tokenizer import qwen3_tokenizer_dir

# Qwen3's vocabulary size (embedding rows) and its special tokens.
QWEN3_VOCAB_SIZE = 151_936
QWEN3_EOS_ID = 151_645  # <|im_end|>
QWEN3_PAD_ID = 151_643  # <|endoftext|>

TINY_QWEN3 = ModelConfig(
    vocab_size=QWEN3_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, tie_word_embeddings=True, eos_token_id=QWEN3_EOS_ID, pad_token_id=QWEN3_PAD_ID,
)
# Llama 3.1's RoPE: theta 5e5 and its llama3 scaling (factor 8 beyond an 8192-token context).
LLAMA31_ROPE_THETA = 500_000.0
LLAMA31_ROPE_SCALING = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=8192)


def tiny_config(architecture: str = "Qwen3ForCausalLM") -> ModelConfig:
    """TINY_QWEN3's shape in the family of `architecture`; Llama gets Llama 3.1's RoPE."""
    cfg = TINY_QWEN3.replace(architecture=family_of(architecture).architecture)
    if architecture == "LlamaForCausalLM":
        cfg = cfg.replace(rope_theta=LLAMA31_ROPE_THETA, rope_scaling=LLAMA31_ROPE_SCALING,
                          max_position_embeddings=131_072)
    return cfg


def tiny_config_for(tokenizer, architecture: str = "Qwen3ForCausalLM") -> ModelConfig:
    """`tiny_config(architecture)` with the vocabulary and special tokens of `tokenizer` (e.g. a
    character-level one, with which a model this small can learn a task in minutes)."""
    # Rotary base 10^4 instead of 10^6: with 16-dim heads, 10^6 leaves only two of the eight rotary
    # frequencies that tell apart positions a few tokens apart.
    return tiny_config(architecture).replace(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                             pad_token_id=tokenizer.pad_token_id, rope_theta=10_000.0)


def tiny_qwen3_for(tokenizer) -> ModelConfig:
    """TINY_QWEN3 with the vocabulary and special tokens of `tokenizer` (see `tiny_config_for`)."""
    return tiny_config_for(tokenizer, "Qwen3ForCausalLM")


def write_random_checkpoint(path: str, cfg: ModelConfig = TINY_QWEN3, seed: int = 0,
                            tokenizer_dir: Optional[str] = None, architecture: Optional[str] = None) -> str:
    """Saves random weights for `cfg` and the tokenizer files (the real Qwen3 one by default) to `path`.

    architecture: when given, `cfg`'s shape in that family (its flags; RoPE settings as in `cfg`).
    """
    if architecture is not None:
        cfg = cfg.replace(architecture=family_of(architecture).architecture)
    save_hf(path, cfg, init_params(cfg, jax.random.key(seed)))
    source = tokenizer_dir or qwen3_tokenizer_dir()
    for name in os.listdir(source):
        if name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(source, name), os.path.join(path, name))
    return path

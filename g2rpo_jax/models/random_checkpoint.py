"""Random-init Qwen3 checkpoints in Hugging Face format, with a real tokenizer beside them.

Tests, the demo and benchmarks use these instead of downloaded weights; they load through exactly
the same `load_hf` path as a real checkpoint.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import jax

from g2rpo_jax.models.config import Qwen3Config
from g2rpo_jax.models.hf import save_hf
from g2rpo_jax.models.qwen3 import init_params
from g2rpo_jax.models.tokenizer import qwen3_tokenizer_dir

# Qwen3's vocabulary size (embedding rows) and its special tokens.
QWEN3_VOCAB_SIZE = 151_936
QWEN3_EOS_ID = 151_645  # <|im_end|>
QWEN3_PAD_ID = 151_643  # <|endoftext|>

TINY_QWEN3 = Qwen3Config(
    vocab_size=QWEN3_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, tie_word_embeddings=True, eos_token_id=QWEN3_EOS_ID, pad_token_id=QWEN3_PAD_ID,
)


def tiny_qwen3_for(tokenizer) -> Qwen3Config:
    """TINY_QWEN3 with the vocabulary and special tokens of `tokenizer` (e.g. a character-level
    one, with which a model this small can learn a task in minutes)."""
    # Rotary base 10^4 instead of Qwen3's 10^6: with 16-dim heads, 10^6 leaves only two of the
    # eight rotary frequencies that tell apart positions a few tokens apart.
    return TINY_QWEN3.replace(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, rope_theta=10_000.0)


def write_random_checkpoint(path: str, cfg: Qwen3Config = TINY_QWEN3, seed: int = 0,
                            tokenizer_dir: Optional[str] = None) -> str:
    """Saves random weights for `cfg` and the tokenizer files (the real Qwen3 one by default) to `path`."""
    save_hf(path, cfg, init_params(cfg, jax.random.key(seed)))
    source = tokenizer_dir or qwen3_tokenizer_dir()
    for name in os.listdir(source):
        if name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(source, name), os.path.join(path, name))
    return path

"""Model FLOPs of the train step and of a decode step, for achieved-FLOP/s and MFU figures.

The count follows PaLM's (Chowdhery et al. 2022, appendix B): a forward pass costs 2 FLOPs per
matmul weight and token, plus 2 × 2 × layers × heads × head_dim × sequence length per token for
the attention scores and the weighted sum (causal masking is not subtracted: a dense attention
computes the whole square); a backward pass costs twice the forward. Norms, activations, rotary
embeddings and the softmax are left out. The LM head is counted on completion positions only,
where the objective projects onto the vocabulary.
"""

from __future__ import annotations

from g2rpo_jax.models.config import ModelConfig


def matmul_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(weights of the decoder layers' matmuls, weights of the LM head); the input embedding is a
    gather, not a matmul."""
    attention = cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_layers * (attention + mlp), cfg.hidden_size * cfg.vocab_size


def attention_flops(cfg: ModelConfig, context: int) -> int:
    """FLOPs of one query position's q·k and p·v over `context` keys, all layers and heads."""
    return 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context


def forward_flops(cfg: ModelConfig, rows: int, prompt_len: int, completion_len: int, shared_prompt_group: int = 1) -> float:
    """FLOPs of one forward over rows × (prompt + completion) positions, LM head on completions.
    `shared_prompt_group` G > 1: every G rows share one prompt, run once (`models.shared_prompt_hidden_states`),
    so prompt positions count rows / G times; every position still attends over prompt + completion."""
    if rows % shared_prompt_group:
        raise ValueError(f"rows={rows} is not a multiple of shared_prompt_group={shared_prompt_group}")
    body, head = matmul_parameters(cfg)
    seq = prompt_len + completion_len
    positions = rows // shared_prompt_group * prompt_len + rows * completion_len
    return float(positions * (2 * body + attention_flops(cfg, seq)) + rows * completion_len * 2 * head)


def train_step_flops(cfg: ModelConfig, rows: int, prompt_len: int, completion_len: int, *, num_updates: int = 1,
                     reference_forward: bool = False, old_policy_forward: bool = False,
                     shared_prompt_group: int = 1) -> float:
    """Model FLOPs of one train step on a [rows, prompt_len] + [rows, completion_len] batch: a
    forward and backward per optimizer update (3 forwards' worth), one forward of the reference
    when the KL term is on (beta > 0), one of the old policy when num_updates μ > 1.
    `shared_prompt_group` as in `forward_flops`."""
    forwards = 3 * num_updates + int(reference_forward) + int(old_policy_forward)
    return forwards * forward_flops(cfg, rows, prompt_len, completion_len, shared_prompt_group)


def decode_step_cost(cfg: ModelConfig, rows: int, context: int, itemsize: int) -> tuple[float, float]:
    """(FLOPs, bytes read) of one decode step of `rows` rows attending over `context` cache slots:
    every matmul weight is read once per step (`itemsize` bytes each), the KV cache once per row."""
    body, head = matmul_parameters(cfg)
    flops = rows * (2 * (body + head) + attention_flops(cfg, context))
    kv_bytes = rows * context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize
    return float(flops), float((body + head) * itemsize + kv_bytes)

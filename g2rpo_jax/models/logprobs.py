"""Log-probabilities of chosen tokens: log_softmax(logits / temperature)[token], computed once here
for the sampler (one row of logits per step) and the loss (chunked over a whole sequence)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from g2rpo_jax.models.config import ModelConfig
from g2rpo_jax.models.decoder import logits_from_hidden


def _scaled_and_log_norm(logits: jax.Array, temperature) -> tuple[jax.Array, jax.Array]:
    """logits / temperature in float32 [..., V] and its log-normaliser log Σ exp [...], computed as
    max + log Σ exp(x - max) so no exponent overflows."""
    scaled = logits.astype(jnp.float32) / temperature
    return scaled, jax.nn.logsumexp(scaled, axis=-1)


def _at(scaled: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.take_along_axis(scaled, targets[..., None], axis=-1)[..., 0]


def log_softmax_at(logits: jax.Array, targets: jax.Array, temperature: float | jax.Array = 1.0) -> jax.Array:
    """log_softmax(logits / temperature)[target] in float32. logits [..., V], targets [...] -> [...]."""
    scaled, log_norm = _scaled_and_log_norm(logits, temperature)
    return _at(scaled, targets) - log_norm


def token_logprobs(
    cfg: ModelConfig,
    params,
    hidden: jax.Array,
    targets: jax.Array,
    temperature: float | jax.Array = 1.0,
    chunk_size: int = 128,
    with_entropy: bool = False,
):
    """log_softmax(logits / temperature)[target] for hidden [B, T, E] and targets [B, T], in float32.

    The vocabulary projection runs over chunks of positions under `jax.checkpoint`, so neither the
    forward nor the backward pass holds more than [B, chunk, V] logits at once (a 151k vocabulary
    times thousands of positions would not fit otherwise). When one chunk covers every position,
    the backward keeps that chunk's logits instead of projecting again: the peak is the same
    [B, T, V] either way, and the LM head's forward is not paid twice.
    Returns [B, T] (and the entropy [B, T]).
    """
    chex.assert_rank(hidden, 3)
    chex.assert_equal_shape_prefix([hidden, targets], 2)
    batch, steps, _ = hidden.shape
    chunk = min(chunk_size, steps)
    padded = -steps % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, padded), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, padded)))
    num_chunks = hidden.shape[1] // chunk
    hidden_chunks = hidden.reshape(batch, num_chunks, chunk, -1).swapaxes(0, 1)  # [C, B, chunk, E]
    target_chunks = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1)  # [C, B, chunk]

    def one_chunk(h, t):
        scaled, log_norm = _scaled_and_log_norm(logits_from_hidden(cfg, params, h), temperature)  # [B, chunk, V]
        picked = _at(scaled, t) - log_norm
        if not with_entropy:
            return picked, jnp.zeros_like(picked)
        # Entropy of softmax(scaled): log Z - Σ p x with p = exp(x - log Z), sharing log Z with the
        # log-probs (one more exponential over the vocabulary, not a second softmax).
        probs = jnp.exp(scaled - log_norm[..., None])
        return picked, log_norm - jnp.sum(probs * scaled, axis=-1)

    if num_chunks > 1:
        one_chunk = jax.checkpoint(one_chunk)
    logps, entropy = jax.lax.map(lambda xs: one_chunk(*xs), (hidden_chunks, target_chunks))
    logps = logps.swapaxes(0, 1).reshape(batch, -1)[:, :steps]
    entropy = entropy.swapaxes(0, 1).reshape(batch, -1)[:, :steps]
    return (logps, entropy) if with_entropy else logps

"""Rotary position embeddings (RoPE): inverse frequencies, sin/cos tables and the rotation.

Two frequency schedules are implemented:
- default: f_i = theta^(-2i / D) for i = 0 .. D/2 - 1 (Su et al., RoFormer, arXiv 2104.09864);
- llama3: the default frequencies rescaled by wavelength, as introduced with Llama 3.1 (Meta's
  reference `apply_scaling` in llama-models; described in "The Llama 3 Herd of Models",
  arXiv 2407.21783). With context L (original_max_position_embeddings), wavelength w = 2π / f:
    w < L / high_freq_factor            -> f              (short wavelengths kept)
    w > L / low_freq_factor             -> f / factor      (long wavelengths stretched)
    otherwise, s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor)
                                        -> (1 - s) f / factor + s f   (linear blend in between)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """The `rope_type: "llama3"` entries of a Hugging Face config (rope_parameters / rope_scaling)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        if not self.factor >= 1.0:
            raise ValueError(f"rope factor={self.factor} is not valid; valid: a number >= 1")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                f"rope low_freq_factor={self.low_freq_factor}, high_freq_factor={self.high_freq_factor} are not "
                "valid; valid: 0 < low_freq_factor < high_freq_factor"
            )
        if self.original_max_position_embeddings < 1:
            raise ValueError(
                f"rope original_max_position_embeddings={self.original_max_position_embeddings} is not valid; "
                "valid: an integer >= 1"
            )


def default_inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
    """theta^(-2i / D) for i < D/2, float32. -> [D/2]."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def llama3_inverse_frequencies(inv_freq: jax.Array, scaling: Llama3RopeScaling) -> jax.Array:
    """The Llama 3.1 wavelength-dependent rescaling of inverse frequencies [D/2] (module docstring)."""
    context = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    blend = (context / wavelength - low) / (high - low)
    blended = (1 - blend) * inv_freq / scaling.factor + blend * inv_freq
    stretched = jnp.where(wavelength > context / low, inv_freq / scaling.factor, blended)
    return jnp.where(wavelength < context / high, inv_freq, stretched)


def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[Llama3RopeScaling] = None) -> jax.Array:
    """Rotary inverse frequencies [D/2] in float32: default RoPE, or llama3-scaled when `scaling` is set."""
    inv_freq = default_inverse_frequencies(head_dim, theta)
    return inv_freq if scaling is None else llama3_inverse_frequencies(inv_freq, scaling)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sin/cos of shape [B, T, D/2] in float32 for integer positions [B, T] and inverse frequencies [D/2]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotates the two halves of the head dim (the Hugging Face / GPT-NeoX layout). x: [B, T, N, D]."""
    first, second = jnp.split(x, 2, axis=-1)
    sin = sin[:, :, None, :].astype(x.dtype)
    cos = cos[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)

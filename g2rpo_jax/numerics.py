"""Small numeric helpers shared by the objective's modules (advantages, loss, sampler mismatch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_option(name: str, value, options: tuple) -> None:
    """Raises ValueError naming `name`, its bad value and the valid options."""
    if value not in options:
        raise ValueError(f"{name}={value!r} is not valid; expected one of {options}")


def as_float(x: jax.Array) -> jax.Array:
    """At least float32: losses and statistics are never accumulated in bf16 or ints."""
    return jnp.asarray(x).astype(jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, or 0 where the denominator is 0 (the numerator is then 0 too)."""
    safe = jnp.where(denominator > 0, denominator, 1)
    return jnp.where(denominator > 0, numerator / safe, 0)

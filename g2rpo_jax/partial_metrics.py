"""Metrics of part of a batch (one micro-batch) that merge exactly into the whole batch's.

Each metric of a part carries what merging needs: a mean carries its weight (the number of tokens
or sequences it averages over), a total needs nothing more, a smallest value carries whether the
part had anything to take it over. `merge` takes the parts of every micro-batch stacked along a
leading axis (leaves [k], as `lax.scan` returns them) and gives the whole batch's values by each
metric's own rule, whatever the keys: nothing to keep in sync with the code that produces them.
The parts are pytrees (flax dataclasses), so they pass through `jit`, `scan` and `tree.map`.
"""

from __future__ import annotations

from typing import Mapping, Union

import flax.struct
import jax
import jax.numpy as jnp

from g2rpo_jax.numerics import safe_divide


@flax.struct.dataclass
class Mean:
    """A mean over `weight` items; merges as Σ value·weight / Σ weight (0 without weight)."""

    value: jax.Array
    weight: jax.Array

    def merged(self) -> jax.Array:
        return safe_divide((self.value * self.weight).sum(), self.weight.sum())


@flax.struct.dataclass
class Total:
    """A sum or a count; merges as Σ value."""

    value: jax.Array

    def merged(self) -> jax.Array:
        return self.value.sum()


@flax.struct.dataclass
class Largest:
    """A maximum of non-negative values (0 for an empty part); merges as max value."""

    value: jax.Array

    def merged(self) -> jax.Array:
        return self.value.max()


@flax.struct.dataclass
class Smallest:
    """A minimum over `weight` items (0 for an empty part); merges as the min over the parts with
    weight > 0, and 0 when every part is empty."""

    value: jax.Array
    weight: jax.Array

    def merged(self) -> jax.Array:
        return jnp.where(self.weight.sum() > 0, jnp.where(self.weight > 0, self.value, jnp.inf).min(), 0.0)


@flax.struct.dataclass
class Spread:
    """A population standard deviation over `weight` items around their mean `mean`; merges
    exactly by pooling: within-part sums of squares plus the spread of the part means."""

    value: jax.Array  # the std
    mean: jax.Array
    weight: jax.Array

    def merged(self) -> jax.Array:
        mean = Mean(self.mean, self.weight).merged()
        sum_squares = self.weight * jnp.square(self.value) + self.weight * jnp.square(self.mean - mean)
        return jnp.sqrt(safe_divide(sum_squares.sum(), self.weight.sum()))


Part = Union[Mean, Total, Largest, Smallest, Spread]
PART_TYPES = (Mean, Total, Largest, Smallest, Spread)


def _is_part(x) -> bool:
    return isinstance(x, PART_TYPES)


def values(parts: Mapping[str, Part]) -> dict[str, jax.Array]:
    """The metric values of one part (leaves are scalars): {key: value}."""
    return {key: part.value for key, part in parts.items()}


def merge(stacked: Mapping[str, Part]) -> dict[str, jax.Array]:
    """The whole batch's metric values, float32, from parts stacked over k micro-batches.

    Raises ValueError naming a key whose value is not a part, or parts of unequal counts."""
    sizes = set()
    for key, part in stacked.items():
        if not _is_part(part):
            raise ValueError(f"metric {key!r} is a {type(part).__name__}, not a partial metric "
                             f"({', '.join(t.__name__ for t in PART_TYPES)})")
        sizes |= {jnp.shape(leaf) for leaf in jax.tree.leaves(part)}
    if len(sizes) > 1 or any(len(size) != 1 for size in sizes):
        raise ValueError(f"stacked partial metrics need leaves of one shape [k]; got shapes {sorted(sizes)}")
    as_float = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dict(stacked))
    return {key: part.merged() for key, part in as_float.items()}

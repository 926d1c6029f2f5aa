"""The train state pytree, its shardings, and orbax checkpoints of it.

The state holds everything a resumed run needs and nothing it can rebuild: the frozen reference
parameters are not in it (they are reloaded from the base checkpoint and passed to the train step
separately), and neither is the optimizer (rebuilt from its config; only its state is here).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from g2rpo_jax import guidance as guidance_lib
from g2rpo_jax import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
    """step: int32 [] train steps done; params / opt_state: the policy and its optimizer state;
    guidance: the guidance schedule (G²RPO-A's ℓ); rng: uint32 [2] raw threefry key data (raw
    rather than a typed key so checkpoints hold a plain array; see `split_rng`)."""

    step: jax.Array
    params: Any
    opt_state: Any
    guidance: guidance_lib.GuidanceState
    rng: jax.Array

    def split_rng(self) -> tuple["TrainState", jax.Array]:
        """(state with a fresh rng, a key for this use): keys are never reused across steps."""
        next_rng, key = jax.random.split(self.rng)
        return self.replace(rng=next_rng), key


def _raw_key(rng: jax.Array) -> jax.Array:
    """Raw uint32 key data from either a typed key (jax.random.key) or a raw one (PRNGKey)."""
    if not isinstance(rng, jax.Array):
        rng = jnp.asarray(rng)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    if rng.dtype != jnp.uint32 or rng.shape != (2,):
        raise ValueError(
            f"rng must be a threefry key (jax.random.key(seed) or jax.random.PRNGKey(seed)); "
            f"got dtype {rng.dtype} shape {rng.shape}"
        )
    return rng


def create(params, optimizer: optax.GradientTransformation, gcfg: ml_collections.ConfigDict, rng) -> TrainState:
    """A fresh state at step 0: optimizer state from `params`, guidance from `guidance.init(gcfg)`."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        guidance=guidance_lib.init(gcfg),
        rng=_raw_key(rng),
    )


def abstract_state(params, optimizer: optax.GradientTransformation, gcfg: ml_collections.ConfigDict) -> TrainState:
    """The state's shapes and dtypes (ShapeDtypeStructs) for params given as arrays or shapes;
    nothing is allocated."""
    return jax.eval_shape(lambda p: create(p, optimizer, gcfg, jax.random.PRNGKey(0)), params)


def state_shardings(
    abstract: TrainState,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    param_logical_specs,
    rules=sharding_lib.DEFAULT_RULES,
) -> TrainState:
    """NamedShardings for every leaf of the state.

    Params follow the logical-axis rules; every copy of the parameter tree inside the optimizer
    state (Adam's moments) is sharded like the params; everything else (counts, the learning rate,
    guidance, step, rng) is replicated.
    """
    param_shardings = sharding_lib.tree_shardings(param_logical_specs, abstract.params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, param_sharding: param_sharding,
        abstract.opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=opt_shardings,
        guidance=jax.tree.map(lambda _: replicated, abstract.guidance),
        rng=replicated,
    )


def shard_state(state: TrainState, shardings: TrainState) -> TrainState:
    """A copy of `state` laid out on the given shardings.

    Always a copy (never aliasing the input's buffers), so donating the result to the train step
    cannot delete arrays the caller still holds, such as the params the state was created from.
    (`jax.device_put(..., may_alias=False)` still aliases the shard of a replicated array that
    stays on its device, so the copy is made by a jitted identity with output shardings.)
    """
    return jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=shardings)(state)


# ----------------------------------------------------------------------------- checkpoints


def make_checkpoint_manager(
    directory: str,
    *,
    max_to_keep: Optional[int] = 3,
    save_interval_steps: int = 1,
    async_save: bool = True,
) -> ocp.CheckpointManager:
    """An orbax CheckpointManager for TrainStates under `directory` (created if missing).

    With `async_save` a save returns once the arrays are copied off the devices and writes
    continue in the background; call `manager.wait_until_finished()` before reading them back
    or exiting (`manager.close()` does too).
    """
    if save_interval_steps < 1:
        raise ValueError(f"save_interval_steps={save_interval_steps!r} is not valid; valid: an integer >= 1")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, *, step: Optional[int] = None,
                    force: bool = False) -> bool:
    """Saves `state` as checkpoint `step` (default: state.step); returns whether it was written
    (the manager skips steps off its save interval unless `force`)."""
    step = int(jax.device_get(state.step)) if step is None else int(step)
    return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def _restore_target(target: TrainState, shardings: Optional[TrainState]) -> TrainState:
    """ShapeDtypeStructs of `target`, each carrying the sharding to restore onto: from
    `shardings`, else the leaf's own, else the first device."""
    if shardings is None:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or default, target)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)


def restore_checkpoint(
    manager: ocp.CheckpointManager,
    target: TrainState,
    *,
    step: Optional[int] = None,
    shardings: Optional[TrainState] = None,
) -> TrainState:
    """Restores checkpoint `step` (default: the latest) into a TrainState shaped like `target`.

    `target` may hold arrays or ShapeDtypeStructs (e.g. `abstract_state(...)`). Each array is
    read directly onto its sharding from `shardings` (e.g. `state_shardings(...)`), or else onto
    the sharding `target`'s leaf carries (single-device when it carries none).
    """
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise ValueError(f"no checkpoint to restore in {manager.directory}")
    elif step not in manager.all_steps():
        raise ValueError(f"step={step} has no checkpoint in {manager.directory}; available: {manager.all_steps()}")
    abstract = _restore_target(target, shardings)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))

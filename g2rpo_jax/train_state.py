"""The train state pytree, its shardings, and orbax checkpoints of it.

The state holds everything a resumed run needs and nothing it can rebuild: the frozen reference
parameters are not in it (they are reloaded from the base checkpoint and passed to the train step
separately), and neither is the optimizer (rebuilt from its config; only its state is here).
A checkpoint step stores the state together with a JSON dict of the loop's host-side state, and
`restore_latest_intact` resumes from the newest step that reads back whole.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from g2rpo_jax import guidance as guidance_lib
from g2rpo_jax import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
    """step: int32 [] train steps done; params / opt_state: the policy and its optimizer state;
    guidance: the guidance schedule (G²RPO-A's ℓ); rng: uint32 [2] raw threefry key data, the run's
    base key (raw rather than a typed key so checkpoints hold a plain array; see `step_key`)."""

    step: jax.Array
    params: Any
    opt_state: Any
    guidance: guidance_lib.GuidanceState
    rng: jax.Array

    def step_key(self, step: int) -> jax.Array:
        """The typed key of train step `step`'s randomness (sampling): the base key folded with the
        step number, so each step draws fresh keys and a resumed run draws the same keys as an
        uninterrupted one (the base key is restored with the state)."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), step)


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


def create(params, optimizer: optax.GradientTransformation, gcfg: ml_collections.ConfigDict, rng,
           num_problems: Optional[int] = None) -> TrainState:
    """A fresh state at step 0: optimizer state from `params`, guidance from
    `guidance.init(gcfg, num_problems)` (num_problems, the number of training problems, is
    required with guidance.per_problem=True and ignored otherwise)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        guidance=guidance_lib.init(gcfg, num_problems),
        rng=_raw_key(rng),
    )


def abstract_state(params, optimizer: optax.GradientTransformation, gcfg: ml_collections.ConfigDict,
                   num_problems: Optional[int] = None) -> TrainState:
    """The state's shapes and dtypes (ShapeDtypeStructs) for params given as arrays or shapes;
    nothing is allocated. `num_problems` as in `create`."""
    return jax.eval_shape(lambda p: create(p, optimizer, gcfg, jax.random.PRNGKey(0), num_problems), params)


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
    guidance with its per-problem arrays, step, rng) is replicated (the per-problem arrays are
    small, [P] and [P, R], and every step reads arbitrary rows of them).
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

# A checkpoint step holds two items, written and committed together (orbax finalises the whole
# step directory at once), so a step is either complete or absent: the TrainState, and a JSON
# dict of host-side state (the data iterator's position, counters, the config it was written under).
STATE_ITEM = "state"
HOST_ITEM = "host"
EVAL_SCORE = "eval_score"  # the metric `keep_best` ranks checkpoints by (higher is better)


def make_checkpoint_manager(
    directory: str,
    *,
    max_to_keep: Optional[int] = 3,
    keep_best: bool = False,
    save_interval_steps: int = 1,
    async_save: bool = True,
) -> ocp.CheckpointManager:
    """An orbax CheckpointManager for (TrainState, host state) steps under `directory`.

    Keeps the latest `max_to_keep` steps (None or 0: all) and, with `keep_best`, also the step
    with the highest `score` passed to `save_checkpoint`. With `async_save` a save returns once
    the arrays are copied off the devices and writes continue in the background; call
    `manager.wait_until_finished()` before reading them back or exiting (`manager.close()` does too).
    """
    if save_interval_steps < 1:
        raise ValueError(f"save_interval_steps={save_interval_steps!r} is not valid; valid: an integer >= 1")
    if max_to_keep is not None and max_to_keep < 0:
        raise ValueError(f"max_to_keep={max_to_keep!r} is not valid; valid: None or an integer >= 0 (0 = keep all)")
    policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep or None)]
    if keep_best:  # steps without a score (ranked lowest) are left to LatestN
        policies.append(ocp.checkpoint_managers.BestN(
            get_metric_fn=_score, n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=True,  # half-written steps of a killed run: never read, only disk
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=_score if keep_best else None,  # also what makes orbax store the scores
        best_mode="max",
    )
    return ocp.CheckpointManager(os.path.abspath(directory), item_names=(STATE_ITEM, HOST_ITEM), options=options)


def _score(metrics) -> float:
    """A step's rank for `keep_best`; a step saved without a score (no eval at it) ranks lowest."""
    return float(metrics.get(EVAL_SCORE, -math.inf))


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, host: Optional[dict] = None, *,
                    step: Optional[int] = None, force: bool = False, score: Optional[float] = None) -> bool:
    """Saves `state` and the JSON-serialisable `host` dict as checkpoint `step` (default:
    state.step); returns whether it was written (the manager skips steps off its save interval
    unless `force`). `score` ranks the step for a manager made with `keep_best`."""
    step = int(jax.device_get(state.step)) if step is None else int(step)
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state), HOST_ITEM: ocp.args.JsonSave(host or {})})
    # Always a dict: a manager that tracks the best step warns on every save without metrics; an
    # empty one records "no score" (ranked lowest by `_score`) and is ignored by other managers.
    metrics = {EVAL_SCORE: float(score)} if score is not None else {}
    return manager.save(step, args=args, metrics=metrics, force=force)


def _restore_target(target: TrainState, shardings: Optional[TrainState]) -> TrainState:
    """ShapeDtypeStructs of `target`, each carrying the sharding to restore onto: from
    `shardings`, else the leaf's own, else the first device."""
    if shardings is None:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or default, target)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)


def _checked_step(manager: ocp.CheckpointManager, step: Optional[int]) -> int:
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise ValueError(f"no checkpoint to restore in {manager.directory}")
    elif step not in manager.all_steps():
        raise ValueError(f"step={step} has no checkpoint in {manager.directory}; available: {manager.all_steps()}")
    return step


def restore_checkpoint(
    manager: ocp.CheckpointManager,
    target: TrainState,
    *,
    step: Optional[int] = None,
    shardings: Optional[TrainState] = None,
) -> TrainState:
    """Restores the TrainState of checkpoint `step` (default: the latest), shaped like `target`.

    `target` may hold arrays or ShapeDtypeStructs (e.g. `abstract_state(...)`). Each array is
    read directly onto its sharding from `shardings` (e.g. `state_shardings(...)`), or else onto
    the sharding `target`'s leaf carries (single-device when it carries none).
    """
    step = _checked_step(manager, step)
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(_restore_target(target, shardings))})
    return manager.restore(step, args=args)[STATE_ITEM]


def restore_host_state(manager: ocp.CheckpointManager, step: Optional[int] = None) -> dict:
    """The host-side dict saved with checkpoint `step` (default: the latest); cheap to read."""
    step = _checked_step(manager, step)
    return dict(manager.restore(step, args=ocp.args.Composite(**{HOST_ITEM: ocp.args.JsonRestore()}))[HOST_ITEM])


def step_path(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


def single_item_steps(manager: ocp.CheckpointManager) -> list[int]:
    """Steps in the layout before the host state joined the checkpoint (one `default` item, the
    data position in a JSON file beside it): this code does not resume them."""
    return [s for s in manager.all_steps()
            if os.path.isdir(os.path.join(step_path(manager, s), "default"))
            and not os.path.isdir(os.path.join(step_path(manager, s), HOST_ITEM))]


def all_hosts_agree(ok: bool) -> bool:
    """True only if `ok` holds on every host (each host may read different shards of a checkpoint,
    so one host's failure must become every host's, or they would resume from different steps)."""
    if jax.process_count() == 1:
        return bool(ok)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(int(ok), np.int32))))


@dataclasses.dataclass
class Resumed:
    """What `restore_latest_intact` found: the step, its state and host dict, and the newer steps
    that could not be read ((step, path, one-line error) each; already moved aside)."""

    step: int
    state: TrainState
    host: dict
    damaged: list


def restore_latest_intact(
    manager: ocp.CheckpointManager,
    target: TrainState,
    *,
    shardings: Optional[TrainState] = None,
    check_host: Optional[Callable[[int, dict], None]] = None,
    set_aside_dir: Optional[str] = None,
) -> Optional[Resumed]:
    """Restores the newest checkpoint that reads back whole; None when there is none.

    Steps are tried newest first. One whose host dict or state cannot be read (a truncated or
    deleted file, a step directory left half-written by a copy) is skipped and, once an older step
    has restored, moved into `set_aside_dir` (default: beside the checkpoint directory, named
    `<dir>_damaged`) so a later save of that step number can take its place. If no step restores,
    nothing is moved and an error lists every step's failure (a mistake that affects them all, such
    as a changed model, must not look like damage). `check_host(step, host)` runs before a step's
    state is read and may raise (a config that cannot resume this run): that error propagates.
    """
    failed: list[tuple[int, str]] = []  # descriptions only: a kept exception keeps orbax's reads alive
    quiet = _QuietDamagedReads(str(manager.directory))
    quiet.install()  # from the first read: the leftovers of a failure start before it is raised
    try:
        return _restore_newest(manager, target, shardings, check_host, set_aside_dir, failed)
    finally:
        gc.collect()  # a failed restore's coroutines, while the filter still holds
        if not failed:  # nothing was damaged: nothing to quiet later either
            quiet.uninstall()


def _restore_newest(manager, target, shardings, check_host, set_aside_dir, failed) -> Optional[Resumed]:
    for step in sorted(manager.all_steps(), reverse=True):
        host, error = None, None
        try:
            host = restore_host_state(manager, step)
        except Exception as e:  # noqa: BLE001 -- any read failure means this step is unusable
            error = describe_error(e)
        if all_hosts_agree(error is None):
            if check_host is not None:
                check_host(step, host)
            try:
                state = restore_checkpoint(manager, target, step=step, shardings=shardings)
            except Exception as e:  # noqa: BLE001
                error = describe_error(e)
        if all_hosts_agree(error is None):
            damaged = [(s, step_path(manager, s), e) for s, e in failed]
            if damaged:
                _set_aside(manager, [s for s, _ in failed], set_aside_dir)
            return Resumed(step=step, state=state, host=host, damaged=damaged)
        failed.append((step, error or "another host could not read it"))
    if failed:
        listing = "; ".join(f"{step_path(manager, s)}: {e}" for s, e in failed)
        raise RuntimeError(f"no checkpoint in {manager.directory} could be restored ({listing}). If the config "
                           "changed the model or the state's shapes, restore it; if the files are damaged, "
                           "move the directory away to start afresh")
    return None


def describe_error(error: BaseException) -> str:
    """One short line: a damaged array's error carries a page of TensorStore spec after it."""
    text = str(error).strip().splitlines()
    first = text[0].split(" See full TensorStore details")[0] if text else ""
    return f"{type(error).__name__}: {first[:300]}"


class _QuietDamagedReads:
    """When one read of a damaged checkpoint fails, orbax ends the restore while its other reads
    are still in flight; their errors then surface from coroutines and tensorstore callbacks after
    orbax's event loop has closed, as "exception ignored" tracebacks and asyncio log records:
    hundreds of lines for one failure that is already reported. This drops exactly those (errors
    that name the checkpoint directory, and the closed loop's), and nothing else."""

    def __init__(self, directory: str):
        self._directory = directory
        self._previous = None

    def _is_leftover(self, error) -> bool:
        text = str(error)
        return self._directory in text or (isinstance(error, RuntimeError) and text == "Event loop is closed")

    def _unraisable(self, unraisable) -> None:
        if not self._is_leftover(unraisable.exc_value):
            self._previous(unraisable)

    def _log_filter(self, record) -> bool:
        return not (record.exc_info and self._is_leftover(record.exc_info[1]))

    def install(self) -> None:
        self._previous = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        logging.getLogger("asyncio").addFilter(self._log_filter)

    def uninstall(self) -> None:
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._previous
        logging.getLogger("asyncio").removeFilter(self._log_filter)


def _set_aside(manager: ocp.CheckpointManager, steps: Sequence[int], destination: Optional[str]) -> None:
    """Moves damaged steps out of the manager's directory (kept for inspection, not deleted)."""
    destination = destination or str(manager.directory).rstrip("/") + "_damaged"
    if jax.process_index() == 0:
        os.makedirs(destination, exist_ok=True)
        for step in steps:
            target = os.path.join(destination, str(step))
            if os.path.exists(target):  # a step damaged twice: keep both
                target += f".{int(time.time())}"
            shutil.move(step_path(manager, step), target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("g2rpo_jax: damaged checkpoints set aside")
    manager.reload()

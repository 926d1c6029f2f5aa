"""Device mesh, logical-axis rules and multi-host start-up.

Parameters name their axes once (e.g. ('embed', 'mlp')); a rules table maps each logical name to a
mesh axis (or None = replicated). Changing the parallelism of a run is then a config override of
`mesh` and `rules`, not a code change.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of axes, or None for replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("norm", None),
)


def get_default_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # -1: all remaining devices
    cfg.rules = DEFAULT_RULES
    cfg.distributed = False  # call jax.distributed.initialize() (multi-host TPU pods / GPU clusters)
    # Folder (or gs:// path) where compiled programs persist across runs; "" keeps them in memory only.
    cfg.compilation_cache_dir = ""
    return cfg


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves one -1 entry to the remaining devices and checks the product."""
    unknown = [a for a in MESH_AXES if axis_sizes.get(a, 1) == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(axis_sizes)}")
    known = math.prod(axis_sizes.get(a, 1) for a in MESH_AXES if a not in unknown)
    if unknown:
        if num_devices % known:
            raise ValueError(f"mesh {dict(axis_sizes)}: {num_devices} devices are not divisible by {known}")
        sizes = {a: (num_devices // known if a in unknown else axis_sizes.get(a, 1)) for a in MESH_AXES}
    else:
        sizes = {a: axis_sizes.get(a, 1) for a in MESH_AXES}
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but {num_devices} are available")
    return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(axis_sizes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; sizes default to pure data parallelism."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(axis_sizes or {"data": -1}, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _mesh_axes_for(logical: str | None, rules: Mapping[str, Any]):
    if logical is None:
        return None
    if logical not in rules:
        raise ValueError(f"logical axis {logical!r} has no rule; known: {sorted(rules)}")
    return rules[logical]


def axis_size(mesh: Mesh, axes) -> int:
    """How many devices the mesh axis name (or tuple of names, or None) `axes` spans."""
    if axes is None:
        return 1
    names = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[n] for n in names)


def logical_to_mesh_spec(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh, rules) -> PartitionSpec:
    """Maps a logical PartitionSpec to mesh axes, replicating any dim the mesh axis does not divide."""
    rules = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
        axes = _mesh_axes_for(name, rules)
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        if not names or dim % axis_size(mesh, axes) or used & set(names):
            spec.append(None)
            continue
        used |= set(names)
        spec.append(axes)
    return PartitionSpec(*spec)


def tree_shardings(logical_specs, shapes, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a pytree given matching trees of logical specs and shapes (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, logical_to_mesh_spec(spec, x.shape, mesh, rules)),
        logical_specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Leading-axis ('batch') sharding for an input array of rank ndim."""
    return NamedSharding(mesh, PartitionSpec(dict(rules)["batch"], *([None] * (ndim - 1))))


def batch_axis_size(mesh: Mesh | None, rules=DEFAULT_RULES) -> int:
    """How many ways the leading batch axis is split (1 without a mesh): batches must be a multiple
    of this."""
    return 1 if mesh is None else axis_size(mesh, dict(rules)["batch"])


def initialize_distributed(enabled: bool) -> None:
    """Multi-host start-up: on TPU pods and SLURM/GPU clusters jax discovers the peers itself."""
    if enabled:
        jax.distributed.initialize()
    if jax.process_index() == 0:
        print(
            f"[sharding] {jax.process_count()} process(es), {jax.device_count()} device(s) "
            f"({jax.devices()[0].platform}), {jax.local_device_count()} local",
            flush=True,
        )


def enable_compilation_cache(path: str) -> None:
    """Keeps compiled programs in `path` so that a restarted run skips most compilation (a run
    compiles one program per sampling shape, decode phase and batch size, plus the train step)."""
    if not path:
        return
    path = path if "://" in path else os.path.abspath(os.path.expanduser(path))
    jax.config.update("jax_compilation_cache_dir", path)
    if jax.process_index() == 0:
        print(f"[sharding] compiled programs are cached in {path}", flush=True)


def describe(mesh: Mesh) -> str:
    return " ".join(f"{name}={size}" for name, size in zip(mesh.axis_names, np.shape(mesh.devices)))

"""Per-device memory plan of a training config: what one train step and one rollout round hold.

    python -m g2rpo_jax.plan --config=experiments/configs/g2rpo.py:qwen3_1_7b_math,g2rpo_a \\
        --model_shape=qwen3-1.7b [--targets=tpu-v5p-8,8xh100] [--mesh_shape=data=1,fsdp=-1,tensor=2] \\
        [--num_devices=8 --device_memory_gib=80] [--search] [--config.<key>=<value> ...]

No device is needed: the mesh is abstract (`jax.sharding.AbstractMesh`), so a v5p-32 plan prints
on a laptop. Every size is in bytes per device.

Where each number comes from
  parameters, reference parameters, optimizer state, the rest of the train state: `jax.eval_shape`
      of the real initialisers (`models.init_params`, `optim.make_optimizer(...).init` through
      `train_state.abstract_state`), each leaf divided by the mesh axes its sharding
      (`train_state.state_shardings`, the config's `mesh.rules`) splits it over. Exact.
  rollout batch: the train step's input (`RolloutBatch`), B = data.batch_size × step.group_size
      rows of P = data.max_prompt_tokens + L = sampling.max_new_tokens tokens, split over the
      batch axes. Exact.
  gradients: the float32 sum the step accumulates over micro-batches plus one micro-batch's
      gradient in the parameter dtype, both laid out like the parameters.
  activations: `layer_saved_bytes` / `activation_bytes` below, an analytic count of the tensors
      the backward pass reads (see their docstrings for the list and its assumptions), for a step
      that runs every row's prompt. The training loop runs a group's prompt once when its rollouts
      share it (`make_train_step(..., shared_prompts=True)`, GRPO with guides in the completion),
      which holds the prompt's activations once per group: for that step this is an upper bound.
  log-prob chunk: `logprob_chunk_bytes`, the [rows, chunk, V] float32 buffers of one chunk of the
      LM head (`models.token_logprobs` recomputes chunks in the backward).
  KV cache: `kv_cache_bytes`, a whole rollout round (or `sampling.chunk_rows` rows) of
      prompt + completion slots, heads split like the k/v projections (as XLA lays the cache out).
  prefill attention: `prefill_scores_bytes`, one layer's scores while the sampler prefills the
      longest prompt + guide.

A train step needs the resident state (parameters, reference, optimizer state, the rest of the
train state) plus its batch, gradients, activations and one log-prob chunk; a rollout round needs
the resident state plus the KV cache and the prefill's attention. The plan's peak is the larger
of the two. A plan fits when its peak leaves `--headroom` (10%) of the device free: XLA packs its
temporaries with holes between them and runtimes reserve memory (XLA:TPU reports both when it runs
out), and JAX on GPU preallocates only 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION is raised (e.g. .9).
`--search` finds the first layout that fits: FSDP over every device times the smallest tensor
axis, then the largest micro-batch.

Assumptions (tests/test_plan.py checks what the CPU backend can): the compiler recomputes a
rematerialised layer just before its backward (XLA:CPU does not); activations stay split over the
batch axes (the train step asks for that: `DecoderModel.activation_sharding`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import sys
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from g2rpo_jax import command_line, models, optim, sampling
from g2rpo_jax import sharding as sharding_lib
from g2rpo_jax import train_state as train_state_lib
from g2rpo_jax import train_step as train_step_lib
from g2rpo_jax.rollout_batch import RolloutBatch, batch_shardings, validate_layout

GIB = 1024**3

# ----------------------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class Target:
    """A device kind and how many of them: memory is per device, in bytes."""

    name: str
    num_devices: int
    memory_bytes: int
    source: str


# Sources.
# TPU v5p: the Cloud TPU v5p page (cloud.google.com/tpu/docs/v5p) lists 95 GB of HBM2e per chip
#   and names slices by TensorCores, two per chip: v5p-8 is the 2x2x1 topology of 4 chips, v5p-32
#   is 16 chips. XLA:TPU's own limit on v5p, printed in its out-of-memory message, is
#   "... of 95.74G hbm" (XLA prints binary units), so a chip is taken as 95.74 GiB.
# H100: the SXM 80 GB part ("NVIDIA H100 80GB HBM3"), for which nvidia-smi reports 81559 MiB
#   (79.65 GiB) in total; JAX preallocates 75% of it unless XLA_PYTHON_CLIENT_MEM_FRACTION is set.
V5P_CHIP_BYTES = int(95.74 * GIB)
H100_BYTES = 81_559 * 1024**2
TARGETS = {
    "tpu-v5p-8": Target("tpu-v5p-8", 4, V5P_CHIP_BYTES, "4 v5p chips (8 TensorCores), 95.74 GiB HBM2e each"),
    "tpu-v5p-32": Target("tpu-v5p-32", 16, V5P_CHIP_BYTES, "16 v5p chips (32 TensorCores), 95.74 GiB HBM2e each"),
    "8xh100": Target("8xh100", 8, H100_BYTES, "8 H100 SXM 80 GB, 81559 MiB each as nvidia-smi reports"),
}


def target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"--targets: {name!r} is not a known target; valid: {sorted(TARGETS)} (or give "
                         "--num_devices=N --device_memory_gib=M for another device)")
    return TARGETS[name]


# ----------------------------------------------------------------------------- model shapes

MODEL_SHAPES = models.QWEN3_SHAPES  # names accepted by --model_shape


def model_config(cfg: ml_collections.ConfigDict, model_shape: str = "", preset: str = "") -> models.ModelConfig:
    """The policy's architecture in `model.dtype`: a named shape (MODEL_SHAPES), else the config's
    random-init model, else `model.checkpoint`'s config.json (no weights are read). `preset` (the
    config's argument, e.g. 'qwen3_8b_math') only makes the error for a missing shape name its fix."""
    named = next((name for name in MODEL_SHAPES if preset.startswith(name.replace("-", "_").replace(".", "_"))), "")
    preset_hint = f"; for {preset}: --model_shape={named}" if named else ""
    dtype = models.resolve_dtype(cfg.model.dtype, "model.dtype").name
    if model_shape:
        if model_shape not in MODEL_SHAPES:
            raise ValueError(f"--model_shape={model_shape!r} is not known; valid: {sorted(MODEL_SHAPES)} "
                             "(or leave it empty to read --config.model.checkpoint's config.json)")
        return models.ModelConfig(**MODEL_SHAPES[model_shape], param_dtype=dtype, dtype=dtype)
    if cfg.model.random_init:
        architecture = cfg.model.get("random_init_architecture") or "Qwen3ForCausalLM"
        shape = models.tiny_config(architecture)
        if cfg.model.random_init_tokenizer:
            shape = models.tiny_config_for(models.load_tokenizer(cfg.model.random_init_tokenizer), architecture)
        return shape.replace(param_dtype=dtype, dtype=dtype)
    if not cfg.model.checkpoint:
        raise ValueError("the model's shape is unknown: pass --model_shape (one of "
                         f"{sorted(MODEL_SHAPES)}) or --config.model.checkpoint=DIR (its config.json is read)"
                         f"{preset_hint}")
    return models.read_config(cfg.model.checkpoint, dtype)


# ----------------------------------------------------------------------------- mesh


def parse_mesh_shape(text: str) -> dict[str, int]:
    """'data=1,fsdp=-1,tensor=2' -> {'data': 1, 'fsdp': -1, 'tensor': 2}; axes left out are 1."""
    sizes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"(\w+)=(-?\d+)", item)
        if not match or match.group(1) not in sharding_lib.MESH_AXES:
            raise ValueError(f"--mesh_shape: {item!r} is not AXIS=SIZE with AXIS one of {sharding_lib.MESH_AXES}; "
                             "e.g. --mesh_shape=data=1,fsdp=-1,tensor=2 (-1: the remaining devices)")
        size = int(match.group(2))
        if size == 0 or size < -1:
            raise ValueError(f"--mesh_shape: {item!r} has size {size}; valid: a positive integer or -1")
        sizes[match.group(1)] = size
    return {axis: sizes.get(axis, 1) for axis in sharding_lib.MESH_AXES}


def abstract_mesh(axis_sizes: Mapping[str, int], num_devices: int) -> AbstractMesh:
    """A ('data', 'fsdp', 'tensor') mesh of `num_devices` without devices; one size may be -1.
    Raises ValueError naming the sizes when they do not multiply to (or divide) the device count."""
    try:
        shape = sharding_lib.mesh_shape(axis_sizes, num_devices)
    except ValueError as error:
        raise ValueError(f"{error}; give --mesh_shape (or --config.mesh.mesh.*) sizes whose product is "
                         f"{num_devices}, or leave one axis at -1 and make the others divide {num_devices}") from None
    return AbstractMesh(shape, sharding_lib.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def split(dim: int, logical: str, mesh: AbstractMesh, rules) -> int:
    """How many ways a dimension of size `dim` with logical axis `logical` is split (1 when the
    rule's mesh axes do not divide it: `sharding.logical_to_mesh_spec` replicates it then)."""
    ways = sharding_lib.axis_size(mesh, dict(rules).get(logical))
    return ways if dim % ways == 0 else 1


# ----------------------------------------------------------------------------- exact parts


@functools.lru_cache(maxsize=16)
def param_shapes(model_cfg: models.ModelConfig):
    """(ShapeDtypeStructs of the parameters, their logical axes), traced once per architecture."""
    shapes = jax.eval_shape(lambda: models.init_params(model_cfg, jax.random.key(0)))
    return shapes, models.param_logical_axes(model_cfg)


def sharded_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` laid out by the matching tree of NamedShardings."""
    leaves, structure = jax.tree.flatten(tree)
    return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x, s in zip(leaves, structure.flatten_up_to(shardings)))


def abstract_batch(batch_rows: int, prompt_tokens: int, completion_tokens: int) -> RolloutBatch:
    """ShapeDtypeStructs of the train step's input."""
    field = jax.ShapeDtypeStruct
    rows, pair = (batch_rows,), (batch_rows, completion_tokens)
    return RolloutBatch(
        prompt_tokens=field((batch_rows, prompt_tokens), jnp.int32),
        prompt_mask=field((batch_rows, prompt_tokens), jnp.int32),
        completion_tokens=field(pair, jnp.int32), completion_mask=field(pair, jnp.int32),
        guided_mask=field(pair, jnp.int32), rewards=field(rows, jnp.float32), accuracy=field(rows, jnp.float32),
        old_logprobs=field(pair, jnp.float32), guided=field(rows, jnp.int32), problem_ids=field(rows, jnp.int32))


# ----------------------------------------------------------------------------- analytic parts


@dataclasses.dataclass(frozen=True)
class LayerDims:
    """One device's share of a decoder layer's activations: E the residual width (never split),
    H query heads, K KV heads, D head dim, F MLP width, each divided by the tensor axis where the
    sharding rules split it; qk_norm: Qwen3's per-head RMSNorm of queries and keys."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    qk_norm: bool


def layer_saved_bytes(rows: int, tokens: int, dims: LayerDims, compute_bytes: int) -> int:
    """Bytes one decoder layer keeps for its backward pass: rows × T tokens, no rematerialisation.

    The tensors are those JAX's autodiff saves for `models.decoder.DecoderLayer`
    (`jax._src.ad_checkpoint.saved_residuals` lists them) after XLA merges duplicates; c is the
    compute dtype's size, and norms, softmax and the scores are float32 (4 bytes):
      two RMSNorms on [T, E]:          the float32 input, its normalised and its scaled copy in c
      query/key RMSNorm on [T, (H+K)D]: the float32 input and the normalised copy in c
      rotated q, k and v [T, (H+2K)D] and the attention output [T, HD], in c
      softmax on [H, T, T]:            the float32 exponentials and the probabilities in c
      MLP:                              gate, up, sigmoid(gate), silu(gate) and silu(gate)·up, [T, F] each in c
      statistics:                       two float32 per token for each norm (per head for the q/k
                                       norms) and per head for the softmax (sums, reciprocals)
    In float32 these are exactly the buffers XLA:CPU keeps per layer (read from its live-range
    dump; tests/test_plan.py compares the totals with its compiled memory analysis).
    """
    e, h, k, d, f, c = dims.hidden, dims.heads, dims.kv_heads, dims.head_dim, dims.mlp, compute_bytes
    per_token = (
        2 * e * (4 + 2 * c)
        + ((h + k) * d * (4 + c) if dims.qk_norm else 0)
        + (h + 2 * k) * d * c + h * d * c
        + 5 * f * c
        + 2 * 4 * (2 + ((h + k) if dims.qk_norm else 0) + h)
    )
    softmax = h * tokens * tokens * (4 + c)
    return rows * (tokens * per_token + softmax)


def activation_bytes(rows: int, tokens: int, num_layers: int, dims: LayerDims, compute_bytes: int,
                     remat: bool) -> int:
    """Activation bytes of one micro-batch's forward and backward on one device.

    Without remat every layer's saved tensors are alive when the backward starts. The peak comes
    inside the last layer's attention backward: by then that layer has released its MLP tensors
    and its softmax tensors, and holds the gradients of the scores instead (`[H, T, T]` float32
    and their transposed copy, as many bytes as the softmax tensors they replace), so the peak is
    the saved tensors of all layers, less at most one layer's MLP share.
    With remat (`step.remat`, `nn.remat` per layer) only each layer's input [T, E] in c is saved
    and the backward recomputes one layer at a time: the layer inputs plus one layer's saved
    tensors. That assumes the compiler recomputes a layer just before its backward, as a
    memory-aware scheduler does; XLA:CPU does not (it hoists every recomputation ahead of the
    first layer's backward), so on CPU the no-remat figure applies either way.
    """
    layer = layer_saved_bytes(rows, tokens, dims, compute_bytes)
    if not remat:
        return num_layers * layer
    return num_layers * rows * tokens * dims.hidden * compute_bytes + layer


def logprob_chunk_bytes(rows: int, chunk: int, completion_tokens: int, vocab: int) -> int:
    """Float32 [rows, chunk, V] buffers of one chunk of the LM head in the backward: the logits,
    the softmax and the logits' gradient (the chunk is recomputed there, `models.token_logprobs`)."""
    return 3 * rows * min(chunk, completion_tokens) * vocab * 4


def kv_cache_bytes(rows: int, tokens: int, num_layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Keys and values of every layer: rows × tokens × layers × 2 × K × D × dtype bytes."""
    return rows * tokens * num_layers * 2 * kv_heads * head_dim * dtype_bytes


def prefill_scores_bytes(rows: int, prefill_tokens: int, cache_slots: int, heads: int, compute_bytes: int) -> int:
    """One layer's attention during the sampler's prefill: float32 scores and the probabilities
    in c, [H, T_prefill, S] each row, S the cache slots the prefill attends over."""
    return rows * heads * prefill_tokens * cache_slots * (4 + compute_bytes)


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of each part, and the layout they follow."""

    mesh: dict  # axis -> size
    batch_rows: int  # B
    micro_rows: int  # rows of one micro-batch on one device
    prompt_tokens: int
    completion_tokens: int
    remat: bool
    params: int
    reference: int
    optimizer: int
    other_state: int
    batch: int
    gradients: int
    activations: int  # with the config's remat setting
    activations_other: int  # with the other setting (not in the totals)
    logprob_chunk: int
    kv_cache: int
    kv_rows: int  # rows of one sampler call on one device
    prefill_scores: int
    device_memory: Optional[int] = None  # bytes per device
    headroom: float = 0.0  # fraction of device_memory kept free (fragmentation, runtime reservations)

    @property
    def resident(self) -> int:
        """What stays on the device through the whole step: parameters, reference, optimizer state."""
        return self.params + self.reference + self.optimizer + self.other_state

    @property
    def train_step(self) -> int:
        return self.resident + self.batch + self.gradients + self.activations + self.logprob_chunk

    @property
    def rollout(self) -> int:
        return self.resident + self.kv_cache + self.prefill_scores

    @property
    def peak(self) -> int:
        return max(self.train_step, self.rollout)

    @property
    def usable(self) -> Optional[int]:
        return None if self.device_memory is None else int(self.device_memory * (1 - self.headroom))

    @property
    def fits(self) -> Optional[bool]:
        return None if self.device_memory is None else self.peak <= self.usable


def step_layout(cfg: ml_collections.ConfigDict, mesh: AbstractMesh) -> tuple[int, int]:
    """(B rows, rows of one micro-batch per device), checked like the train step."""
    rules = tuple(cfg.mesh.rules)
    batch_rows = cfg.data.batch_size * cfg.step.group_size
    num_micro = validate_layout(batch_rows, cfg.step.group_size, cfg.step.micro_batch_size, mesh, rules)
    shards = sharding_lib.batch_axis_size(mesh, rules)
    return batch_rows, batch_rows // num_micro // shards


def layer_dims(model_cfg: models.ModelConfig, mesh: AbstractMesh, rules) -> LayerDims:
    """One device's share of a layer: heads and MLP width split where the rules split their weights."""
    heads, kv_heads, head_dim = model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.head_dim
    return LayerDims(
        hidden=model_cfg.hidden_size,
        heads=heads // split(heads * head_dim, "q_heads", mesh, rules),
        kv_heads=kv_heads // split(kv_heads * head_dim, "kv_heads", mesh, rules),
        head_dim=head_dim,
        mlp=model_cfg.intermediate_size // split(model_cfg.intermediate_size, "mlp", mesh, rules),
        qk_norm=bool(model_cfg.qk_norm),
    )


def sampler_prefill(cfg: ml_collections.ConfigDict, call_rows: int, shards: int) -> tuple[int, int, int]:
    """(prefill rows per device, prefill tokens, cache slots) of the sampler's longest prefill.

    The sampler prefills each distinct prompt + guide once (a group's rollouts share them) over a
    power-of-two bucket of their length, into a cache sized for the first decode phase
    (`sampling.bucket_length`, `sampling.decode_phase_ends`)."""
    guided = cfg.guidance.mode != "none" and float(cfg.guidance.alpha) > 0
    longest = int(cfg.data.max_prompt_tokens) + (int(cfg.guidance.max_length) if guided else 0)
    prefill_tokens = sampling.bucket_length(longest)
    max_new = int(cfg.sampling.max_new_tokens)
    slots = prefill_tokens + sampling.decode_phase_ends(max_new)[0] - 1
    prompts = -(-call_rows // int(cfg.step.group_size))
    return -(-prompts // shards), prefill_tokens, slots


def make_plan(cfg: ml_collections.ConfigDict, model_cfg: models.ModelConfig, mesh: AbstractMesh,
              device_memory: Optional[int] = None, headroom: float = 0.0) -> MemoryPlan:
    """The memory plan of training `model_cfg` with config `cfg` on `mesh` (abstract or real);
    `device_memory` (bytes) and `headroom` (the fraction of it kept free) decide `fits`.

    Raises ValueError when the batch does not split into the mesh's batch shards and micro-batches
    (the train step's own check, naming the valid micro_batch_size values)."""
    rules = tuple(cfg.mesh.rules)
    batch_rows, micro_rows = step_layout(cfg, mesh)
    prompt, completion = int(cfg.data.max_prompt_tokens), int(cfg.sampling.max_new_tokens)
    optimizer = optim.make_optimizer(cfg.optim)
    # The per-problem schedule arrays are replicated and small; their size is not planned.
    num_problems = 1 if cfg.guidance.per_problem else None
    params, logical_axes = param_shapes(model_cfg)
    state = train_state_lib.abstract_state(params, optimizer, cfg.guidance, num_problems)
    shardings = train_state_lib.state_shardings(state, optimizer, mesh, logical_axes, rules)
    param_bytes = sharded_bytes(state.params, shardings.params)
    other = sum(sharded_bytes(getattr(state, name), getattr(shardings, name)) for name in ("step", "guidance", "rng"))
    f32_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), state.params)
    compute_bytes = np.dtype(model_cfg.compute_dtype).itemsize
    dims = layer_dims(model_cfg, mesh, rules)
    tokens = prompt + completion
    remat = bool(cfg.step.remat)
    activations = {flag: activation_bytes(micro_rows, tokens, model_cfg.num_layers, dims, compute_bytes, flag)
                   for flag in (False, True)}
    vocab = model_cfg.vocab_size // split(model_cfg.vocab_size, "vocab", mesh, rules)
    shards = sharding_lib.batch_axis_size(mesh, rules)
    call_rows = min(cfg.sampling.get("chunk_rows", 0) or batch_rows, batch_rows)
    kv_rows = -(-call_rows // shards)
    sampler_bytes = np.dtype(models.resolve_dtype(cfg.sampling.get("dtype", "") or model_cfg.dtype)).itemsize
    prefill_rows, prefill_tokens, slots = sampler_prefill(cfg, call_rows, shards)
    return MemoryPlan(
        mesh=dict(mesh.shape), batch_rows=batch_rows, micro_rows=micro_rows, prompt_tokens=prompt,
        completion_tokens=completion, remat=remat,
        params=param_bytes,
        reference=param_bytes if train_step_lib.uses_reference(cfg.step) else 0,
        optimizer=sharded_bytes(state.opt_state, shardings.opt_state),
        other_state=other,
        batch=sharded_bytes(abstract_batch(batch_rows, prompt, completion), batch_shardings(mesh, rules)),
        gradients=sharded_bytes(f32_params, shardings.params) + param_bytes,
        activations=activations[remat], activations_other=activations[not remat],
        logprob_chunk=logprob_chunk_bytes(micro_rows, int(cfg.step.logprob_chunk_size), completion, vocab),
        kv_cache=kv_cache_bytes(kv_rows, tokens, model_cfg.num_layers, dims.kv_heads, dims.head_dim, sampler_bytes),
        kv_rows=kv_rows,
        prefill_scores=prefill_scores_bytes(prefill_rows, prefill_tokens, slots, dims.heads, sampler_bytes),
        device_memory=device_memory, headroom=headroom,
    )


# ----------------------------------------------------------------------------- layouts


def candidate_meshes(num_devices: int, model_cfg: models.ModelConfig) -> list[dict[str, int]]:
    """FSDP over every device times a tensor-parallel axis that divides the devices and the heads
    (query and KV), smallest tensor axis first: less tensor parallelism means fewer collectives."""
    meshes = []
    for tensor in range(1, num_devices + 1):
        if num_devices % tensor or model_cfg.num_kv_heads % tensor or model_cfg.num_heads % tensor:
            continue
        meshes.append({"data": 1, "fsdp": num_devices // tensor, "tensor": tensor})
    return meshes


def micro_batch_options(cfg: ml_collections.ConfigDict, mesh: AbstractMesh) -> list[int]:
    """Valid step.micro_batch_size values on `mesh`, largest first (fewer accumulation steps)."""
    batch_rows = cfg.data.batch_size * cfg.step.group_size
    unit = sharding_lib.batch_axis_size(mesh, tuple(cfg.mesh.rules)) * cfg.step.group_size
    return [m for m in range(batch_rows, 0, -unit) if m % unit == 0 and batch_rows % m == 0]


def search_layout(cfg: ml_collections.ConfigDict, model_cfg: models.ModelConfig, num_devices: int,
                  device_memory: int, headroom: float = 0.0) -> Optional[tuple[dict, int, MemoryPlan]]:
    """(mesh sizes, micro_batch_size, plan) of the first layout that fits `device_memory` with
    `headroom`: the smallest tensor axis, then the largest micro-batch; None when none fits."""
    for sizes in candidate_meshes(num_devices, model_cfg):
        mesh = abstract_mesh(sizes, num_devices)
        for micro in micro_batch_options(cfg, mesh):
            trial = ml_collections.ConfigDict(cfg.to_dict())
            trial.step.micro_batch_size = micro
            plan = make_plan(trial, model_cfg, mesh, device_memory, headroom)
            if plan.fits:
                return sizes, micro, plan
    return None


# ----------------------------------------------------------------------------- report


def gib(n: int) -> str:
    return f"{n / GIB:8.2f}"


def describe_mesh(sizes: Mapping[str, int]) -> str:
    return " ".join(f"{axis}={size}" for axis, size in sizes.items())


def verdict(plan: MemoryPlan) -> str:
    if plan.device_memory is None:
        return ""
    limit = f"{plan.usable / GIB:.2f} GiB usable ({plan.device_memory / GIB:.2f} less {plan.headroom:.0%} headroom)"
    margin = plan.usable - plan.peak
    return (f" of {limit}: fits, {margin / GIB:.2f} GiB to spare" if margin >= 0
            else f" of {limit}: does NOT fit, short by {-margin / GIB:.2f} GiB")


def format_plan(plan: MemoryPlan, title: str) -> str:
    """A table of the plan in GiB per device."""
    other_remat = "without remat" if plan.remat else "with remat"
    rows = [
        ("parameters (policy)", plan.params),
        ("parameters (reference, beta > 0)", plan.reference),
        ("optimizer state", plan.optimizer),
        ("rest of the train state", plan.other_state),
        ("rollout batch", plan.batch),
        ("gradients (f32 sum + micro-batch)", plan.gradients),
        (f"activations ({'remat' if plan.remat else 'no remat'}, as configured)", plan.activations),
        ("log-prob chunk", plan.logprob_chunk),
        ("= train step", plan.train_step),
        (f"KV cache ({plan.kv_rows} rows)", plan.kv_cache),
        ("prefill attention (one layer)", plan.prefill_scores),
        ("= rollout round", plan.rollout),
    ]
    lines = [title,
             f"  mesh {describe_mesh(plan.mesh)} · batch {plan.batch_rows} rows · micro-batch {plan.micro_rows} "
             f"rows per device · tokens {plan.prompt_tokens} + {plan.completion_tokens}",
             f"  {'GiB per device':<46}"]
    lines += [f"  {name:<46}{gib(value)}" for name, value in rows]
    lines.append(f"  {'(activations ' + other_remat + ', not in the total)':<46}{gib(plan.activations_other)}")
    lines.append(f"  {'peak':<46}{gib(plan.peak)}{verdict(plan)}")
    return "\n".join(lines)


MARKDOWN_HEADER = ("| preset | target | layout | mesh | micro_batch_size | rows per device | resident GiB "
                   "| train step GiB | rollout GiB | usable GiB | fits |\n"
                   "|---|---|---|---|---|---|---|---|---|---|---|")


def markdown_row(preset: str, target_name: str, layout: str, micro: int, plan: MemoryPlan) -> str:
    fits = "—" if plan.fits is None else ("yes" if plan.fits else "**no**")
    usable = "—" if plan.usable is None else f"{plan.usable / GIB:.1f}"
    return (f"| {preset} | {target_name} | {layout} | {describe_mesh(plan.mesh)} | {micro} | {plan.micro_rows} | "
            f"{plan.resident / GIB:.1f} | {plan.train_step / GIB:.1f} | {plan.rollout / GIB:.1f} | {usable} | {fits} |")


# ----------------------------------------------------------------------------- command line

# Memory kept free when deciding what fits: XLA packs its temporaries with holes between them
# (6-15% of the temporaries on XLA:CPU in tests/test_plan.py; XLA:TPU reports its own figure when it
# runs out) and runtimes reserve some memory. A margin, not a measured figure for any accelerator.
DEFAULT_HEADROOM = 0.10

USAGE = ("python -m g2rpo_jax.plan --config=experiments/configs/g2rpo.py:<preset>[,<method>] "
         "[--model_shape=qwen3-1.7b] [--targets=tpu-v5p-8,...] [--mesh_shape=data=1,fsdp=-1,tensor=1] "
         "[--num_devices=N] [--device_memory_gib=G] [--search] [--markdown] [--config.<key>=<value> ...]")
PROGRAM = "python -m g2rpo_jax.plan"


def devices_to_plan(targets: Sequence[str], num_devices: int, device_memory_gib: float) -> list[Target]:
    """The named targets, or one custom device count; --device_memory_gib overrides the memory."""
    memory = int(device_memory_gib * GIB) if device_memory_gib else None
    if device_memory_gib < 0:
        raise ValueError(f"--device_memory_gib={device_memory_gib} is not valid; valid: a number > 0")
    if num_devices:
        if num_devices < 1:
            raise ValueError(f"--num_devices={num_devices} is not valid; valid: an integer >= 1")
        return [Target(f"{num_devices} device{'s' if num_devices > 1 else ''}", num_devices, memory, "--num_devices")]
    chosen = [target(name) for name in targets]
    return [dataclasses.replace(t, memory_bytes=memory) if memory else t for t in chosen]


def _row(preset: str, device: str, layout: str, mesh: Mapping[str, int], micro: int, verdict_text: str) -> str:
    """A Markdown row without a plan: the layout and why it has no numbers."""
    dashes = " — |" * 5
    return f"| {preset} | {device} | {layout} | {describe_mesh(mesh)} | {micro} |{dashes} {verdict_text} |"


def report(cfg: ml_collections.ConfigDict, model_cfg: models.ModelConfig, devices: Sequence[Target], *,
           mesh_sizes: Mapping[str, int], search: bool = False, markdown: bool = False, label: str = "",
           preset: str = "", headroom: float = 0.0) -> str:
    """The text the command prints: the plan of the configured layout on each target and, with
    `search`, the first layout that fits (`search_layout`). A configured micro-batch that does not
    split over a target's batch shards is reported on that target's line with the valid values."""
    out = [MARKDOWN_HEADER] if markdown else [label]
    micro = int(cfg.step.micro_batch_size)
    for device in devices:
        mesh = abstract_mesh(mesh_sizes, device.num_devices)
        try:
            plan = make_plan(cfg, model_cfg, mesh, device.memory_bytes, headroom)
        except ValueError as error:  # e.g. a micro-batch sized for another device count
            unit = sharding_lib.batch_axis_size(mesh, tuple(cfg.mesh.rules)) * cfg.step.group_size
            out.append(_row(preset, device.name, "configured", mesh.shape, micro,
                            f"no: micro_batch_size must be a multiple of {unit} here") if markdown
                       else f"on {device.name}: the configured layout is not valid here ({error})"
                            + ("" if search else "; --search finds a layout that fits"))
        else:
            out.append(markdown_row(preset, device.name, "configured", micro, plan) if markdown
                       else format_plan(plan, f"on {device.name} ({device.source}):"))
        if not search or device.memory_bytes is None:
            continue
        found = search_layout(cfg, model_cfg, device.num_devices, device.memory_bytes, headroom)
        if found is None:
            out.append(_row(preset, device.name, "searched", {}, 0, "none fits") if markdown
                       else f"on {device.name}: no layout of FSDP x tensor parallelism fits; shorten "
                            "sampling.max_new_tokens or set sampling.chunk_rows")
            continue
        sizes, found_micro, best = found
        flags_text = (f"--mesh_shape={','.join(f'{a}={n}' for a, n in sizes.items())} "
                      f"--config.step.micro_batch_size={found_micro}")
        out.append(markdown_row(preset, device.name, "searched", found_micro, best) if markdown
                   else format_plan(best, f"first layout that fits {device.name}: {flags_text}"))
    return "\n".join(out)


def _preset(argv: Sequence[str]) -> str:
    spec = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), "")
    return spec.partition(":")[2] or spec


def _model_label(model_cfg: models.ModelConfig, model_shape: str) -> str:
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(model_cfg)[0]))
    count = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"
    return f"{model_shape or model_cfg.architecture}: {count} parameters in {model_cfg.param_dtype}"


def _define_flags(flag_values, argv: Sequence[str]) -> dict:
    from absl import flags  # noqa: PLC0415 (only the command line needs absl)
    from ml_collections import config_flags  # noqa: PLC0415

    fv = dict(flag_values=flag_values)
    return dict(
        config=config_flags.DEFINE_config_file("config", None, command_line.config_file_help(USAGE),
                                               lock_config=True, sys_argv=list(argv), **fv),
        model_shape=flags.DEFINE_string("model_shape", "", f"a named model shape, one of {sorted(MODEL_SHAPES)}; "
                                        "'' reads --config.model.checkpoint's config.json", **fv),
        targets=flags.DEFINE_list("targets", list(TARGETS), f"named targets, from {sorted(TARGETS)}", **fv),
        mesh_shape=flags.DEFINE_string("mesh_shape", "", "e.g. data=1,fsdp=-1,tensor=2 (replaces the config's "
                                       "mesh.mesh; axes left out are 1)", **fv),
        num_devices=flags.DEFINE_integer("num_devices", 0, "plan for this many devices instead of --targets", **fv),
        device_memory_gib=flags.DEFINE_float("device_memory_gib", 0.0, "memory per device in GiB (overrides "
                                             "the targets')", **fv),
        headroom=flags.DEFINE_float("headroom", DEFAULT_HEADROOM, "fraction of device memory kept free for "
                                    "XLA's fragmentation and runtime reservations when deciding what fits", **fv),
        search=flags.DEFINE_bool("search", False, "also find the first layout (tensor axis, micro-batch) that "
                                 "fits", **fv),
        markdown=flags.DEFINE_bool("markdown", False, "print Markdown table rows instead of full tables", **fv),
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status (2 with one line on stderr for a bad flag or value)."""
    from absl import flags, logging  # noqa: PLC0415

    argv = list(sys.argv if argv is None else argv)
    flag_values = flags.FlagValues()
    defined = _define_flags(flag_values, argv)
    if command_line.wants_help(argv):
        flag_lines = [f"  --{name}: {flag_values[name].help}" for name in defined if name != "config"]
        print(f"usage: {USAGE}\n\n{__doc__}\nflags:\n  --config: a training config, experiments/configs/"
              "<file>.py:<preset>[,<method>], then --config.<key>=<value> overrides (its presets: python -m "
              "g2rpo_jax.train --help)\n" + "\n".join(flag_lines))
        return 0
    try:
        flag_values(argv)
        cfg = defined["config"].value
        if cfg is not None:
            cfg.keys()  # ml_collections reports a config file it could not read on first use
    except (flags.Error, KeyError, AttributeError, ValueError, OSError) as error:
        print(command_line.flag_error_message(PROGRAM, error, argv, None), file=sys.stderr)
        return 2
    logging.set_verbosity(logging.WARNING)  # jax logs its search for accelerators at INFO
    value = {name: flag.value for name, flag in defined.items()}
    try:
        if cfg is None:
            raise ValueError("--config is required, e.g. --config=experiments/configs/g2rpo.py:qwen3_1_7b_math "
                             "--model_shape=qwen3-1.7b")
        if not 0 <= value["headroom"] < 1:
            raise ValueError(f"--headroom={value['headroom']} is not valid; valid: a fraction in [0, 1)")
        preset = _preset(argv)
        model_cfg = model_config(cfg, value["model_shape"], preset)
        sizes = parse_mesh_shape(value["mesh_shape"]) if value["mesh_shape"] else dict(cfg.mesh.mesh)
        devices = devices_to_plan(value["targets"], value["num_devices"], value["device_memory_gib"])
        print(report(cfg, model_cfg, devices, mesh_sizes=sizes, search=value["search"], markdown=value["markdown"],
                     label=f"{preset} ({_model_label(model_cfg, value['model_shape'])})", preset=preset,
                     headroom=value["headroom"]))
    except ValueError as error:  # our messages name the flag or key, the bad value and the fix
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

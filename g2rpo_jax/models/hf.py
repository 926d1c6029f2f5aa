"""Hugging Face checkpoint directories in and out: config.json + (sharded) safetensors.

Loading is lazy: each tensor is read from a memory map and, when a mesh is given, each device
receives only its own slice (`jax.make_array_from_callback`), so no full host copy of a large
model is ever made.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from g2rpo_jax import sharding as sharding_lib
from g2rpo_jax.models import safetensors_io
from g2rpo_jax.models.config import ModelConfig, config_from_hf, config_to_hf, resolve_dtype
from g2rpo_jax.models.decoder import init_params, param_logical_axes
from g2rpo_jax.paths import relative_hint

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


def _linear_names(hf: str, ours: tuple[str, ...], bias: bool) -> Iterator[tuple[str, tuple[str, ...], bool]]:
    yield f"{hf}.weight", (*ours, "kernel"), True
    if bias:
        yield f"{hf}.bias", (*ours, "bias"), False


def hf_tensor_names(cfg: ModelConfig) -> Iterator[tuple[str, tuple[str, ...], bool]]:
    """(hf name, our param path, transpose?) for every tensor of the model, following the family
    flags: q/k/v/o and MLP biases, q_norm / k_norm.

    Linear weights are stored [out, in] by PyTorch and [in, out] here, hence the transposes.
    """
    yield "model.embed_tokens.weight", ("embedding",), False
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head",), True
    yield "model.norm.weight", ("norm", "scale"), False
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", f"layers_{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield f"{hf}.{norm}.weight", (ours, norm, "scale"), False
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            bias = cfg.o_proj_bias if proj == "o_proj" else cfg.qkv_bias
            yield from _linear_names(f"{hf}.self_attn.{proj}", (ours, "self_attn", proj), bias)
        if cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                yield f"{hf}.self_attn.{norm}.weight", (ours, "self_attn", norm, "scale"), False
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield from _linear_names(f"{hf}.mlp.{proj}", (ours, "mlp", proj), cfg.mlp_bias)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def read_config(path: str, dtype: Any = jnp.float32) -> ModelConfig:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path!r} is not a Hugging Face model directory: {config_path} is missing"
                         f"{relative_hint(path)}")
    with open(config_path) as f:
        return config_from_hf(json.load(f), dtype)


def _open_tensor_files(path: str) -> dict[str, safetensors_io.SafetensorsFile]:
    """name -> the file holding it, for single-file and index-sharded checkpoints."""
    index_path = os.path.join(path, _INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = {name: safetensors_io.SafetensorsFile(os.path.join(path, name)) for name in set(weight_map.values())}
        return {tensor: files[file] for tensor, file in weight_map.items()}
    single = os.path.join(path, _SINGLE_FILE)
    if not os.path.isfile(single):
        raise ValueError(f"{path!r} has neither {_SINGLE_FILE} nor {_INDEX_FILE}")
    opened = safetensors_io.SafetensorsFile(single)
    return {name: opened for name in opened.keys()}


def load_hf(
    path: str,
    dtype: Any = jnp.float32,
    mesh: Optional[Mesh] = None,
    rules=sharding_lib.DEFAULT_RULES,
):
    """Loads (cfg, params) from a Hugging Face directory of a supported family (Qwen3, Qwen2 /
    Qwen2.5, Llama 3; the family comes from config.json, see `families`).

    dtype: parameter and compute dtype (float32 or bfloat16). With a mesh, each parameter is created
    directly with its NamedSharding from the logical-axis rules.
    """
    cfg = read_config(path, dtype)
    target_dtype = resolve_dtype(dtype)
    files = _open_tensor_files(path)
    expected = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    logical = param_logical_axes(cfg) if mesh is not None else None
    params: dict = {}
    for name, ours, transpose in hf_tensor_names(cfg):
        if name not in files:
            raise ValueError(f"{path}: tensor {name!r} (for {'/'.join(ours)}) is missing from the checkpoint")
        stored = files[name].tensor(name)
        host = stored.T if transpose else stored
        want = _get(expected, ours).shape
        if host.shape != want:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {stored.shape} but the config implies "
                f"{want[::-1] if transpose else want} (for {'/'.join(ours)})"
            )
        _set(params, ours, _place(host, target_dtype, mesh, logical and _get(logical, ours), rules))
    return cfg, params


def _place(host: np.ndarray, dtype, mesh: Optional[Mesh], logical: Optional[PartitionSpec], rules) -> jax.Array:
    if mesh is None:
        return jnp.asarray(np.asarray(host).astype(dtype))
    spec = sharding_lib.logical_to_mesh_spec(logical, host.shape, mesh, rules)
    target = NamedSharding(mesh, spec)
    # Each device reads only its slice of the memory map.
    return jax.make_array_from_callback(host.shape, target, lambda index: np.asarray(host[index]).astype(dtype))


def save_hf(path: str, cfg: ModelConfig, params, dtype: Any = None, max_shard_bytes: int = 4 << 30) -> None:
    """Writes config.json + safetensors that transformers' class for `cfg.architecture`
    (Qwen3ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM) loads with from_pretrained.

    Large models are split into several files with a model.safetensors.index.json.
    """
    dtype = resolve_dtype(dtype or cfg.param_dtype)
    os.makedirs(path, exist_ok=True)
    for stale in os.listdir(path):  # a previous save with another sharding must not shadow this one
        if stale == _INDEX_FILE or (stale.startswith("model") and stale.endswith(".safetensors")):
            os.remove(os.path.join(path, stale))
    names = list(hf_tensor_names(cfg))

    def host_tensor(ours, transpose):
        array = np.asarray(jax.device_get(_get(params, ours))).astype(dtype)
        return array.T if transpose else array

    nbytes = dtype.itemsize
    sizes = [(name, int(np.prod(_get(params, ours).shape)) * nbytes) for name, ours, _ in names]
    groups = safetensors_io.shard_names(sizes, max_shard_bytes)
    lookup = {name: (ours, transpose) for name, ours, transpose in names}
    weight_map = {}
    for i, group in enumerate(groups):
        file = _SINGLE_FILE if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        safetensors_io.write(os.path.join(path, file), {name: host_tensor(*lookup[name]) for name in group})
        weight_map.update({name: file for name in group})
    if len(groups) > 1:
        total = sum(size for _, size in sizes)
        with open(os.path.join(path, _INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, dtype), f, indent=2)

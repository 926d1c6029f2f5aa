"""Decoder hyper-parameters (Qwen3, Qwen2 / Qwen2.5, Llama 3), read from and written to Hugging Face
`config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

from g2rpo_jax.models import families
from g2rpo_jax.models.families import SUPPORTED_ARCHITECTURES
from g2rpo_jax.models.rope import Llama3RopeScaling

SUPPORTED_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SUPPORTED_ROPE_TYPES = ("default", "llama3")

__all__ = ["QWEN3_SHAPES", "SUPPORTED_ARCHITECTURES", "SUPPORTED_DTYPES", "Llama3RopeScaling", "ModelConfig",
           "Qwen3Config", "config_from_hf", "config_to_hf", "resolve_dtype"]

# `ModelConfig` fields of the Qwen3 releases (config.json of Qwen/Qwen3-0.6B, -1.7B, -8B), for
# plans and benchmarks that need a real model's shape but no checkpoint.
_QWEN3 = dict(vocab_size=151_936, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
              max_position_embeddings=40_960, architecture="Qwen3ForCausalLM")
QWEN3_SHAPES = {
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
                       num_kv_heads=8, tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
                       num_kv_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                     num_kv_heads=8, tie_word_embeddings=False),
}


def resolve_dtype(dtype: Any, name: str = "dtype") -> jnp.dtype:
    """Maps 'float32' / 'bfloat16' / jnp dtypes to a jnp dtype, refusing anything else."""
    key = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if key not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}={dtype!r} is not supported; use one of {sorted(SUPPORTED_DTYPES)}")
    return jnp.dtype(SUPPORTED_DTYPES[key])


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static architecture description; hashable so it can be a jit static argument.

    `architecture` names the family (a transformers class, see `families`); the family flags
    (qk_norm, qkv_bias, o_proj_bias, mlp_bias) left as None take that family's values, and flags
    its config.json could not express are refused. `rope_scaling` None is default RoPE.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40_960
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Parameters are stored in `param_dtype`; matmuls run in `dtype`. Norms, softmax and RoPE
    # tables are always computed in float32.
    param_dtype: str = "float32"
    dtype: str = "float32"
    architecture: str = "Qwen3ForCausalLM"
    qk_norm: Optional[bool] = None  # RMSNorm over each query / key head before RoPE
    qkv_bias: Optional[bool] = None  # biases on q_proj / k_proj / v_proj
    o_proj_bias: Optional[bool] = None  # bias on o_proj
    mlp_bias: Optional[bool] = None  # biases on gate_proj / up_proj / down_proj
    rope_scaling: Optional[Llama3RopeScaling] = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        resolve_dtype(self.param_dtype, "param_dtype")
        resolve_dtype(self.dtype, "dtype")
        family = families.family_of(self.architecture)
        flags = families.complete_flags(family, {flag: getattr(self, flag) for flag in families.FLAGS})
        for flag, value in flags.items():
            object.__setattr__(self, flag, value)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return resolve_dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return resolve_dtype(self.param_dtype)

    def replace(self, **changes) -> "ModelConfig":
        """A copy with `changes`; a new `architecture` brings its family's flags unless given too."""
        if changes.get("architecture", self.architecture) != self.architecture:
            for flag in families.FLAGS:
                changes.setdefault(flag, None)
        return dataclasses.replace(self, **changes)


# The name the config had while Qwen3 was the only family; callers and tests still use it.
Qwen3Config = ModelConfig


def _required(params: dict, key: str, rope_type: str):
    if params.get(key) is None:
        raise ValueError(f"rope_type={rope_type!r} in config.json needs {key}; it is missing")
    return params[key]


def _rope_settings(hf: dict) -> tuple[float, Optional[Llama3RopeScaling]]:
    """(theta, llama3 scaling or None). transformers 5 nests everything in `rope_parameters`; older
    configs carry `rope_theta` at the top and the scaling in `rope_scaling`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r} in config.json is not supported; valid: {SUPPORTED_ROPE_TYPES}")
    partial = params.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} in config.json is not supported; valid: 1.0")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ValueError("config.json has neither rope_parameters.rope_theta nor rope_theta")
    if rope_type == "default":
        return float(theta), None
    factors = {key: float(_required(params, key, rope_type))
               for key in ("factor", "low_freq_factor", "high_freq_factor")}
    # As transformers reads it: a top-level original_max_position_embeddings wins over the nested one,
    # and max_position_embeddings stands in for both when neither is given.
    context = (hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
               or _required(hf, "max_position_embeddings", rope_type))
    return float(theta), Llama3RopeScaling(**factors, original_max_position_embeddings=int(context))


def _check_supported_attention(hf: dict, family: families.Family) -> None:
    """Refuses what the decoder does not implement: sliding-window layers and other activations."""
    if hf.get("use_sliding_window"):
        raise ValueError(
            f"use_sliding_window=true in config.json ({family.architecture}) is not supported; valid: false "
            "(every layer attends over the whole sequence)"
        )
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(f"layer_types={sorted(layer_types)} in config.json is not supported; valid: full_attention")
    activation = hf.get("hidden_act", "silu")
    if activation != "silu":
        raise ValueError(f"hidden_act={activation!r} in config.json is not supported; valid: 'silu'")


def config_from_hf(hf: dict, dtype: Any = "float32") -> ModelConfig:
    """Builds a ModelConfig from a parsed Hugging Face config.json of a supported family."""
    family = families.family_from_hf(hf)
    _check_supported_attention(hf, family)
    theta, scaling = _rope_settings(hf)
    name = resolve_dtype(dtype).name
    eos = hf.get("eos_token_id")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        rope_theta=theta,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 40_960),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
        param_dtype=name,
        dtype=name,
        architecture=family.architecture,
        rope_scaling=scaling,
        **families.family_flags(family, hf.get("attention_bias", False), hf.get("mlp_bias", False)),
    )


def _rope_parameters(cfg: ModelConfig) -> dict:
    if cfg.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **dataclasses.asdict(cfg.rope_scaling)}


def config_to_hf(cfg: ModelConfig, dtype: Any = None) -> dict:
    """The config.json that transformers' class for `cfg.architecture` expects."""
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    family = families.family_of(cfg.architecture)
    return {
        **families.family_hf_keys(family, {flag: getattr(cfg, flag) for flag in families.FLAGS}),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": _rope_parameters(cfg),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
        "dtype": resolve_dtype(dtype or cfg.param_dtype).name,
    }

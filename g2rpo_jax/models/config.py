"""Qwen3 architecture hyper-parameters, read from and written to Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)
SUPPORTED_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype: Any, name: str = "dtype") -> jnp.dtype:
    """Maps 'float32' / 'bfloat16' / jnp dtypes to a jnp dtype, refusing anything else."""
    key = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if key not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}={dtype!r} is not supported; use one of {sorted(SUPPORTED_DTYPES)}")
    return jnp.dtype(SUPPORTED_DTYPES[key])


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Static architecture description; hashable so it can be a jit static argument."""

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
    attention_bias: bool = False
    max_position_embeddings: int = 40_960
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Parameters are stored in `param_dtype`; matmuls run in `dtype`. Norms, softmax and RoPE
    # tables are always computed in float32.
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        resolve_dtype(self.param_dtype, "param_dtype")
        resolve_dtype(self.dtype, "dtype")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return resolve_dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return resolve_dtype(self.param_dtype)

    def replace(self, **changes) -> "Qwen3Config":
        return dataclasses.replace(self, **changes)


def _rope_theta(hf: dict) -> float:
    """transformers 5 nests the theta in `rope_parameters`; older configs carry `rope_theta`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"rope_type={rope_type!r} in config.json is not supported; only 'default' RoPE is implemented"
        )
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ValueError("config.json has neither rope_parameters.rope_theta nor rope_theta")
    return float(theta)


def config_from_hf(hf: dict, dtype: Any = "float32") -> Qwen3Config:
    """Builds a Qwen3Config from a parsed Hugging Face config.json."""
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type != "qwen3" and not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        raise ValueError(
            f"config.json describes model_type={model_type!r} architectures={architectures}; "
            f"supported: model_type 'qwen3' ({', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true in config.json is not supported (Qwen3 uses full attention)")
    name = resolve_dtype(dtype).name
    eos = hf.get("eos_token_id")
    return Qwen3Config(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        rope_theta=_rope_theta(hf),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 40_960),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
        param_dtype=name,
        dtype=name,
    )


def config_to_hf(cfg: Qwen3Config, dtype: Any = None) -> dict:
    """The config.json transformers' Qwen3ForCausalLM expects."""
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "max_position_embeddings": cfg.max_position_embeddings,
        "use_sliding_window": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
        "dtype": resolve_dtype(dtype or cfg.param_dtype).name,
    }

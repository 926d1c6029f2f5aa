"""The model families one decoder serves, and how each maps Hugging Face config keys onto its flags.

All three are pre-norm decoders with RMSNorm, grouped-query attention, rotary embeddings and a
SwiGLU MLP; they differ only in
- Qwen3 (`Qwen3ForCausalLM`): RMSNorm on each query and key head before RoPE (qk_norm); biases on
  q/k/v/o when `attention_bias` is true (false in every released checkpoint);
- Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): q/k/v biases always, none on o_proj, no qk_norm;
- Llama 3 (`LlamaForCausalLM`): no qk_norm; biases on q/k/v/o with `attention_bias` and on the MLP
  with `mlp_bias` (both false in released checkpoints); usually llama3 RoPE scaling.
"""

from __future__ import annotations

import dataclasses

# The decoder's family flags (fields of ModelConfig), in the order they are documented there.
FLAGS = ("qk_norm", "qkv_bias", "o_proj_bias", "mlp_bias")


@dataclasses.dataclass(frozen=True)
class Family:
    architecture: str  # config.json `architectures[0]`, the transformers class
    model_type: str  # config.json `model_type`
    qk_norm: bool  # RMSNorm over each query / key head before RoPE
    fixed_qkv_bias: bool  # q/k/v always biased and o_proj never (else all four follow `attention_bias`)
    reads_mlp_bias: bool  # config.json's `mlp_bias` puts biases on gate/up/down
    has_sliding_window_keys: bool  # config.json carries use_sliding_window (always written as false)


FAMILIES = {
    family.architecture: family
    for family in (
        Family("Qwen3ForCausalLM", "qwen3", qk_norm=True, fixed_qkv_bias=False, reads_mlp_bias=False,
               has_sliding_window_keys=True),
        Family("Qwen2ForCausalLM", "qwen2", qk_norm=False, fixed_qkv_bias=True, reads_mlp_bias=False,
               has_sliding_window_keys=True),
        Family("LlamaForCausalLM", "llama", qk_norm=False, fixed_qkv_bias=False, reads_mlp_bias=True,
               has_sliding_window_keys=False),
    )
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
_BY_MODEL_TYPE = {family.model_type: family for family in FAMILIES.values()}


def supported_description() -> str:
    return ", ".join(f"{f.architecture} (model_type {f.model_type!r})" for f in FAMILIES.values())


def family_of(architecture: str) -> Family:
    if architecture not in FAMILIES:
        raise ValueError(f"architecture={architecture!r} is not supported; valid: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return FAMILIES[architecture]


def family_from_hf(hf: dict) -> Family:
    """The family a parsed config.json describes: its first supported `architectures` entry, else its
    `model_type`; anything else is refused, naming what was found and what is supported."""
    architectures = hf.get("architectures") or []
    for architecture in architectures:
        if architecture in FAMILIES:
            return FAMILIES[architecture]
    if hf.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[hf["model_type"]]
    raise ValueError(
        f"config.json describes architectures={architectures} model_type={hf.get('model_type')!r}, which is not "
        f"supported; supported: {supported_description()}"
    )


def family_flags(family: Family, attention_bias: bool = False, mlp_bias: bool = False) -> dict[str, bool]:
    """The decoder flags of `family` given config.json's `attention_bias` and `mlp_bias`."""
    qkv_bias = True if family.fixed_qkv_bias else bool(attention_bias)
    o_proj_bias = False if family.fixed_qkv_bias else bool(attention_bias)
    return dict(qk_norm=family.qk_norm, qkv_bias=qkv_bias, o_proj_bias=o_proj_bias,
                mlp_bias=bool(mlp_bias) and family.reads_mlp_bias)


def complete_flags(family: Family, given: dict) -> dict[str, bool]:
    """`given` flags (None = unset) completed with the family's values; refuses flags the family's
    config.json cannot express (they would not survive a save and reload)."""
    attention_bias = next((given[k] for k in ("qkv_bias", "o_proj_bias") if given.get(k) is not None), False)
    expected = family_flags(family, attention_bias, bool(given.get("mlp_bias")))
    for flag, value in given.items():
        if value is not None and bool(value) != expected[flag]:
            raise ValueError(
                f"{flag}={value} is not valid for architecture={family.architecture!r}; valid: {expected[flag]} "
                f"with these settings ({family.architecture} flags: {expected})"
            )
    return expected


def family_hf_keys(family: Family, flags: dict[str, bool]) -> dict:
    """The family-specific config.json keys that reproduce `flags`."""
    keys: dict = {"architectures": [family.architecture], "model_type": family.model_type}
    if not family.fixed_qkv_bias:
        keys["attention_bias"] = flags["qkv_bias"]
    if family.reads_mlp_bias:
        keys["mlp_bias"] = flags["mlp_bias"]
    if family.has_sliding_window_keys:
        keys["use_sliding_window"] = False
    return keys

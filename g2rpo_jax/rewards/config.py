"""The `rewards` config section and the typed settings read from it once, at the entry point."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import ml_collections

from g2rpo_jax.rewards.code_tests import EXTRACT_MODES, validate_tolerance
from g2rpo_jax.rewards.custom import load_reward_function
from g2rpo_jax.rewards.math_answers import ANSWER_SOURCES, MathSettings
from g2rpo_jax.rewards.sandbox import SandboxLimits

# accuracy: math_reward or code_reward, by example; custom: the function `rewards.custom` names, when set
REWARD_NAMES = ("accuracy", "format", "custom")


@dataclasses.dataclass(frozen=True)
class RewardSettings:
    weights: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"accuracy": 1.0, "format": 0.0, "custom": 1.0})
    num_workers: int = 2
    math: MathSettings = MathSettings()
    code_extract: str = "last_block"  # last_block | whole
    code_limits: SandboxLimits = SandboxLimits()
    # Numeric tolerances of stdio outputs, for tasks whose tests give none (0: exact decimals).
    code_abs_tol: float = 0.0
    code_rel_tol: float = 0.0
    require_think: bool = False
    custom: str = ""  # 'package.module:function' or 'path/to/file.py:function'; '' = none (custom.py)


def get_default_config() -> ml_collections.ConfigDict:
    """Defaults of the `rewards` section; every key can be overridden from the command line."""
    math = MathSettings()
    code = SandboxLimits()
    config = ml_collections.ConfigDict()
    # custom's weight applies only when `custom` names a function (another value without one is refused)
    config.weights = ml_collections.ConfigDict({"accuracy": 1.0, "format": 0.0, "custom": 1.0})
    config.num_workers = 2  # reward processes; 0 scores in the calling process
    config.math = ml_collections.ConfigDict({
        "answer_sources": tuple(ANSWER_SOURCES),  # boxed, then fallbacks: gsm8k, answer_is
        "timeout_s": math.timeout_s,
        "max_answer_chars": math.max_answer_chars,
        "max_nesting_depth": math.max_nesting_depth,
    })
    config.code = ml_collections.ConfigDict(
        {"extract": "last_block", "abs_tol": 0.0, "rel_tol": 0.0, **dataclasses.asdict(code)})
    config.format = ml_collections.ConfigDict({"require_think": False})
    config.custom = ""  # your reward, added to the total: 'package.module:function' or 'path/to/file.py:function'
    return config


def validate_weights(weights: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(weights) - set(REWARD_NAMES))
    if unknown:
        raise ValueError(f"rewards.weights has unknown names {unknown}; valid: {REWARD_NAMES}")
    return {name: float(weights.get(name, 0.0)) for name in REWARD_NAMES}


def settings_from_config(config: ml_collections.ConfigDict) -> RewardSettings:
    """Typed, validated settings from a `rewards` ConfigDict (see get_default_config)."""
    math_keys = dict(config.math)
    valid_math = {f.name for f in dataclasses.fields(MathSettings)}
    if set(math_keys) - valid_math:
        raise ValueError(f"rewards.math has unknown keys {sorted(set(math_keys) - valid_math)}; "
                         f"valid: {sorted(valid_math)}")
    math_keys["answer_sources"] = tuple(math_keys.get("answer_sources", ANSWER_SOURCES))
    math = MathSettings(**math_keys).validate()
    code = dict(config.code)
    extract = code.pop("extract")
    abs_tol = validate_tolerance("rewards.code.abs_tol", code.pop("abs_tol", 0.0))
    rel_tol = validate_tolerance("rewards.code.rel_tol", code.pop("rel_tol", 0.0))
    if extract not in EXTRACT_MODES:
        raise ValueError(f"rewards.code.extract={extract!r}; valid: {EXTRACT_MODES}")
    fields = {f.name for f in dataclasses.fields(SandboxLimits)}
    unknown = sorted(set(code) - fields)
    if unknown:
        raise ValueError(f"rewards.code has unknown keys {unknown}; valid: {sorted(fields)}")
    custom = str(config.custom)
    weights = validate_weights(dict(config.weights))
    if custom:
        load_reward_function(custom)  # a wrong name stops the run before it starts
    elif weights["custom"] != 1.0:
        raise ValueError(f"rewards.weights.custom={weights['custom']} has no effect: rewards.custom names no "
                         "function; set --config.rewards.custom=package.module:function (or path/to/file.py:function)")
    num_workers = int(config.num_workers)
    if num_workers < 0:
        raise ValueError(f"rewards.num_workers={num_workers!r}; must be >= 0")
    return RewardSettings(weights=weights,
                          num_workers=num_workers, math=math, code_extract=extract,
                          code_limits=SandboxLimits(**code).validate(),
                          code_abs_tol=abs_tol, code_rel_tol=rel_tol,
                          require_think=bool(config.format.require_think), custom=custom)

"""The optimizer: AdamW with linear warmup, cosine decay to a floor, and global-norm clipping.

The schedule counts optimizer updates (with `num_iterations` μ > 1 one train step makes μ of
them), so `total_steps` and `warmup_steps` are in updates. The learning rate actually applied is
kept in the optimizer state (`current_learning_rate`) so the train step can log it without
knowing the schedule.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax


def get_default_config() -> ml_collections.ConfigDict:
    """Defaults follow TRL's GRPOTrainer / HF TrainingArguments unless noted."""
    cfg = ml_collections.ConfigDict()
    cfg.learning_rate = 1e-6  # TRL's GRPO default; RL fine-tuning of a pretrained model wants small steps
    cfg.min_learning_rate = 0.0  # floor the cosine decays to
    cfg.warmup_steps = 0
    cfg.total_steps = 1000  # updates over which the cosine runs; set it to the run's update count
    cfg.weight_decay = 0.0  # applied to matrices only (norm scales and biases are never decayed)
    cfg.b1 = 0.9
    cfg.b2 = 0.999
    cfg.eps = 1e-8
    cfg.max_grad_norm = 1.0  # <= 0 disables clipping
    return cfg


def validate(ocfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the optimizer key, its bad value and what is valid."""
    for key in ("learning_rate", "min_learning_rate", "weight_decay", "eps"):
        if not (isinstance(ocfg[key], (int, float)) and math.isfinite(ocfg[key]) and ocfg[key] >= 0):
            raise ValueError(f"optim.{key}={ocfg[key]!r} is not valid; valid: a finite number >= 0")
    if ocfg.min_learning_rate > ocfg.learning_rate:
        raise ValueError(
            f"optim.min_learning_rate={ocfg.min_learning_rate!r} is not valid; valid: at most "
            f"optim.learning_rate={ocfg.learning_rate!r}"
        )
    for key in ("b1", "b2"):
        if not 0.0 <= ocfg[key] < 1.0:
            raise ValueError(f"optim.{key}={ocfg[key]!r} is not valid; valid: a number in [0, 1)")
    if not isinstance(ocfg.warmup_steps, int) or ocfg.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps={ocfg.warmup_steps!r} is not valid; valid: an integer >= 0")
    if not isinstance(ocfg.total_steps, int) or ocfg.total_steps < max(ocfg.warmup_steps, 1):
        raise ValueError(
            f"optim.total_steps={ocfg.total_steps!r} is not valid; valid: an integer >= "
            f"max(1, warmup_steps={ocfg.warmup_steps})"
        )


def learning_rate_schedule(ocfg: ml_collections.ConfigDict) -> optax.Schedule:
    """lr(n) for update n = 0, 1, ...: n/W · peak during warmup (W updates), then a half cosine
    from peak down to min_learning_rate over the remaining total_steps − W updates, flat after.

    The warmup starts at 0 like Hugging Face's `get_cosine_schedule_with_warmup`; with W = 0 the
    first update uses the peak rate.
    """
    validate(ocfg)
    peak = float(ocfg.learning_rate)
    floor = float(ocfg.min_learning_rate)
    warmup = int(ocfg.warmup_steps)
    decay = max(int(ocfg.total_steps) - warmup, 1)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = peak * count / max(warmup, 1)
        progress = jnp.clip((count - warmup) / decay, 0.0, 1.0)
        cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(count < warmup, warm, cosine)

    return schedule


def decay_mask(params):
    """True for parameters weight decay applies to: matrices, not norm scales or biases."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(ocfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled decay on matrices) at the scheduled rate.

    Written as the chain adamw is made of, with the learning-rate stage wrapped so its current
    value lives in the state (see `current_learning_rate`).
    """
    validate(ocfg)
    stages = []
    if ocfg.max_grad_norm > 0:
        stages.append(optax.clip_by_global_norm(float(ocfg.max_grad_norm)))
    stages += [
        optax.scale_by_adam(b1=float(ocfg.b1), b2=float(ocfg.b2), eps=float(ocfg.eps)),
        optax.add_decayed_weights(float(ocfg.weight_decay), mask=decay_mask),
        optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate=learning_rate_schedule(ocfg)),
    ]
    return optax.chain(*stages)


def current_learning_rate(opt_state) -> Optional[jax.Array]:
    """The rate the last update used (before any update: the first one's), or None when the
    optimizer keeps no injected `learning_rate` (e.g. a plain optax.sgd passed by a test)."""
    is_injected = lambda x: isinstance(x, optax.InjectStatefulHyperparamsState)  # noqa: E731
    for node in jax.tree.leaves(opt_state, is_leaf=is_injected):
        if is_injected(node) and "learning_rate" in node.hyperparams:
            return jnp.asarray(node.hyperparams["learning_rate"], jnp.float32)
    return None

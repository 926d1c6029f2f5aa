"""Score a batch of completions: weighted rewards, per-reward arrays and event counts."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from g2rpo_jax.rewards.code_tests import JobResult, build_jobs, combine, extract_program, run_job
from g2rpo_jax.rewards.config import RewardSettings, validate_weights
from g2rpo_jax.rewards.custom import custom_rewards
from g2rpo_jax.rewards.formatting import format_reward
from g2rpo_jax.rewards.math_answers import math_outcome
from g2rpo_jax.rewards.outcome import STAT_KEYS, RewardOutcome
from g2rpo_jax.rewards.pool import (CODE_HARD_SLACK_S, MATH_HARD_SLACK_S, RewardPool, TaskFailure,
                                    failure_outcome)
from g2rpo_jax.rewards.sandbox import log_protections_once, resolve_isolation

logger = logging.getLogger(__name__)


def _field(example: Any, name: str) -> Any:
    """`example[name]` for dicts, `example.name` for records (g2rpo_jax.data.Example); None when
    absent."""
    if isinstance(example, Mapping):
        return example.get(name)
    return getattr(example, name, None)


def example_kind(example: Any) -> str:
    """"code" for examples with `tests`, "math" for examples with `answer`."""
    has_tests, has_answer = _field(example, "tests") is not None, _field(example, "answer") is not None
    if has_tests == has_answer:
        raise ValueError(f"example {example!r:.120} must carry exactly one of 'answer' (math) or "
                         "'tests' (code)")
    return "code" if has_tests else "math"


def _failure_as_job_result(failure: TaskFailure) -> JobResult:
    return JobResult(False, "timeout" if failure.reason == "timeout" else "sandbox_error",
                     failure.detail)


def score_outcomes(completions: Sequence[str], examples: Sequence[Any],
                   settings: RewardSettings, pool: RewardPool | None = None
                   ) -> list[RewardOutcome]:
    """Accuracy outcome of every completion (math or code by example), in parallel on `pool`."""
    if len(completions) != len(examples):
        raise ValueError(f"len(completions)={len(completions)} != len(examples)={len(examples)}")
    kinds = [example_kind(example) for example in examples]
    outcomes: list[RewardOutcome | None] = [None] * len(completions)
    math_settings = settings.math.validate()
    limits = settings.code_limits.validate()
    if "code" in kinds:  # resolved here once, not by every worker
        limits = resolve_isolation(limits)
        log_protections_once(limits)
    tasks, owners = [], []  # owners[t]: the completion task t scores
    for i, (completion, example, kind) in enumerate(zip(completions, examples, kinds)):
        if kind == "math":
            tasks.append(("math", (completion, str(_field(example, "answer")), math_settings),
                          math_settings.timeout_s + MATH_HARD_SLACK_S))
            owners.append(i)
            continue
        program = extract_program(completion, settings.code_extract)
        if program is None:
            outcomes[i] = RewardOutcome(0.0, parse_failure=True, detail="no python code block")
            continue
        for job in build_jobs(program, _field(example, "tests"), abs_tol=settings.code_abs_tol,
                              rel_tol=settings.code_rel_tol):
            hard = limits.timeout_s + limits.setup_timeout_s + CODE_HARD_SLACK_S
            tasks.append(("job", (job, limits), hard))
            owners.append(i)
    if pool is None:
        results = [math_outcome(*args) if kind == "math" else run_job(*args)
                   for kind, args, _ in tasks]
    else:
        results = pool.run(tasks)
    job_results: dict[int, list[JobResult]] = {}
    for (kind, _, _), owner, result in zip(tasks, owners, results):
        if kind == "math":
            outcomes[owner] = failure_outcome(result) if isinstance(result, TaskFailure) else result
        else:
            if isinstance(result, TaskFailure):
                result = _failure_as_job_result(result)
            job_results.setdefault(owner, []).append(result)
    for owner, results_of_owner in job_results.items():
        outcomes[owner] = combine(results_of_owner)
    return outcomes


def score_batch(completions: Sequence[str], examples: Sequence[Any],
                weights: Mapping[str, float] | None = None, pool: RewardPool | None = None, *,
                settings: RewardSettings | None = None
                ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, int]]:
    """Weighted rewards of a batch. Examples are dicts or records with `answer` or `tests`.

    Returns rewards [N] (sum over names of weights[name] * per_kind[name]), per_kind
    {"accuracy": [N], "format": [N]} (plus "custom": [N] when `settings.custom` names a function,
    see rewards/custom.py) and stats {"parse_failures", "timeouts", "sandbox_errors",
    "executions"} (to be logged per step). `weights` overrides `settings.weights`; pool=None
    scores in this process, one completion after another.
    """
    settings = settings or RewardSettings()
    weights = validate_weights(settings.weights if weights is None else weights)
    outcomes = score_outcomes(completions, examples, settings, pool)
    accuracy = np.array([o.value for o in outcomes], dtype=np.float32)  # [N]
    formats = np.array([format_reward(c, example_kind(e), require_think=settings.require_think)
                        for c, e in zip(completions, examples)], dtype=np.float32)  # [N]
    per_kind = {"accuracy": accuracy, "format": formats}
    if settings.custom:
        per_kind["custom"] = custom_rewards(settings.custom, completions, examples)
    rewards = sum(weights[name] * values for name, values in per_kind.items()).astype(np.float32)
    stats = {key: sum(o.counts()[key] for o in outcomes) for key in STAT_KEYS}
    if stats["sandbox_errors"]:
        details = sorted({o.detail for o in outcomes if o.sandbox_errors})[:3]
        logger.warning("rewards: %d sandbox errors in a batch of %d: %s",
                       stats["sandbox_errors"], len(outcomes), details)
    logger.debug("rewards: %s", stats)
    return rewards, per_kind, stats

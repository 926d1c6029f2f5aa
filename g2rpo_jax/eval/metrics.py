"""Evaluation metrics: the unbiased pass@k estimator and the per-task and macro-averaged summaries.

pass@1 averaged over the k samples is the mean over problems of c/n (c fully correct samples out
of n: math answer verified, or every code test passed); pass@k uses the unbiased estimator
1 - C(n-c, k) / C(n, k).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from g2rpo_jax.eval.generation import Generation


def pass_at_k(num_samples: Any, num_correct: Any, k: int) -> np.ndarray:
    """Unbiased pass@k per problem: 1 - C(n-c, k) / C(n, k), as a float64 array.

    num_samples (n) and num_correct (c) broadcast against each other (ints or int arrays).
    Computed as 1 - prod_{i=n-c+1..n} (1 - k/i), which never forms the (huge) binomials;
    it is 1 whenever fewer than k samples are wrong (n - c < k). Raises ValueError unless
    0 <= c <= n and 1 <= k <= n.
    """
    n = np.asarray(num_samples, dtype=np.int64)
    c = np.asarray(num_correct, dtype=np.int64)
    n, c = np.broadcast_arrays(n, c)
    if np.any(c < 0) or np.any(c > n):
        raise ValueError(f"num_correct={c.tolist()} must lie in [0, num_samples={n.tolist()}]")
    if np.any(k < 1) or np.any(k > n):
        raise ValueError(f"k={k!r} must lie in [1, num_samples={n.tolist()}]")
    result = np.empty(n.shape, dtype=np.float64)
    for index in np.ndindex(n.shape):
        wrong = n[index] - c[index]
        if wrong < k:
            result[index] = 1.0
            continue
        counts = np.arange(wrong + 1, n[index] + 1, dtype=np.float64)
        result[index] = 1.0 - float(np.prod(1.0 - k / counts))
    return result


def parse_pass_k(pass_k: Iterable[int] | str) -> tuple[int, ...]:
    """'1,4' or [1, 4] -> (1, 4), as given (unsorted, unchecked); '' -> ().

    Raises ValueError for text that is not a comma-separated list of integers.
    """
    if isinstance(pass_k, str):
        try:
            return tuple(int(v) for v in pass_k.split(",") if v.strip())
        except ValueError as error:
            raise ValueError(f"pass_k={pass_k!r} must be a comma-separated list of integers") from error
    return tuple(int(v) for v in pass_k)


def resolve_pass_k(pass_k: Iterable[int] | str, num_samples: int) -> tuple[int, ...]:
    """The k values to report, sorted and unique: the given ones, or (1, num_samples) if none.

    Raises ValueError for a k outside 1..num_samples (the estimator needs k samples per problem).
    """
    values = list(parse_pass_k(pass_k))
    if not values:
        values = [1, num_samples]
    bad = [k for k in values if not 1 <= k <= num_samples]
    if bad:
        raise ValueError(f"pass_k={tuple(values)}: {bad} outside 1..num_samples={num_samples}; the "
                         "unbiased estimator needs at least k samples per problem")
    return tuple(sorted(set(values)))


def summarize_task(correct: np.ndarray, rewards_: np.ndarray, accuracies: np.ndarray,
                   generations: Sequence[Generation], pass_k: Sequence[int]) -> dict[str, Any]:
    """Metrics of one task from per-problem correct counts [P] and per-row arrays [P * k].

    Returns num_problems, num_samples, pass@k for each k, mean_reward, mean_accuracy (partial
    credit: the fraction of code tests passed), mean_completion_tokens (None when no generation
    counts tokens) and truncated_fraction (generations that ran out of tokens).
    """
    num_problems = len(correct)
    num_samples = len(rewards_) // max(num_problems, 1)
    metrics: dict[str, Any] = {"num_problems": num_problems, "num_samples": num_samples}
    for k in pass_k:
        metrics[f"pass@{k}"] = float(np.mean(pass_at_k(num_samples, correct, k)))
    metrics["mean_reward"] = float(np.mean(rewards_))
    metrics["mean_accuracy"] = float(np.mean(accuracies))
    lengths = [g.num_tokens for g in generations if g.num_tokens is not None]
    metrics["mean_completion_tokens"] = float(np.mean(lengths)) if lengths else None
    metrics["truncated_fraction"] = float(np.mean([g.finish_reason == "length" for g in generations]))
    return metrics


def macro_average(results: Mapping[str, Mapping[str, Any]], pass_k: Sequence[int]) -> dict[str, float]:
    """{'pass@k': mean over tasks} for each k (every task weighs the same, whatever its size)."""
    return {f"pass@{k}": float(np.mean([r[f"pass@{k}"] for r in results.values()])) for k in pass_k}


def flat_metrics(summary: Mapping[str, Any], prefix: str = "eval") -> dict[str, float]:
    """{'eval/math500/pass@1': ..., 'eval/average/pass@1': ...} for a metrics logger."""
    flat = {}
    for name, task in summary["tasks"].items():
        for key, value in task.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{prefix}/{name}/{key}"] = float(value)
    for key, value in summary["macro_average"].items():
        flat[f"{prefix}/average/{key}"] = float(value)
    return flat

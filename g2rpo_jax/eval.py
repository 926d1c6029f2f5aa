"""Benchmark evaluation: k sampled completions per problem, scored with the verifiable rewards.

    summary = evaluate(cfg, params, tokenizer, ["math500", "humaneval"], num_samples=4,
                       output_dir="runs/x/eval/step_100")
    python -m g2rpo_jax.eval --checkpoint DIR --tasks math500,aime24 --num_samples 4 --output_dir OUT

Tasks are registry names (`TASKS`: math500, aime24, aime25, gsm8k, humaneval, mbpp,
mbpp_sanitized) or any local file read through a data adapter, written `file:PATH:ADAPTER`
(e.g. `file:my/problems.jsonl:math`; PATH is tried as given, then under the data root).
Registry files are read from the data root ($G2RPO_SHARED_DATA, else <repo>/../shared/data);
when a file is missing there the task's Hugging Face dataset is tried instead.

Metrics per task: pass@1 averaged over the k samples (mean over problems of c/n, with c the
number of fully correct samples: math answer verified, or every code test passed) and pass@k
with the unbiased estimator 1 - C(n-c, k) / C(n, k). Every generation is written with its
score to `generations.jsonl`; the summary goes to `summary.json` and `summary.md`.

Default sampling protocol: the paper (arXiv 2508.13023) does not publish its evaluation
settings, so the defaults are Qwen3's recommended thinking-mode sampling (temperature 0.6,
top-p 0.95, top-k 20), 4 samples per problem, and 4096 new tokens (the completion budget of the
official training recipe: a 4608-token model length with 512-token prompts). All are config values.

`evaluate` is a pure function of its inputs (no global state) so the training loop calls it
periodically with the live parameters and its own reward pool.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import sys
import time
import zlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from ml_collections import config_dict

from g2rpo_jax import data, rewards, sampling
from g2rpo_jax.data.loading import LOCAL_SUFFIXES

logger = logging.getLogger(__name__)

# The default protocol (see the module docstring).
DEFAULT_NUM_SAMPLES = 4
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 20
DEFAULT_MAX_NEW_TOKENS = 4096
DEFAULT_BATCH_SIZE = 64  # sampled rows (problems x samples) per sampler call

DATA_ROOT_ENV = "G2RPO_SHARED_DATA"
FILE_TASK_PREFIX = "file:"
REWARD_KINDS = ("math", "code")
GENERATIONS_FILE = "generations.jsonl"
SUMMARY_JSON_FILE = "summary.json"
SUMMARY_MD_FILE = "summary.md"

# Which reward scores the examples an adapter produces.
ADAPTER_REWARDS = {
    "openr1_math": "math",
    "math": "math",
    "gsm8k": "math",
    "aime": "math",
    "multiple_choice": "math",  # the correct letter, checked in the final \boxed{}
    "humaneval": "code",
    "mbpp": "code",
    "code_stdio": "code",
}


# ----------------------------------------------------------------------------- task registry

@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Where a benchmark lives and how to read and score it.

    local_path: relative to the data root (or absolute); hub_name/hub_split: the Hugging Face
    dataset used when the local file is missing ('' = none). task_id_range keeps MBPP's
    standard test split (task ids 11..510, inclusive) out of the full file.
    """

    name: str
    adapter: str
    reward: str
    local_path: str = ""
    hub_name: str = ""
    hub_split: str = ""
    task_id_range: tuple[int, int] | None = None
    description: str = ""


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("math500", "math", "math", "math500/test.jsonl", "HuggingFaceH4/MATH-500", "test",
                 description="MATH500 (500 problems, answer checked with math-verify)"),
        TaskSpec("aime24", "aime", "math", "aime/aime24_test.jsonl", "HuggingFaceH4/aime_2024", "train",
                 description="AIME 2024 (30 problems)"),
        TaskSpec("aime25", "aime", "math", "aime/aime25_test.jsonl", "math-ai/aime25", "test",
                 description="AIME 2025 (30 problems)"),
        TaskSpec("gsm8k", "gsm8k", "math", "gsm8k/test.jsonl", "openai/gsm8k:main", "test",
                 description="GSM8K test (1319 problems)"),
        TaskSpec("humaneval", "humaneval", "code", "humaneval/HumanEval.jsonl.gz",
                 "openai/openai_humaneval", "test", description="HumanEval (164 functions)"),
        TaskSpec("mbpp", "mbpp", "code", "mbpp/mbpp.jsonl", "google-research-datasets/mbpp:full", "test",
                 task_id_range=(11, 510), description="MBPP test split (task ids 11-510, 500 problems)"),
        TaskSpec("mbpp_sanitized", "mbpp", "code", "mbpp/sanitized-mbpp.json",
                 "google-research-datasets/mbpp:sanitized", "test", task_id_range=(11, 510),
                 description="sanitized MBPP test split (257 problems)"),
    )
}


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """A loaded task: its name in reports and its problems, in file order."""

    name: str
    examples: tuple[data.Example, ...]
    source: str = ""


def default_data_root() -> str:
    """$G2RPO_SHARED_DATA, else <repo>/../shared/data (the repo being this package's parent)."""
    if os.environ.get(DATA_ROOT_ENV):
        return os.environ[DATA_ROOT_ENV]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.normpath(os.path.join(repo, "..", "shared", "data"))


def _file_task_name(path: str) -> str:
    """'dir/my_set.jsonl.gz' -> 'my_set'."""
    base = os.path.basename(path)
    for suffix in LOCAL_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def parse_task(task: str) -> TaskSpec:
    """A registry name, or 'file:PATH:ADAPTER' for any local file read through an adapter."""
    if not isinstance(task, str) or not task.strip():
        raise ValueError(f"tasks: {task!r} is not a task name; known tasks are {sorted(TASKS)} "
                         f"or {FILE_TASK_PREFIX}PATH:ADAPTER")
    task = task.strip()
    if task.startswith(FILE_TASK_PREFIX):
        path, _, adapter = task[len(FILE_TASK_PREFIX):].rpartition(":")
        if not path or adapter not in ADAPTER_REWARDS:
            raise ValueError(
                f"tasks: {task!r} must be {FILE_TASK_PREFIX}PATH:ADAPTER with ADAPTER one of "
                f"{sorted(ADAPTER_REWARDS)}"
            )
        return TaskSpec(_file_task_name(path), adapter, ADAPTER_REWARDS[adapter], local_path=path,
                        description=f"{path} through the {adapter!r} adapter")
    if task not in TASKS:
        raise ValueError(
            f"tasks: unknown task {task!r}; known tasks are {sorted(TASKS)}, or any local file "
            f"as {FILE_TASK_PREFIX}PATH:ADAPTER with ADAPTER one of {sorted(ADAPTER_REWARDS)}"
        )
    return TASKS[task]


def parse_task_list(tasks: str | Sequence[str]) -> list[TaskSpec]:
    """'math500,humaneval' (or a list of names) -> specs, refusing empty lists and duplicates."""
    names = [t for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"tasks={tasks!r} is empty; known tasks are {sorted(TASKS)} "
                         f"or {FILE_TASK_PREFIX}PATH:ADAPTER")
    specs = [parse_task(n) for n in names]
    _check_unique_names([s.name for s in specs])
    return specs


def _check_unique_names(names: Sequence[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"tasks: the task names {repeated} appear more than once; reports are keyed "
                         "by name, so give each task (or local file) a distinct name")


def _local_file(path: str, data_root: str) -> str | None:
    """The file as given (absolute or relative to the working directory), else under data_root."""
    candidates = [os.path.expanduser(path)]
    if not os.path.isabs(path):
        candidates.append(os.path.join(data_root, path))
    return next((c for c in candidates if os.path.isfile(c)), None)


def _in_task_id_range(example: data.Example, id_range: tuple[int, int] | None) -> bool:
    if id_range is None:
        return True
    task_id = example.metadata.get("task_id")
    return isinstance(task_id, int) and id_range[0] <= task_id <= id_range[1]


def load_task(spec: TaskSpec | str, data_root: str | None = None, limit: int | None = None) -> EvalTask:
    """Reads a task's problems (the first `limit` after the task's own selection)."""
    spec = parse_task(spec) if isinstance(spec, str) else spec
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit!r} must be None, 0 (all) or positive")
    root = data_root or default_data_root()
    path = _local_file(spec.local_path, root) if spec.local_path else None
    read_limit = None if spec.task_id_range else (limit or None)  # select first, then limit
    if path is not None:
        source, examples = path, data.load_examples(path, spec.adapter, limit=read_limit)
    elif spec.hub_name:
        source = f"{spec.hub_name} (split {spec.hub_split or 'train'})"
        try:
            examples = data.load_examples(spec.hub_name, spec.adapter, split=spec.hub_split or None,
                                          limit=read_limit)
        except (ValueError, ImportError) as error:
            raise ValueError(
                f"task {spec.name!r}: {spec.local_path!r} is not under the data root {root!r} "
                f"(set ${DATA_ROOT_ENV} or data_root) and the Hugging Face dataset could not be "
                f"read instead: {error}"
            ) from error
    else:
        raise ValueError(f"task {spec.name!r}: no such file {spec.local_path!r} (also looked under "
                         f"the data root {root!r})")
    examples = [e for e in examples if _in_task_id_range(e, spec.task_id_range)]
    if limit:
        examples = examples[:limit]
    wrong = [e.id for e in examples if ("code" if e.is_code else "math") != spec.reward]
    if wrong:
        raise ValueError(f"task {spec.name!r} expects {spec.reward} problems, but {wrong[:3]} are not")
    if not examples:
        raise ValueError(f"task {spec.name!r}: no usable problems in {source}")
    return EvalTask(spec.name, tuple(examples), source)


# ----------------------------------------------------------------------------- metrics

def pass_at_k(num_samples: Any, num_correct: Any, k: int) -> np.ndarray:
    """Unbiased pass@k per problem: 1 - C(n-c, k) / C(n, k), as a float64 array.

    Computed as 1 - prod_{i=n-c+1..n} (1 - k/i), which never forms the (huge) binomials;
    it is 1 whenever fewer than k samples are wrong (n - c < k).
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


def resolve_pass_k(pass_k: Iterable[int] | str, num_samples: int) -> tuple[int, ...]:
    """The k values to report: the given ones (each in 1..num_samples), or (1, num_samples)."""
    if isinstance(pass_k, str):
        try:
            values = [int(v) for v in pass_k.split(",") if v.strip()]
        except ValueError as error:
            raise ValueError(f"pass_k={pass_k!r} must be a comma-separated list of integers") from error
    else:
        values = [int(v) for v in pass_k]
    if not values:
        values = [1, num_samples]
    bad = [k for k in values if not 1 <= k <= num_samples]
    if bad:
        raise ValueError(f"pass_k={tuple(values)}: {bad} outside 1..num_samples={num_samples}; the "
                         "unbiased estimator needs at least k samples per problem")
    return tuple(sorted(set(values)))


# ----------------------------------------------------------------------------- generation

@dataclasses.dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int | None
    finish_reason: str  # 'stop' (a stop token), 'length' (ran out of tokens) or 'external'


def plan_rows(prompt_lengths: Sequence[int], num_samples: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """Chunks of (problem index, sample index) rows, problems shortest-prompt first.

    A problem's k samples stay together; sorting by length keeps each chunk's prompt-length
    bucket (and its padding) small. The order depends only on the inputs: reproducible.
    """
    order = sorted(range(len(prompt_lengths)), key=lambda i: (prompt_lengths[i], i))
    rows = [(problem, sample) for problem in order for sample in range(num_samples)]
    return [rows[start: start + batch_size] for start in range(0, len(rows), batch_size)]


def task_rng(seed: int, task_name: str) -> jax.Array:
    """Per-task key: adding or reordering tasks does not change another task's samples."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(task_name.encode()) & 0x7FFFFFFF)


def sample_chunk(cfg, params, tokenizer, prompts: Sequence[Sequence[int]], *, rng: jax.Array,
                 max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                 stop_ids: Sequence[int], pad_id: int, mesh=None) -> list[Generation]:
    """One sampler call over a chunk of rows; completions decoded without special tokens."""
    out = sampling.sample(cfg, params, [list(p) for p in prompts], max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=tuple(stop_ids),
                          rng=rng, pad_id=pad_id, mesh=mesh)
    generations = []
    for row in range(len(prompts)):
        length = int(out.lengths[row])
        ids = out.tokens[row, :length].tolist()  # [L_row]
        stopped = length > 0 and ids[-1] in stop_ids
        generations.append(Generation(tokenizer.decode(ids, skip_special_tokens=True), length,
                                      "stop" if stopped else "length"))
    return generations


def _external_generations(completions_fn: Callable, examples: Sequence[data.Example],
                          num_samples: int) -> list[list[Generation]]:
    produced = completions_fn(list(examples), num_samples)
    if len(produced) != len(examples) or any(len(p) != num_samples for p in produced):
        raise ValueError(
            f"completions_fn must return {len(examples)} lists of num_samples={num_samples} strings "
            f"(one list per example); got {len(produced)} lists of lengths "
            f"{sorted({len(p) for p in produced})}"
        )
    return [[Generation(str(text), None, "external") for text in texts] for texts in produced]


# ----------------------------------------------------------------------------- scoring

def _reward_details(completion: str, example: data.Example, accuracy: float, format_score: float,
                    settings: rewards.RewardSettings) -> dict[str, Any]:
    details: dict[str, Any] = {"accuracy": float(accuracy), "format": float(format_score)}
    if example.is_code:
        program = rewards.extract_program(completion, settings.code_extract)
        details["has_program"] = program is not None
    else:
        details["extracted_answer"] = rewards.extract_answer(completion, tuple(settings.math.answer_sources))
        details["gold_answer"] = example.answer
    return details


def score_rows(completions: Sequence[str], examples: Sequence[data.Example],
               settings: rewards.RewardSettings, pool: rewards.RewardPool | None):
    """Rewards [N], accuracies [N], details per row and the event counts of one chunk."""
    reward, per_kind, stats = rewards.score_batch(list(completions), list(examples), pool=pool,
                                                  settings=settings)
    details = [_reward_details(c, e, a, f, settings) for c, e, a, f
               in zip(completions, examples, per_kind["accuracy"], per_kind["format"])]
    return reward, per_kind["accuracy"], details, stats


# ----------------------------------------------------------------------------- summary

def summarize_task(correct: np.ndarray, rewards_: np.ndarray, accuracies: np.ndarray,
                   generations: Sequence[Generation], pass_k: Sequence[int]) -> dict[str, Any]:
    """Metrics of one task from per-problem correct counts [P] and per-row arrays [P * k]."""
    num_problems = len(correct)
    num_samples = len(rewards_) // max(num_problems, 1)
    metrics: dict[str, Any] = {"num_problems": num_problems, "num_samples": num_samples}
    for k in pass_k:
        metrics[f"pass@{k}"] = float(np.mean(pass_at_k(num_samples, correct, k)))
    metrics["mean_reward"] = float(np.mean(rewards_))
    metrics["mean_accuracy"] = float(np.mean(accuracies))  # partial credit: fraction of tests passed
    lengths = [g.num_tokens for g in generations if g.num_tokens is not None]
    metrics["mean_completion_tokens"] = float(np.mean(lengths)) if lengths else None
    metrics["truncated_fraction"] = float(np.mean([g.finish_reason == "length" for g in generations]))
    return metrics


def markdown_table(summary: Mapping[str, Any]) -> str:
    """The summary as a markdown table: one row per task, plus a macro average."""
    pass_columns = [f"pass@{k}" for k in summary["settings"]["pass_k"]]
    header = ["task", "problems", "samples", *pass_columns, "mean reward", "truncated", "dropped"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, task in summary["tasks"].items():
        cells = [name, str(task["num_problems"]), str(task["num_samples"])]
        cells += [f"{100 * task[c]:.2f}" for c in pass_columns]
        cells += [f"{task['mean_reward']:.3f}", f"{100 * task['truncated_fraction']:.1f}%",
                  str(task["prompts_dropped"])]
        lines.append("| " + " | ".join(cells) + " |")
    if len(summary["tasks"]) > 1:
        average = summary["macro_average"]
        cells = ["macro average", "", ""] + [f"{100 * average[c]:.2f}" for c in pass_columns]
        lines.append("| " + " | ".join(cells + ["", "", ""]) + " |")
    settings = summary["settings"]
    note = (f"pass@k in %, unbiased estimator over n={settings['num_samples']} samples per problem; "
            f"temperature={settings['temperature']}, top_p={settings['top_p']}, "
            f"top_k={settings['top_k']}, max_new_tokens={settings['max_new_tokens']}, "
            f"seed={settings['seed']}")
    if summary.get("step") is not None:
        note = f"step {summary['step']}; " + note
    return "\n".join(lines) + f"\n\n{note}\n"


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


def _write_summary(summary: Mapping[str, Any], output_dir: str) -> None:
    with open(os.path.join(output_dir, SUMMARY_JSON_FILE), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    with open(os.path.join(output_dir, SUMMARY_MD_FILE), "w", encoding="utf-8") as handle:
        handle.write(markdown_table(summary))


# ----------------------------------------------------------------------------- evaluate

def _as_task(task: str | TaskSpec | EvalTask, data_root: str | None, limit: int | None) -> EvalTask:
    if isinstance(task, EvalTask):
        return dataclasses.replace(task, examples=task.examples[:limit]) if limit else task
    return load_task(task, data_root, limit)


def _prompt_texts(examples: Sequence[data.Example], tokenizer, prompt_options: Mapping[str, Any]) -> list[str]:
    """The prompt each problem was asked with (as the model saw it, when there is a tokenizer)."""
    if tokenizer is None:
        return [e.prompt if e.prompt is not None else json.dumps(list(e.messages)) for e in examples]
    keys = ("template", "system", "instruction", "enable_thinking")
    return [data.prompt_text(e, tokenizer, **{k: prompt_options[k] for k in keys}) for e in examples]


def _log_progress(task: str, done: int, total: int, started: float) -> None:
    elapsed = time.monotonic() - started
    rate = done / elapsed if elapsed > 0 else 0.0
    remaining = (total - done) / rate if rate > 0 else float("nan")
    logger.info("eval %s: %d/%d completions (%.0f%%), %.1f s elapsed, %.2f completions/s, ~%.0f s left",
                task, done, total, 100.0 * done / total, elapsed, rate, remaining)


def _evaluate_task(task: EvalTask, *, cfg, params, tokenizer, num_samples: int, sampler_options: dict,
                   batch_size: int, seed: int, completions_fn, prompt_options: dict,
                   reward_settings: rewards.RewardSettings, pool, pass_k, mesh, write_record) -> dict:
    started = time.monotonic()
    if tokenizer is not None:
        prepared = data.prepare_prompts(task.examples, tokenizer, with_trajectories=False, **prompt_options)
        examples, prompt_ids, dropped = list(prepared.examples), prepared.prompt_ids, prepared.report.dropped
    else:
        examples, prompt_ids, dropped = list(task.examples), None, 0
    if not examples:
        raise ValueError(f"task {task.name!r}: every prompt was dropped by the length policy "
                         f"(max_prompt_tokens={prompt_options.get('max_prompt_tokens')})")
    if dropped:
        logger.warning("eval %s: %d of %d prompts dropped by the length policy; metrics cover the rest",
                       task.name, dropped, len(task.examples))
    texts = _prompt_texts(examples, tokenizer, prompt_options)
    external = _external_generations(completions_fn, examples, num_samples) if completions_fn else None
    lengths = [len(ids) for ids in prompt_ids] if prompt_ids is not None else [0] * len(examples)
    chunks = plan_rows(lengths, num_samples, batch_size)
    key = task_rng(seed, task.name)
    stop_ids = data.stop_token_ids(tokenizer) if external is None else ()
    pad_id = data.pad_token_id(tokenizer) if external is None else 0

    total_rows = len(examples) * num_samples
    correct = np.zeros(len(examples), np.int64)  # [P] fully correct samples per problem
    row_rewards = np.zeros((len(examples), num_samples), np.float32)  # [P, k]
    row_accuracy = np.zeros((len(examples), num_samples), np.float32)  # [P, k]
    generations: list[Generation] = []
    stats = {key_: 0 for key_ in ("parse_failures", "timeouts", "sandbox_errors", "executions")}
    done = 0

    def record_chunk(chunk, chunk_generations, scored) -> None:
        nonlocal done
        reward, accuracy, details, chunk_stats = scored
        for key_ in stats:
            stats[key_] += int(chunk_stats.get(key_, 0))
        for (problem, sample_index), generation, r, a, detail in zip(
                chunk, chunk_generations, reward, accuracy, details):
            passed = bool(a >= 1.0)
            correct[problem] += passed
            row_rewards[problem, sample_index], row_accuracy[problem, sample_index] = r, a
            generations.append(generation)
            write_record({
                "task": task.name, "problem_id": examples[problem].id, "sample_index": sample_index,
                "prompt": texts[problem], "completion": generation.text, "reward": float(r),
                "passed": passed, "details": detail, "num_tokens": generation.num_tokens,
                "finish_reason": generation.finish_reason,
            })
        done += len(chunk)
        _log_progress(task.name, done, total_rows, started)

    # With a reward pool, chunk i is scored in a helper thread while chunk i+1 is sampled (the
    # sampler releases the GIL). Without one, scoring stays in the calling thread, as asked.
    scorer = concurrent.futures.ThreadPoolExecutor(1) if pool is not None else None
    pending = None  # (chunk, generations, future) scored in the background
    try:
        for chunk_index, chunk in enumerate(chunks):
            if external is not None:
                chunk_generations = [external[p][s] for p, s in chunk]
            else:
                chunk_generations = sample_chunk(
                    cfg, params, tokenizer, [prompt_ids[p] for p, _ in chunk],
                    rng=jax.random.fold_in(key, chunk_index), stop_ids=stop_ids, pad_id=pad_id,
                    mesh=mesh, **sampler_options)
            score_args = ([g.text for g in chunk_generations], [examples[p] for p, _ in chunk],
                          reward_settings, pool)
            if scorer is None:
                record_chunk(chunk, chunk_generations, score_rows(*score_args))
                continue
            if pending is not None:
                record_chunk(pending[0], pending[1], pending[2].result())
            pending = (chunk, chunk_generations, scorer.submit(score_rows, *score_args))
        if pending is not None:
            record_chunk(pending[0], pending[1], pending[2].result())
    finally:
        if scorer is not None:
            scorer.shutdown(wait=True, cancel_futures=True)
    metrics = summarize_task(correct, row_rewards.reshape(-1), row_accuracy.reshape(-1), generations, pass_k)
    metrics.update(prompts_dropped=dropped, reward_stats=stats, source=task.source,
                   seconds=time.monotonic() - started)
    return metrics


def evaluate(
    cfg,
    params,
    tokenizer,
    tasks: Sequence[str | TaskSpec | EvalTask] | str,
    *,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = DEFAULT_TOP_P,
    top_k: int = DEFAULT_TOP_K,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | None = None,
    seed: int = 0,
    output_dir: str | None = None,
    completions_fn: Callable[[list[data.Example], int], Sequence[Sequence[str]]] | None = None,
    pass_k: Iterable[int] | str = (),
    data_root: str | None = None,
    template: str = "chat",
    system: str | None = None,
    instruction: str | None = None,
    enable_thinking: bool | None = None,
    max_prompt_tokens: int | None = None,
    overlong: str = "drop",
    reward_settings: rewards.RewardSettings | None = None,
    pool: rewards.RewardPool | None = None,
    mesh=None,
    step: int | None = None,
) -> dict[str, Any]:
    """Samples `num_samples` completions per problem of every task, scores them, returns the summary.

    tasks: registry names / 'file:PATH:ADAPTER' strings (or one comma-separated string),
    TaskSpecs, or EvalTasks already loaded (what a training loop keeps between evaluations).
    completions_fn(examples, k) -> k completion strings per example replaces the model (cfg and
    params are then unused; tokenizer may be None). limit: first N problems per task (None/0 =
    all). pool: a started RewardPool to score on; None starts one for this call when
    reward_settings.num_workers > 0 (code runs in sandboxed subprocesses either way).
    output_dir: where generations.jsonl, summary.json and summary.md go (None = no files).

    Returns {"tasks": {name: metrics}, "macro_average": {...}, "settings": {...}, "step", "files"}.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    if completions_fn is None and (tokenizer is None or params is None or cfg is None):
        raise ValueError("evaluate needs cfg, params and tokenizer unless completions_fn replaces the model")
    ks = resolve_pass_k(pass_k, num_samples)
    specs = parse_task_list(tasks) if isinstance(tasks, str) else list(tasks)
    loaded = [_as_task(t, data_root, limit or None) for t in specs]
    _check_unique_names([t.name for t in loaded])
    reward_settings = reward_settings or rewards.RewardSettings()
    prompt_options = dict(template=template, system=system, instruction=instruction,
                          enable_thinking=enable_thinking, max_prompt_tokens=max_prompt_tokens or None,
                          overlong=overlong)
    sampler_options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    settings = dict(num_samples=num_samples, pass_k=list(ks), batch_size=batch_size, limit=limit or None,
                    seed=seed, **sampler_options, **prompt_options,
                    model="completions_fn" if completions_fn else "sampler")

    files = {}
    record_handle = None
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        files = {name: os.path.join(output_dir, file) for name, file in
                 (("generations", GENERATIONS_FILE), ("summary_json", SUMMARY_JSON_FILE),
                  ("summary_md", SUMMARY_MD_FILE))}
        record_handle = open(files["generations"], "w", encoding="utf-8")

    def write_record(record: dict) -> None:
        if record_handle is not None:
            if step is not None:
                record = {"step": step, **record}
            record_handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    own_pool = None
    if pool is None and reward_settings.num_workers > 0:
        own_pool = pool = rewards.RewardPool(reward_settings.num_workers)
    try:
        results = {}
        for task in loaded:
            results[task.name] = _evaluate_task(
                task, cfg=cfg, params=params, tokenizer=tokenizer, num_samples=num_samples,
                sampler_options=sampler_options, batch_size=batch_size, seed=seed,
                completions_fn=completions_fn, prompt_options=prompt_options,
                reward_settings=reward_settings, pool=pool, pass_k=ks, mesh=mesh, write_record=write_record)
            if record_handle is not None:
                record_handle.flush()
            logger.info("eval %s: %s", task.name,
                        ", ".join(f"pass@{k}={results[task.name][f'pass@{k}']:.4f}" for k in ks))
    finally:
        if record_handle is not None:
            record_handle.close()
        if own_pool is not None:
            own_pool.close()

    macro = {f"pass@{k}": float(np.mean([r[f"pass@{k}"] for r in results.values()])) for k in ks}
    summary = {"tasks": results, "macro_average": macro, "settings": settings, "step": step, "files": files}
    if output_dir:
        _write_summary(summary, output_dir)
    return summary


# ----------------------------------------------------------------------------- config and CLI

def get_default_config() -> config_dict.ConfigDict:
    """Every setting of `python -m g2rpo_jax.eval`; the training loop reuses the sampling keys."""
    config = config_dict.ConfigDict()
    config.checkpoint = ""      # Hugging Face directory (config.json, *.safetensors, tokenizer files)
    config.dtype = "float32"    # 'float32' or 'bfloat16'
    config.tasks = "math500"    # comma-separated registry names and/or file:PATH:ADAPTER
    config.data_root = ""       # '' = $G2RPO_SHARED_DATA, else <repo>/../shared/data
    config.limit = 0            # first N problems per task (0 = all)
    config.num_samples = DEFAULT_NUM_SAMPLES  # k completions per problem
    config.pass_k = ""          # comma-separated k values; '' = 1 and num_samples
    config.temperature = DEFAULT_TEMPERATURE
    config.top_p = DEFAULT_TOP_P
    config.top_k = DEFAULT_TOP_K
    config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    config.batch_size = DEFAULT_BATCH_SIZE  # rows (problems x samples) per sampler call
    config.seed = 0
    config.output_dir = ""      # required on the command line
    config.prompt = config_dict.ConfigDict()
    config.prompt.template = "chat"  # 'chat' (tokenizer's chat template) or 'plain' (base models)
    config.prompt.system = ""        # system message ('' = none)
    config.prompt.instruction = config_dict.placeholder(str)  # None = the task's default instruction
    config.prompt.enable_thinking = config_dict.placeholder(bool)  # None = the template's default
    config.prompt.max_prompt_tokens = 0  # 0 = no limit (benchmarks are scored on every problem)
    config.prompt.overlong = "drop"      # or 'truncate_left'; counts are reported
    config.rewards = rewards.get_default_config()
    return config


def evaluate_options(config: config_dict.ConfigDict) -> dict[str, Any]:
    """The keyword arguments of `evaluate` read from an eval config (tasks/output_dir excluded)."""
    return dict(
        num_samples=int(config.num_samples), temperature=float(config.temperature),
        top_p=float(config.top_p), top_k=int(config.top_k), max_new_tokens=int(config.max_new_tokens),
        batch_size=int(config.batch_size), limit=int(config.limit) or None, seed=int(config.seed),
        pass_k=str(config.pass_k), data_root=config.data_root or None,
        template=config.prompt.template, system=config.prompt.system or None,
        instruction=config.prompt.instruction, enable_thinking=config.prompt.enable_thinking,
        max_prompt_tokens=int(config.prompt.max_prompt_tokens) or None, overlong=config.prompt.overlong,
        reward_settings=rewards.settings_from_config(config.rewards),
    )


# Plain flags that set the config key of the same name (after --config and its overrides).
_SHORTCUT_FLAGS = {
    "checkpoint": (str, "Hugging Face checkpoint directory"),
    "tasks": (str, "comma-separated tasks: " + ",".join(TASKS) + " or file:PATH:ADAPTER"),
    "output_dir": (str, "where generations.jsonl, summary.json and summary.md are written"),
    "data_root": (str, "folder of the benchmark files"),
    "dtype": (str, "float32 or bfloat16"),
    "pass_k": (str, "comma-separated k values for pass@k"),
    "limit": (int, "first N problems per task (0 = all)"),
    "num_samples": (int, "completions per problem"),
    "max_new_tokens": (int, "completion budget in tokens"),
    "batch_size": (int, "rows (problems x samples) per sampler call"),
    "top_k": (int, "top-k sampling (0 = off)"),
    "seed": (int, "sampling seed"),
    "temperature": (float, "sampling temperature"),
    "top_p": (float, "nucleus sampling mass"),
}


def parse_command_line(argv: Sequence[str]) -> config_dict.ConfigDict:
    """--config=FILE (else the defaults), --config.KEY=VALUE overrides, then the plain flags."""
    from absl import flags  # noqa: PLC0415 (only the command line needs absl)
    from ml_collections import config_flags  # noqa: PLC0415

    argv = list(argv)
    flag_values = flags.FlagValues()
    if any(arg == "--config" or arg.startswith("--config=") for arg in argv[1:]):
        config_flags.DEFINE_config_file("config", None, "an ml_collections config file",
                                        flag_values=flag_values, sys_argv=argv)
    else:
        config_flags.DEFINE_config_dict("config", get_default_config(), "the eval config",
                                        flag_values=flag_values, sys_argv=argv)
    definers = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float}
    for name, (kind, help_text) in _SHORTCUT_FLAGS.items():
        definers[kind](name, None, help_text + " (sets --config." + name + ")", flag_values=flag_values)
    if any(arg in ("-h", "--help", "-help") for arg in argv[1:]):
        print("usage: python -m g2rpo_jax.eval --checkpoint DIR --tasks math500,humaneval --output_dir OUT "
              "[--config=FILE] [--config.KEY=VALUE ...]\n" + flag_values.get_help())
        raise SystemExit(0)
    try:
        rest = flag_values(argv)
    except flags.Error as error:
        raise SystemExit(f"python -m g2rpo_jax.eval: {error}") from error
    if len(rest) > 1:
        raise SystemExit(f"python -m g2rpo_jax.eval: unexpected arguments {rest[1:]}")
    config = flag_values.config
    for name in _SHORTCUT_FLAGS:
        value = flag_values[name].value
        if value is not None:
            config[name] = value
    return config


def run(config: config_dict.ConfigDict) -> dict[str, Any]:
    """Loads the checkpoint named by the config and evaluates it; returns the summary."""
    from g2rpo_jax import models  # noqa: PLC0415 (the library part of this module needs no loader)

    if not config.checkpoint:
        raise ValueError("checkpoint='' : give the Hugging Face checkpoint directory (--checkpoint DIR)")
    if not config.output_dir:
        raise ValueError("output_dir='' : give the folder for the results (--output_dir DIR)")
    tasks = parse_task_list(config.tasks)  # fail on a bad task name before loading the model
    options = evaluate_options(config)
    cfg, params = models.load_hf(config.checkpoint, dtype=config.dtype)
    tokenizer = models.load_tokenizer(config.checkpoint)
    summary = evaluate(cfg, params, tokenizer, tasks, output_dir=config.output_dir, **options)
    summary["settings"]["checkpoint"] = config.checkpoint
    _write_summary(summary, config.output_dir)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_command_line(sys.argv if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("g2rpo_jax").setLevel(logging.INFO)
    summary = run(config)
    print(markdown_table(summary))
    print(f"generations: {summary['files']['generations']}\nsummary: {summary['files']['summary_json']}, "
          f"{summary['files']['summary_md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

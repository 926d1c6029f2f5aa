"""`evaluate`: k completions per problem of every task, sampled chunk by chunk and scored while the
next chunk samples (`rollout.pipelined`), then summarised per task and averaged over tasks."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from g2rpo_jax import data, rewards
from g2rpo_jax.eval.generation import (REWARD_EVENTS, Generation, Row, external_generations, plan_rows,
                                       sample_chunk, score_rows, task_rng)
from g2rpo_jax.eval.metrics import macro_average, resolve_pass_k, summarize_task
from g2rpo_jax.eval.report import RecordWriter, logger, output_files, progress_line, write_summary
from g2rpo_jax.eval.settings import EvalSettings
from g2rpo_jax.eval.tasks import EvalTask, TaskSpec, resolve_tasks

CompletionsFn = Callable[[list[data.Example], int], Sequence[Sequence[str]]]


class TaskTally:
    """The scores of one task's rows as they are recorded, in any order.

    correct: int [P], fully correct samples per problem; rewards, accuracy: float32 [P, k];
    generations: in recording order; stats: reward event counts.
    """

    def __init__(self, num_problems: int, num_samples: int):
        self.num_samples = num_samples
        self.correct = np.zeros(num_problems, np.int64)  # [P]
        self.rewards = np.zeros((num_problems, num_samples), np.float32)  # [P, k]
        self.accuracy = np.zeros((num_problems, num_samples), np.float32)  # [P, k]
        self.samples_done = np.zeros(num_problems, np.int64)  # [P]
        self.generations: list[Generation] = []
        self.stats = dict.fromkeys(REWARD_EVENTS, 0)

    def add(self, row: Row, generation: Generation, reward: float, accuracy: float) -> bool:
        """Records one row; returns whether it passed (accuracy 1: answer right, or every test)."""
        problem, sample_index = row
        passed = bool(accuracy >= 1.0)
        self.correct[problem] += passed
        self.rewards[problem, sample_index], self.accuracy[problem, sample_index] = reward, accuracy
        self.samples_done[problem] += 1
        self.generations.append(generation)
        return passed

    def add_stats(self, chunk_stats: dict) -> None:
        for key in self.stats:
            self.stats[key] += int(chunk_stats.get(key, 0))

    @property
    def rows_done(self) -> int:
        return len(self.generations)

    @property
    def problems_done(self) -> int:
        return int((self.samples_done == self.num_samples).sum())

    def metrics(self, pass_k: Sequence[int]) -> dict[str, Any]:
        return summarize_task(self.correct, self.rewards.reshape(-1), self.accuracy.reshape(-1),
                              self.generations, pass_k)


def _task_prompts(task: EvalTask, tokenizer, prompt: data.PromptSettings):
    """(examples kept by the length policy, their prompt ids or None without a tokenizer, the
    number dropped). Raises ValueError when no prompt is left."""
    if tokenizer is not None:
        prepared = data.prepare_prompts(task.examples, tokenizer, prompt, with_trajectories=False)
        examples, prompt_ids, dropped = list(prepared.examples), prepared.prompt_ids, prepared.report.dropped
    else:
        examples, prompt_ids, dropped = list(task.examples), None, 0
    if not examples:
        raise ValueError(f"task {task.name!r}: every prompt was dropped by the length policy "
                         f"(max_prompt_tokens={prompt.max_prompt_tokens})")
    if dropped:
        logger.warning("eval %s: %d of %d prompts dropped by the length policy; metrics cover the rest",
                       task.name, dropped, len(task.examples))
    return examples, prompt_ids, dropped


def _prompt_texts(examples: Sequence[data.Example], tokenizer, prompt: data.PromptSettings) -> list[str]:
    """The prompt each problem was asked with (as the model saw it, when there is a tokenizer)."""
    if tokenizer is None:
        return [e.prompt if e.prompt is not None else json.dumps(list(e.messages)) for e in examples]
    return [data.prompt_text(e, tokenizer, prompt) for e in examples]


def _chunk_generator(task: EvalTask, examples, prompt_ids, cfg, params, tokenizer, settings: EvalSettings,
                     completions_fn: CompletionsFn | None, mesh, rules) -> Callable[[tuple[int, list[Row]]], list[Generation]]:
    """generate((chunk index, rows)) -> a Generation per row: the sampler's (key: the task's key
    folded with the chunk index), or completions_fn's, asked once for the whole task."""
    if completions_fn is not None:
        external = external_generations(completions_fn, examples, settings.num_samples)
        return lambda indexed: [external[p][s] for p, s in indexed[1]]
    key = task_rng(settings.seed, task.name)
    stop_ids, pad_id = data.stop_token_ids(tokenizer), data.pad_token_id(tokenizer)

    def generate(indexed: tuple[int, list[Row]]) -> list[Generation]:
        chunk_index, rows = indexed
        return sample_chunk(cfg, params, tokenizer, [prompt_ids[p] for p, _ in rows],
                            rng=jax.random.fold_in(key, chunk_index), stop_ids=stop_ids, pad_id=pad_id,
                            mesh=mesh, rules=rules, **settings.sampler_options())
    return generate


def _check_positions(task: EvalTask, prompt_ids, max_new_tokens: int, cfg) -> None:
    """Refuses a task whose longest prompt plus the completion budget exceeds the model's positions."""
    longest = max(map(len, prompt_ids), default=0)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"task {task.name!r}: the longest prompt ({longest} tokens) + max_new_tokens={max_new_tokens} "
                         f"= {longest + max_new_tokens} positions, more than the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}; lower max_new_tokens or prompt.max_prompt_tokens")


def evaluate_task(task: EvalTask, cfg, params, tokenizer, settings: EvalSettings, records: RecordWriter, *,
                  completions_fn: CompletionsFn | None = None, pool: rewards.RewardPool | None = None,
                  mesh=None, rules=None, pass_k: Sequence[int] | None = None) -> dict[str, Any]:
    """One task: generate settings.num_samples completions per problem in chunks of
    settings.batch_size rows, score them (overlapped with the next chunk's sampling when there is
    a reward pool), write each to `records`, log progress; returns the task's metrics (pass@k for
    each k of pass_k, None = resolved from the settings)."""
    started = time.monotonic()
    pass_k = resolve_pass_k(settings.pass_k, settings.num_samples) if pass_k is None else pass_k
    examples, prompt_ids, dropped = _task_prompts(task, tokenizer, settings.prompt)
    if completions_fn is None:
        _check_positions(task, prompt_ids, settings.max_new_tokens, cfg)
    texts = _prompt_texts(examples, tokenizer, settings.prompt)
    generate = _chunk_generator(task, examples, prompt_ids, cfg, params, tokenizer, settings, completions_fn, mesh,
                                rules)
    lengths = [len(ids) for ids in prompt_ids] if prompt_ids is not None else [0] * len(examples)
    chunks = plan_rows(lengths, settings.num_samples, settings.batch_size)
    tally = TaskTally(len(examples), settings.num_samples)
    total_rows = len(examples) * settings.num_samples
    logger.info("eval %s: %d problems x %d samples = %d rows in %d chunks", task.name, len(examples),
                settings.num_samples, total_rows, len(chunks))

    def score(indexed, generations: list[Generation]):
        return score_rows([g.text for g in generations], [examples[p] for p, _ in indexed[1]],
                          settings.rewards, pool)

    def record(indexed, generations: list[Generation], scored) -> None:
        reward, accuracy, details, chunk_stats = scored
        tally.add_stats(chunk_stats)
        for row, generation, r, a, detail in zip(indexed[1], generations, reward, accuracy, details):
            passed = tally.add(row, generation, r, a)
            records.write({
                "task": task.name, "problem_id": examples[row[0]].id, "sample_index": row[1],
                "prompt": texts[row[0]], "completion": generation.text, "reward": float(r),
                "passed": passed, "details": detail, "num_tokens": generation.num_tokens,
                "finish_reason": generation.finish_reason,
            })
        logger.info("%s", progress_line(task.name, tally.problems_done, len(examples), tally.rows_done,
                                        total_rows, time.monotonic() - started))

    # rollout imports the train step (and orbax, whose import configures the root logger when it
    # has no handler yet): imported here, the package stays light and the CLI's log format holds.
    from g2rpo_jax import rollout  # noqa: PLC0415

    # Background scoring needs a reward pool: in-process scoring stays in the calling thread.
    rollout.pipelined(enumerate(chunks), generate, score, record, overlap=pool is not None)
    metrics = tally.metrics(pass_k)
    metrics.update(prompts_dropped=dropped, reward_stats=tally.stats, source=task.source,
                   seconds=time.monotonic() - started)
    return metrics


@contextlib.contextmanager
def _reward_pool(pool: rewards.RewardPool | None, settings: rewards.RewardSettings) -> Iterator:
    """The given pool; else one started for the block when settings.num_workers > 0; else None."""
    if pool is not None or settings.num_workers <= 0:
        yield pool
        return
    own = rewards.RewardPool(settings.num_workers)
    try:
        yield own
    finally:
        own.close()


def evaluate(cfg, params, tokenizer, tasks: Sequence[str | TaskSpec | EvalTask] | str,
             settings: EvalSettings | None = None, *, output_dir: str | None = None,
             completions_fn: CompletionsFn | None = None, pool: rewards.RewardPool | None = None,
             mesh=None, rules=None, step: int | None = None) -> dict[str, Any]:
    """Samples settings.num_samples completions per problem of every task, scores them, returns the summary.

    tasks: registry names / 'file:PATH:ADAPTER' strings (or one comma-separated string),
    TaskSpecs, or EvalTasks already loaded (what a training loop keeps between evaluations).
    settings: the protocol (None = EvalSettings(), the defaults). completions_fn(examples, k) ->
    k completion strings per example replaces the model (cfg and params are then unused;
    tokenizer may be None). pool: a started RewardPool to score on; None starts one for this
    call when settings.rewards.num_workers > 0 (code runs in sandboxed subprocesses either way).
    output_dir: where generations.jsonl, summary.json and summary.md go (None = no files).
    step: the training step, recorded in the files. mesh, rules: the device mesh the sampler shards
    its rows over and the config's mesh.rules (None = the default rules).

    Returns {"tasks": {name: metrics}, "macro_average": {...}, "settings": {...}, "step", "files"}.
    Raises ValueError for bad settings or tasks before any sampling.
    """
    settings = settings or EvalSettings()
    if completions_fn is None and (tokenizer is None or params is None or cfg is None):
        raise ValueError("evaluate needs cfg, params and tokenizer unless completions_fn replaces the model")
    ks = resolve_pass_k(settings.pass_k, settings.num_samples)
    loaded = resolve_tasks(tasks, settings.data_root, settings.limit)
    files = output_files(output_dir)
    results = {}
    with RecordWriter(files.get("generations"), step) as records, _reward_pool(pool, settings.rewards) as pool:
        for task in loaded:
            results[task.name] = evaluate_task(task, cfg, params, tokenizer, settings, records,
                                               completions_fn=completions_fn, pool=pool, mesh=mesh, rules=rules,
                                               pass_k=ks)
            records.flush()
            logger.info("eval %s: %s", task.name,
                        ", ".join(f"pass@{k}={results[task.name][f'pass@{k}']:.4f}" for k in ks))
    summary = {"tasks": results, "macro_average": macro_average(results, ks),
               "settings": settings.summary(ks, "completions_fn" if completions_fn else "sampler"),
               "step": step, "files": files}
    if output_dir:
        write_summary(summary, output_dir)
    return summary

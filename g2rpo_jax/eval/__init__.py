"""Benchmark evaluation: k sampled completions per problem, scored with the verifiable rewards.

    summary = evaluate(cfg, params, tokenizer, ["math500", "humaneval"],
                       EvalSettings(num_samples=4), output_dir="runs/x/eval/step_100")
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

The default protocol (Qwen3's thinking-mode sampling, 4 samples, 4096 new tokens) and every other
option live in the config (`get_default_config`), read once into `EvalSettings`. `evaluate` is a
pure function of its inputs (no global state) so the training loop calls it periodically with the
live parameters and its own reward pool. Progress is logged on the `g2rpo_jax.eval` logger.

Modules: tasks (registry, loading), metrics (pass@k, summaries), settings (config, EvalSettings),
generation (rows: planning, sampling, scoring), report (files, table, progress lines), harness
(`evaluate`), cli (`python -m g2rpo_jax.eval`).
"""

from g2rpo_jax.eval.cli import main, parse_command_line, run
from g2rpo_jax.eval.generation import (Generation, external_generations, plan_rows, sample_chunk,
                                       score_rows, task_rng)
from g2rpo_jax.eval.harness import TaskTally, evaluate, evaluate_task
from g2rpo_jax.eval.metrics import (flat_metrics, macro_average, parse_pass_k, pass_at_k, resolve_pass_k,
                                    summarize_task)
from g2rpo_jax.eval.report import (GENERATIONS_FILE, SUMMARY_JSON_FILE, SUMMARY_MD_FILE, RecordWriter,
                                   format_duration, logger, markdown_table, progress_line, write_summary)
from g2rpo_jax.eval.settings import (DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, DEFAULT_NUM_SAMPLES,
                                     DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, EvalSettings,
                                     evaluate_options, get_default_config)
from g2rpo_jax.eval.tasks import (ADAPTER_REWARDS, DATA_ROOT_ENV, FILE_TASK_PREFIX, REWARD_KINDS, TASKS,
                                  EvalTask, TaskSpec, default_data_root, load_task, parse_task,
                                  parse_task_list, resolve_tasks)

__all__ = [
    "ADAPTER_REWARDS", "DATA_ROOT_ENV", "DEFAULT_BATCH_SIZE", "DEFAULT_MAX_NEW_TOKENS", "DEFAULT_NUM_SAMPLES",
    "DEFAULT_TEMPERATURE", "DEFAULT_TOP_K", "DEFAULT_TOP_P", "EvalSettings", "EvalTask", "FILE_TASK_PREFIX",
    "GENERATIONS_FILE", "Generation", "REWARD_KINDS", "RecordWriter", "SUMMARY_JSON_FILE", "SUMMARY_MD_FILE",
    "TASKS", "TaskSpec", "TaskTally", "default_data_root", "evaluate", "evaluate_options", "evaluate_task",
    "external_generations", "flat_metrics", "format_duration", "get_default_config", "load_task", "logger",
    "macro_average", "main", "markdown_table", "parse_command_line", "parse_pass_k", "parse_task",
    "parse_task_list", "pass_at_k", "plan_rows", "progress_line", "resolve_pass_k", "resolve_tasks", "run",
    "sample_chunk", "score_rows", "summarize_task", "task_rng", "write_summary",
]

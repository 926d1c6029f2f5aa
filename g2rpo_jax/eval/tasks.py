"""Benchmark tasks: the registry, `file:PATH:ADAPTER` tasks, and reading a task's problems.

Registry files are read from the data root ($G2RPO_SHARED_DATA, else <repo>/../shared/data); when
a file is missing there the task's Hugging Face dataset is tried instead.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from g2rpo_jax import data
from g2rpo_jax.data.loading import LOCAL_SUFFIXES

DATA_ROOT_ENV = "G2RPO_SHARED_DATA"
FILE_TASK_PREFIX = "file:"
REWARD_KINDS = ("math", "code")

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
    """$G2RPO_SHARED_DATA, else <repo>/../shared/data (the repo holding the g2rpo_jax package)."""
    if os.environ.get(DATA_ROOT_ENV):
        return os.environ[DATA_ROOT_ENV]
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../g2rpo_jax
    return os.path.normpath(os.path.join(os.path.dirname(package), "..", "shared", "data"))


def _file_task_name(path: str) -> str:
    """'dir/my_set.jsonl.gz' -> 'my_set'."""
    base = os.path.basename(path)
    for suffix in LOCAL_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def parse_task(task: str) -> TaskSpec:
    """A registry name, or 'file:PATH:ADAPTER' for any local file read through an adapter.

    Raises ValueError naming the known tasks and adapters for anything else.
    """
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
    check_unique_names([s.name for s in specs])
    return specs


def check_unique_names(names: Sequence[str]) -> None:
    """Raises ValueError if a task name repeats (reports are keyed by name)."""
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


def _read_examples(spec: TaskSpec, root: str, read_limit: int | None) -> tuple[str, list[data.Example]]:
    """(where the problems came from, the problems): the local file, else the hub dataset."""
    path = _local_file(spec.local_path, root) if spec.local_path else None
    if path is not None:
        return path, data.load_examples(path, spec.adapter, limit=read_limit)
    if not spec.hub_name:
        raise ValueError(f"task {spec.name!r}: no such file {spec.local_path!r} (also looked under "
                         f"the data root {root!r})")
    source = f"{spec.hub_name} (split {spec.hub_split or 'train'})"
    try:
        return source, data.load_examples(spec.hub_name, spec.adapter, split=spec.hub_split or None,
                                          limit=read_limit)
    except (ValueError, ImportError) as error:
        raise ValueError(
            f"task {spec.name!r}: {spec.local_path!r} is not under the data root {root!r} "
            f"(set ${DATA_ROOT_ENV} or data_root) and the Hugging Face dataset could not be "
            f"read instead: {error}"
        ) from error


def load_task(spec: TaskSpec | str, data_root: str | None = None, limit: int | None = None) -> EvalTask:
    """Reads a task's problems (the first `limit` after the task's own selection; None/0 = all).

    Raises ValueError for a negative limit, a missing file, problems of the wrong kind for the
    task's reward, or no usable problem.
    """
    spec = parse_task(spec) if isinstance(spec, str) else spec
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit!r} must be None, 0 (all) or positive")
    root = data_root or default_data_root()
    read_limit = None if spec.task_id_range else (limit or None)  # select first, then limit
    source, examples = _read_examples(spec, root, read_limit)
    examples = [e for e in examples if _in_task_id_range(e, spec.task_id_range)]
    if limit:
        examples = examples[:limit]
    wrong = [e.id for e in examples if ("code" if e.is_code else "math") != spec.reward]
    if wrong:
        raise ValueError(f"task {spec.name!r} expects {spec.reward} problems, but {wrong[:3]} are not")
    if not examples:
        raise ValueError(f"task {spec.name!r}: no usable problems in {source}")
    return EvalTask(spec.name, tuple(examples), source)


def resolve_tasks(tasks: str | Sequence[str | TaskSpec | EvalTask], data_root: str | None,
                  limit: int | None) -> list[EvalTask]:
    """Loaded tasks from names ('math500,aime24' or a list), specs or tasks already loaded (an
    EvalTask is cut to `limit`, not re-read); raises ValueError for a repeated name."""
    specs = parse_task_list(tasks) if isinstance(tasks, str) else list(tasks)
    loaded = [_as_task(t, data_root, limit or None) for t in specs]
    check_unique_names([t.name for t in loaded])
    return loaded


def _as_task(task: str | TaskSpec | EvalTask, data_root: str | None, limit: int | None) -> EvalTask:
    if isinstance(task, EvalTask):
        return dataclasses.replace(task, examples=task.examples[:limit]) if limit else task
    return load_task(task, data_root, limit)

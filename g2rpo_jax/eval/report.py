"""What an evaluation writes: generations.jsonl (every completion with its score), summary.json,
summary.md (a markdown table), and progress lines on the `g2rpo_jax.eval` logger."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping

logger = logging.getLogger("g2rpo_jax.eval")

GENERATIONS_FILE = "generations.jsonl"
SUMMARY_JSON_FILE = "summary.json"
SUMMARY_MD_FILE = "summary.md"


def output_files(output_dir: str | None) -> dict[str, str]:
    """{'generations', 'summary_json', 'summary_md'} -> paths under output_dir ({} for None)."""
    if not output_dir:
        return {}
    return {name: os.path.join(output_dir, file) for name, file in
            (("generations", GENERATIONS_FILE), ("summary_json", SUMMARY_JSON_FILE),
             ("summary_md", SUMMARY_MD_FILE))}


class RecordWriter:
    """Appends one JSON line per generation to `path` (nothing when path is None); a context
    manager that creates the folder, opens the file for writing and closes it.

    step: the training step, written first in every record when not None.
    """

    def __init__(self, path: str | None, step: int | None = None):
        self.path, self.step, self._handle = path, step, None

    def __enter__(self) -> RecordWriter:
        if self.path:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._handle = open(self.path, "w", encoding="utf-8")
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def write(self, record: Mapping[str, Any]) -> None:
        if self._handle is not None:
            if self.step is not None:
                record = {"step": self.step, **record}
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()


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


def write_summary(summary: Mapping[str, Any], output_dir: str) -> None:
    """summary.json and summary.md in output_dir (overwritten)."""
    with open(os.path.join(output_dir, SUMMARY_JSON_FILE), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    with open(os.path.join(output_dir, SUMMARY_MD_FILE), "w", encoding="utf-8") as handle:
        handle.write(markdown_table(summary))


# ----------------------------------------------------------------------------- progress

def format_duration(seconds: float) -> str:
    """A short duration: '42s', '3m07s', '2h05m'; '?' for a value that is not finite."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(task: str, problems_done: int, num_problems: int, rows_done: int, total_rows: int,
                  elapsed_s: float) -> str:
    """'eval math500: 12/500 problems, 48/2000 rows (2%), 3.10 rows/s, 15s elapsed, ETA 10m30s'.

    A row is one sampled completion (problem x sample); a problem is done when all its samples
    are scored. rows/s and the ETA assume the rest goes at the average rate so far.
    """
    rate = rows_done / elapsed_s if elapsed_s > 0 else 0.0
    remaining = (total_rows - rows_done) / rate if rate > 0 else float("nan")
    percent = 100.0 * rows_done / total_rows if total_rows else 100.0
    return (f"eval {task}: {problems_done}/{num_problems} problems, {rows_done}/{total_rows} rows "
            f"({percent:.0f}%), {rate:.2f} rows/s, {format_duration(elapsed_s)} elapsed, "
            f"ETA {format_duration(remaining)}")

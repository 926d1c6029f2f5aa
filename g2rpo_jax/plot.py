"""Training curves of one or more runs, from their metrics.jsonl, in one PNG and one HTML report.

    python -m g2rpo_jax.plot RUN_DIR [RUN_DIR ...] [--out FILE.png] [--html FILE.html | --no_html]
                             [--panels reward/mean,guidance/length]

Each panel is one metric over the training step, with one line per run, so ablations (GRPO, fixed
or adaptive guidance, ...) compare at a glance. The default panels are the ones that tell whether
guidance works: reward for guided and unguided rollouts, the guidance length ℓ, accuracy, the
evaluation pass@1 of every task, the loss, KL, entropy, gradient norm and completion length;
panels no run logged are left out. A resumed run may log a step twice; the last record wins.
Every run has its own colour, line style and marker, so runs whose curves coincide stay visible.
A run without rewards (the SFT baseline) draws no reward or accuracy line.

The figure goes to RUN_DIR/curves.png (the first run's directory) unless --out names a file; the
report (g2rpo_jax.plot_report: the figure, the config keys the runs differ in and each run's final
numbers, in one self-contained file) goes next to it with the suffix .html unless --html names one.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import io
import json
import math
import os
import re
import sys
from typing import Collection, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from g2rpo_jax import plot_report  # noqa: E402

DEFAULT_PANELS = (
    "reward/mean",
    "guidance/reward_guided",
    "guidance/reward_unguided",
    "guidance/length",
    "accuracy/mean",
    "eval/*/pass@1",
    "loss",
    "kl",
    "entropy",
    "grad_norm",
    "completion_length/mean",
)
# Metrics of scored rollouts; a run trained without rewards logs them as placeholders only.
REWARD_PREFIXES = ("reward/", "accuracy/", "guidance/reward_", "guidance/step_reward")
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "v", "D", "x", "P", "*")
# Columns of the final-numbers table: name -> metric.
FINAL_KEYS = (("reward", "reward/mean"), ("accuracy", "accuracy/mean"), ("ℓ", "guidance/length"), ("loss", "loss"))
EVAL_PASS_AT_1 = "eval/*/pass@1"
MARKS_PER_LINE = 12  # markers drawn along a line; staggered between runs


@dataclasses.dataclass(frozen=True)
class Run:
    """One run directory as the plot sees it."""

    label: str
    directory: str
    records: list  # metrics.jsonl, one dict per line
    config: Optional[dict]  # config.json, None when the directory has none

    @property
    def has_reward(self) -> bool:
        return has_reward(self.records, self.config)


def read_metrics(run_dir: str) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl. A last line cut short by a crash is skipped."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        where = "" if os.path.isdir(run_dir) else f" (the directory {run_dir} itself does not exist)"
        raise FileNotFoundError(f"{path} does not exist{where}; pass the run directory that "
                                "`python -m g2rpo_jax.train` wrote (its --config.run.workdir)")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a text file of JSON lines: {error}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}:{number} is not a JSON object: {line[:80]!r}") from None
            print(f"[plot] skipping the unfinished last line of {path}", file=sys.stderr)
            continue
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number} is not a JSON object: {line[:80]!r}")
        records.append(record)
    return records


def read_config(run_dir: str) -> Optional[dict]:
    """RUN_DIR/config.json as written by the training entry point; None (with a note) when it is
    missing or unreadable, since the curves do not need it."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        print(f"[plot] ignoring {path}: {error}", file=sys.stderr)
        return None
    return config if isinstance(config, dict) else None


def run_labels(run_dirs: Sequence[str]) -> list[str]:
    """Short unique names: each directory's last path component, extended by its parents while
    two runs would share a name (runs/grpo/seed0 and runs/naive/seed0 -> grpo/seed0, naive/seed0)."""
    parts = [os.path.abspath(d).strip(os.sep).split(os.sep) for d in run_dirs]
    depth = [1] * len(parts)
    while True:
        labels = ["/".join(p[-n:]) for p, n in zip(parts, depth)]
        clashes = [i for i, label in enumerate(labels) if depth[i] < len(parts[i])
                   and any(other == label and parts[j] != parts[i] for j, other in enumerate(labels))]
        if not clashes:
            break
        for i in clashes:
            depth[i] += 1
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):  # the same directory given twice
        seen[label] = seen.get(label, 0) + 1
        labels[i] = label + "'" * (seen[label] - 1)
    return labels


def load_run(run_dir: str, label: str) -> Run:
    """A Run from RUN_DIR; a missing, empty or corrupt metrics.jsonl is an error naming it."""
    records = read_metrics(run_dir)
    if not any("step" in record for record in records):
        what = "is empty" if not records else "has no record with a 'step'"
        raise ValueError(f"{os.path.join(run_dir, 'metrics.jsonl')} {what}; the run {run_dir} has logged no "
                         "training step yet")
    return Run(label, run_dir, records, read_config(run_dir))


def has_reward(records: Sequence[Mapping], config: Optional[Mapping]) -> bool:
    """Whether a run scored rollouts: not an SFT run (step.loss_type 'sft') and some `reward/*` logged."""
    flat = plot_report.flatten(config or {})
    if any(key.split(".")[-1] == "loss_type" and value == "sft" for key, value in flat.items()):
        return False
    return any(key.startswith("reward/") for record in records for key in record)


def is_reward_metric(key: str) -> bool:
    """Whether a metric only means something for runs that score rollouts."""
    return key.startswith(REWARD_PREFIXES)


def series(records: Sequence[Mapping], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, sorted by step; the last record of a repeated step wins."""
    by_step = {}
    for record in records:
        value = record.get(key)
        if "step" in record and isinstance(value, (int, float)) and math.isfinite(value):
            by_step[int(record["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def expand_panels(patterns: Sequence[str], runs: Mapping[str, Sequence[Mapping]],
                  without_reward: Collection[str] = ()) -> list[str]:
    """The metric names to plot: each pattern in order, `*` standing for one path segment, kept
    only when some run draws it (runs in `without_reward` draw no reward metric)."""
    logged = sorted({key for label, records in runs.items() for record in records for key in record
                     if not (label in without_reward and is_reward_metric(key))})
    panels = []
    for pattern in patterns:
        regex = re.compile("[^/]+".join(map(re.escape, pattern.split("*"))))
        panels += [key for key in logged if regex.fullmatch(key) and key not in panels]
    return panels


def line_style(index: int, count: int, points: int) -> dict:
    """Matplotlib keywords for the index-th of `count` runs: its own colour, dash pattern and
    marker, the markers staggered along the line so identical curves show each run's marks."""
    every = max(1, points // MARKS_PER_LINE)
    return dict(color=f"C{index % 10}", linestyle=LINE_STYLES[index % len(LINE_STYLES)],
                marker=MARKERS[index % len(MARKERS)], markersize=4, markevery=(index * every // count, every),
                linewidth=1.4)


def unmatched_panel_warnings(patterns: Sequence[str], runs: Mapping[str, Sequence[Mapping]],
                             without_reward: Collection[str] = ()) -> list[str]:
    """One line per pattern that no run logged, with the closest logged names (a misspelled panel
    would otherwise just be missing from the figure)."""
    logged = sorted({key for records in runs.values() for record in records for key in record})
    warnings = []
    for pattern in patterns:
        if not expand_panels([pattern], runs, without_reward):
            near = difflib.get_close_matches(pattern, logged, n=3)
            warnings.append(f"no run logged {pattern!r}" + (f"; did you mean {', '.join(map(repr, near))}?"
                                                            if near else ""))
    return warnings


def render(runs: Mapping[str, Sequence[Mapping]], panels: Sequence[str], without_reward: Collection[str] = ()):
    """A figure with one axis per panel and one line per run (none for runs in `without_reward` on
    reward panels), integer steps on the x axes; returns the matplotlib Figure."""
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows + 0.4), squeeze=False,
                                layout="constrained")
    handles = {}
    for axis, key in zip(axes.flat, panels):
        for index, (label, records) in enumerate(runs.items()):
            if label in without_reward and is_reward_metric(key):
                continue
            steps, values = series(records, key)
            if steps:
                (handles[label],) = axis.plot(steps, values, label=label, **line_style(index, len(runs), len(steps)))
        axis.set_title(key, fontsize=10)
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.ticklabel_format(axis="y", useOffset=False)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    if len(runs) > 1:
        ordered = [label for label in runs if label in handles]
        figure.legend([handles[label] for label in ordered], ordered, loc="outside upper center",
                      ncols=min(len(ordered), 5), fontsize=8, frameon=False)
    return figure


def final_numbers(records: Sequence[Mapping], scored: bool = True,
                  eval_keys: Optional[Sequence[str]] = None) -> dict[str, Optional[float]]:
    """A run's end state: how many steps it logged and the last one, the last logged reward and
    accuracy (None for runs without rewards), ℓ, loss and each of `eval_keys` (default: the
    `eval/*/pass@1` it logged), and its time in seconds (logged step times plus evaluation times;
    None when no step time was logged). Metrics it never logged are None."""
    steps = sorted({int(record["step"]) for record in records if "step" in record})
    numbers: dict[str, Optional[float]] = {"steps": len(steps), "last step": steps[-1] if steps else None}
    keys = dict(FINAL_KEYS)
    if eval_keys is None:
        eval_keys = expand_panels([EVAL_PASS_AT_1], {"run": records})
    keys.update({key: key for key in eval_keys})
    for name, key in keys.items():
        values = series(records, key)[1]
        numbers[name] = values[-1] if values and (scored or not is_reward_metric(key)) else None
    step_times = series(records, "time/step_s")[1]
    eval_times = [sum(series(records, key)[1]) for key in expand_panels(["eval/*/seconds"], {"run": records})]
    numbers["time (s)"] = sum(step_times) + sum(eval_times) if step_times else None
    return numbers


def png_bytes(figure, dpi: int = 110) -> bytes:
    """The figure as PNG file contents."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG file to write (default: FIRST_RUN_DIR/curves.png)")
    parser.add_argument("--html", default=None, help="HTML report to write (default: the PNG's path with .html)")
    parser.add_argument("--no_html", action="store_true", help="write the PNG only")
    parser.add_argument("--panels", default=",".join(DEFAULT_PANELS),
                        help="comma-separated metric names; `*` matches one path segment (eval/*/pass@1)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    runs = [load_run(run_dir, label) for run_dir, label in zip(args.run_dirs, run_labels(args.run_dirs))]
    metrics = {run.label: run.records for run in runs}
    without_reward = {run.label for run in runs if not run.has_reward}
    requested = [p.strip() for p in args.panels.split(",") if p.strip()]
    panels = expand_panels(requested, metrics, without_reward)
    if args.panels != ",".join(DEFAULT_PANELS):  # names typed by hand: say which matched nothing
        for warning in unmatched_panel_warnings(requested, metrics, without_reward):
            print(f"[plot] warning: {warning}", file=sys.stderr)
    if not panels:
        print(f"[plot] none of the panels {args.panels!r} is in the runs' metrics; pass --panels with names "
              "from metrics.jsonl", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.run_dirs[0], "curves.png")
    figure = render(metrics, panels, without_reward)
    image = png_bytes(figure)
    plt.close(figure)
    with open(out, "wb") as f:
        f.write(image)
    written = [out]
    if not args.no_html:
        html_path = args.html or os.path.splitext(out)[0] + ".html"
        eval_keys = expand_panels([EVAL_PASS_AT_1], metrics)
        page = plot_report.page([(run.label, run.directory, run.config) for run in runs],
                                {run.label: final_numbers(run.records, run.has_reward, eval_keys) for run in runs},
                                [(f"{len(panels)} panels: {', '.join(panels)}", image)])
        with open(html_path, "w", encoding="utf-8") as f:
            f.write(page)
        written.append(html_path)
    steps = {run.label: len({record["step"] for record in run.records if "step" in record}) for run in runs}
    print(f"[plot] {len(panels)} panels ({', '.join(panels)}); steps per run {steps} -> {', '.join(written)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as error:
        print(f"[plot] error: {error}", file=sys.stderr)
        sys.exit(2)

"""Training curves of one or more runs, from their metrics.jsonl, in one PNG.

    python -m g2rpo_jax.plot RUN_DIR [RUN_DIR ...] [--out FILE] [--panels reward/mean,guidance/length]

Each panel is one metric over the training step, with one line per run, so ablations (GRPO, fixed
or adaptive guidance, ...) compare at a glance. The default panels are the ones that tell whether
guidance works: reward for guided and unguided rollouts, the guidance length ℓ, accuracy, the
evaluation pass@1 of every task, the loss, KL, entropy, gradient norm and completion length;
panels no run logged are left out. A resumed run may log a step twice; the last record wins.
The figure goes to RUN_DIR/curves.png (the first run's directory) unless --out names a file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

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


def read_metrics(run_dir: str) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl. A last line cut short by a crash is skipped."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; pass the run directory that `python -m g2rpo_jax.train` "
                                "wrote (its --config.workdir)")
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}:{number} is not a JSON object: {line[:80]!r}") from None
            print(f"[plot] skipping the unfinished last line of {path}", file=sys.stderr)
    return records


def series(records: Sequence[Mapping], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, sorted by step; the last record of a repeated step wins."""
    by_step = {}
    for record in records:
        value = record.get(key)
        if "step" in record and isinstance(value, (int, float)) and math.isfinite(value):
            by_step[int(record["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def expand_panels(patterns: Sequence[str], runs: Mapping[str, Sequence[Mapping]]) -> list[str]:
    """The metric names to plot: each pattern in order, `*` standing for one path segment, kept
    only when some run logged it."""
    logged = sorted({key for records in runs.values() for record in records for key in record})
    panels = []
    for pattern in patterns:
        regex = re.compile("[^/]+".join(map(re.escape, pattern.split("*"))))
        panels += [key for key in logged if regex.fullmatch(key) and key not in panels]
    return panels


def render(runs: Mapping[str, Sequence[Mapping]], panels: Sequence[str]):
    """A figure with one axis per panel and one line per run; returns the matplotlib Figure."""
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    for axis, key in zip(axes.flat, panels):
        for label, records in runs.items():
            steps, values = series(records, key)
            if steps:
                axis.plot(steps, values, marker="." if len(steps) < 40 else None, label=label)
        axis.set_title(key, fontsize=10)
        axis.set_xlabel("step")
        axis.ticklabel_format(axis="y", useOffset=False)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=8)
    figure.tight_layout()
    return figure


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG file to write (default: FIRST_RUN_DIR/curves.png)")
    parser.add_argument("--panels", default=",".join(DEFAULT_PANELS),
                        help="comma-separated metric names; `*` matches one path segment (eval/*/pass@1)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    runs = {}
    for run_dir in args.run_dirs:
        label = os.path.basename(os.path.normpath(run_dir))
        while label in runs:  # two runs with the same folder name in different places
            label += "'"
        runs[label] = read_metrics(run_dir)
    panels = expand_panels([p.strip() for p in args.panels.split(",") if p.strip()], runs)
    if not panels:
        print(f"[plot] none of the panels {args.panels!r} is in the runs' metrics; pass --panels with names "
              "from metrics.jsonl", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.run_dirs[0], "curves.png")
    figure = render(runs, panels)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    steps = {label: len({record["step"] for record in records if "step" in record}) for label, records in runs.items()}
    print(f"[plot] {len(panels)} panels ({', '.join(panels)}); steps per run {steps} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

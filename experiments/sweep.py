"""Sweeps: a grid of config overrides expanded into training runs, run one after another here (or
printed, or handed to a launcher), then their final evaluation numbers collected in one table.

    python experiments/sweep.py --config=experiments/configs/g2rpo.py:qwen3_1_7b_math,g2rpo_a \\
        --set model.checkpoint=/ckpt/Qwen3-1.7B --grid guidance.alpha=0.125,0.25,0.5 \\
        --grid guidance.delta=128,256 --out runs/sweeps/alpha_delta --final_eval paper_math
    ... --print                       the commands, one per line; nothing runs
    ... --launcher gpu --launcher_args="--nodes 2 --partition gpu"   each run through launch/gpu.py
    ... --collect                     only the table of the runs already in --out

Before anything is printed or run, each run's config and overrides are checked as the train
command checks them at start-up: a bad config file, key or value stops the sweep with that
one-line error and exit status 2.

--grid KEY=V1,V2,... (repeatable) spans the grid: every combination, the first key varying
slowest. KEY is a config key (as after --config.) or `method`, which sets the method of the
preset (`...g2rpo.py:qwen3_1_7b_math,<method>`). --set KEY=VALUE (repeatable) applies to every
run and stays out of the names. A run's directory is OUT/<name>, the name being its grid
overrides, e.g. `alpha=0.25,delta=128` (the last part of each key, or the whole key where two
last parts clash; '/' and spaces in values become '_'). Its output goes to OUT/<name>/train.log.

Runs are ordinary `python -m g2rpo_jax.train` runs, from the repository root: a run whose
final_hf/ exists is skipped (--rerun runs it again, which resumes from its last checkpoint, e.g.
after raising run.total_steps) and an interrupted one resumes. --final_eval PRESET evaluates each
finished run's final_hf with experiments/configs/eval.py:PRESET into OUT/<name>/final_eval/
(through a launcher the evaluation commands are printed instead). The table (OUT/sweep.md and
OUT/sweep.csv, also printed) has one row per run: its grid values, its status, where its numbers
come from and, per task, the --metrics (default pass@1) from final_eval/summary.json when it
exists, else from the last evaluation in metrics.jsonl. Runs handed to a launcher may finish
elsewhere; run with --collect once their directories are readable here.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import itertools
import json
import os
import shlex
import subprocess
import sys
from typing import Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = "experiments/sweep.py"
EVAL_CONFIG = "experiments/configs/eval.py"
METHOD_KEY = "method"
TABLE_MD, TABLE_CSV = "sweep.md", "sweep.csv"
FINAL_EVAL_DIR = "final_eval"


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    workdir: str
    point: Mapping[str, str]  # grid key -> value
    train_args: tuple[str, ...]  # --config=... and --config.KEY=VALUE arguments


# ----------------------------------------------------------------------------- the grid

def parse_assignment(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key = key.strip().removeprefix("--config.")
    if not sep or not key:
        raise ValueError(f"{flag} {text!r}: write KEY=VALUE (e.g. {flag} guidance.alpha=0.5)")
    return key, value


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """['guidance.alpha=0.25,0.5', ...] -> [('guidance.alpha', ['0.25', '0.5']), ...]."""
    grid = []
    for item in items:
        key, values = parse_assignment(item, "--grid")
        values = [v.strip() for v in values.split(",")]
        if any(not v for v in values) or len(set(values)) != len(values):
            raise ValueError(f"--grid {item!r}: give distinct, non-empty values separated by commas")
        if key in dict(grid):
            raise ValueError(f"--grid {key} appears twice; list all its values in one --grid")
        grid.append((key, values))
    return grid


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """The last dotted part of each key, or the whole key where two keys share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def run_name(point: Mapping[str, str], names: Mapping[str, str]) -> str:
    parts = [f"{names[k]}={v}" for k, v in point.items()]
    name = ",".join(parts) or "base"
    return name.replace(os.sep, "_").replace(" ", "_")


def with_method(config: str, method: str) -> str:
    """'FILE:preset[,old]' -> 'FILE:preset,method'."""
    path, sep, arg = config.partition(":")
    if not sep:
        raise ValueError(f"--grid method=... needs a preset in --config ({config!r} has no ':<preset>')")
    return f"{path}:{arg.split(',')[0]},{method}"


def plan(config: str, grid: Sequence[tuple[str, list[str]]], fixed: Sequence[tuple[str, str]],
         out: str) -> list[Run]:
    """Every grid point as a run: its name, directory and train arguments."""
    keys = [k for k, _ in grid]
    names = short_names(keys)
    runs = []
    for values in itertools.product(*[v for _, v in grid]):
        point = dict(zip(keys, values))
        workdir = os.path.join(out, run_name(point, names))
        config_arg = with_method(config, point[METHOD_KEY]) if METHOD_KEY in point else config
        overrides = [(k, v) for k, v in fixed] + [(k, v) for k, v in point.items() if k != METHOD_KEY]
        args = [f"--config={config_arg}", *[f"--config.{k}={v}" for k, v in overrides],
                f"--config.run.workdir={workdir}"]
        runs.append(Run(os.path.basename(workdir), workdir, point, tuple(args)))
    if len({r.name for r in runs}) != len(runs):
        raise ValueError(f"grid values give the same run name twice: {[r.name for r in runs]}")
    return runs


# ----------------------------------------------------------------------------- commands

def train_command(run: Run, launcher: str, launcher_args: str) -> list[str]:
    if launcher:
        return [sys.executable, os.path.join("launch", f"{launcher}.py"), *shlex.split(launcher_args),
                *run.train_args]
    return [sys.executable, "-m", "g2rpo_jax.train", *run.train_args]


def eval_command(run: Run, preset: str) -> list[str]:
    return [sys.executable, "-m", "g2rpo_jax.eval", f"--config={EVAL_CONFIG}:{preset}",
            f"--checkpoint={os.path.join(run.workdir, 'final_hf')}",
            f"--output_dir={os.path.join(run.workdir, FINAL_EVAL_DIR)}"]


def check_runs(runs: Sequence[Run]) -> str | None:
    """The one-line error `python -m g2rpo_jax.train` would stop with at start-up (a bad config
    file, key or value) for the first run that has one, else None; from the repository root, where
    the runs start."""
    from g2rpo_jax import train  # noqa: PLC0415 (only needed once there are runs to check)

    for run in runs:
        error = train.check_args(PROGRAM, run.train_args, root=REPO)
        if error:
            return error
    return None


def is_finished(run: Run) -> bool:
    return os.path.isfile(os.path.join(run.workdir, "final_hf", "config.json"))


def run_subprocess(command: Sequence[str], log_path: str) -> int:
    """Runs a command from the repository root, its output appended to log_path."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        return subprocess.run(list(command), cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode


def train_in_process(run: Run) -> int:
    """The train command's config parsed as `python -m g2rpo_jax.train` parses it, trained here
    from the repository root like a subprocess run (programs compiled for one run are reused by
    the next; for CPU-sized sweeps and tests)."""
    from g2rpo_jax import command_line, train  # noqa: PLC0415

    with command_line.working_directory(REPO):  # relative paths mean what they mean to subprocess runs
        try:
            train.train(command_line.parse_config_args(PROGRAM, run.train_args))
        except Exception as error:  # noqa: BLE001 (one failed run must not end the sweep)
            print(f"[sweep] {run.name} failed: {error!r}", flush=True)
            return 1
    return 0


def execute(runs: Sequence[Run], args: argparse.Namespace) -> dict[str, str]:
    """Runs every run in turn (skipping finished ones); returns name -> status."""
    status = {}
    for index, run in enumerate(runs, start=1):
        print(f"[sweep] {index}/{len(runs)} {run.name}", flush=True)
        if is_finished(run) and not args.rerun:
            status[run.name] = "done (reused)"
        else:
            log = os.path.join(run.workdir, "train.log")
            code = (train_in_process(run) if args.in_process
                    else run_subprocess(train_command(run, args.launcher, args.launcher_args), log))
            status[run.name] = "done" if code == 0 else f"failed (exit {code}, see {log})"
        if args.final_eval and args.launcher:
            print(f"[sweep] once {run.name} has finished: {shlex.join(eval_command(run, args.final_eval))}")
        elif args.final_eval and status[run.name].startswith("done"):
            code = run_subprocess(eval_command(run, args.final_eval), os.path.join(run.workdir, "eval.log"))
            if code:
                status[run.name] = f"final eval failed (exit {code})"
        print(f"[sweep] {run.name}: {status[run.name]}", flush=True)
    return status


# ----------------------------------------------------------------------------- the table

def read_jsonl(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    return records


def final_numbers(workdir: str, metrics: Sequence[str]) -> tuple[str, dict[str, float]]:
    """(where the numbers come from, {'<task> <metric>': value}) of one run directory."""
    summary_path = os.path.join(workdir, FINAL_EVAL_DIR, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as handle:
            summary = json.load(handle)
        numbers = {f"{task} {m}": float(values[m]) for task, values in summary["tasks"].items()
                   for m in metrics if m in values}
        return FINAL_EVAL_DIR, numbers
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    records = read_jsonl(metrics_path) if os.path.isfile(metrics_path) else []
    evaluated = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not evaluated:
        return "no evaluation yet", {}
    last = evaluated[-1]
    numbers = {}
    for key, value in last.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval" and parts[2] in metrics:
            numbers[f"{parts[1]} {parts[2]}"] = float(value)
    return f"step {last['step']}", numbers


def table_rows(runs: Sequence[Run], metrics: Sequence[str], status: Mapping[str, str]) -> tuple[list[str], list[list]]:
    """Header and rows: run, grid values, status, source, then every metric column seen."""
    keys = list(runs[0].point) if runs else []
    names = short_names(keys)
    found = [(run, *final_numbers(run.workdir, metrics)) for run in runs]
    columns = sorted({c for _, _, numbers in found for c in numbers},
                     key=lambda c: (c.startswith("average "), c))
    header = ["run", *[names[k] for k in keys], "status", "numbers from", *columns]
    rows = [[run.name, *[run.point[k] for k in keys], status.get(run.name, ""), source,
             *[numbers.get(c, "") for c in columns]] for run, source, numbers in found]
    return header, rows


def markdown(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_tables(out: str, header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """OUT/sweep.md (4 decimals) and OUT/sweep.csv (every digit); returns the markdown."""
    os.makedirs(out, exist_ok=True)
    text = markdown(header, rows)
    with open(os.path.join(out, TABLE_MD), "w", encoding="utf-8") as handle:
        handle.write(text)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows([[repr(v) if isinstance(v, float) else v for v in row] for row in rows])
    with open(os.path.join(out, TABLE_CSV), "w", encoding="utf-8", newline="") as handle:
        handle.write(buffer.getvalue())
    return text


# ----------------------------------------------------------------------------- command line

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiments/configs/g2rpo.py:<preset>[,<method>]")
    parser.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... (repeatable)")
    parser.add_argument("--set", action="append", default=[], dest="fixed", help="KEY=VALUE for every run")
    parser.add_argument("--out", required=True, help="the sweep's folder; runs are OUT/<name>")
    parser.add_argument("--print", action="store_true", dest="print_only", help="print the commands only")
    parser.add_argument("--launcher", choices=("gpu", "tpu"), default="",
                        help="run each through launch/gpu.py or launch/tpu.py (default: here, one after another)")
    parser.add_argument("--launcher_args", default="", help="the launcher's own flags, as one string")
    parser.add_argument("--final_eval", default="", help="eval preset (experiments/configs/eval.py) for final_hf")
    parser.add_argument("--metrics", default="pass@1", help="comma-separated per-task metrics of the table")
    parser.add_argument("--collect", action="store_true", help="only collect the table")
    parser.add_argument("--rerun", action="store_true", help="train runs whose final_hf exists again")
    parser.add_argument("--in_process", action="store_true",
                        help="train in this process (CPU-sized sweeps: compiled programs are shared)")
    args = parser.parse_args(argv)
    if args.launcher_args and not args.launcher:
        parser.error("--launcher_args needs --launcher gpu or tpu")
    if args.in_process and args.launcher:
        parser.error("--in_process trains here; it cannot go with --launcher")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        grid = parse_grid(args.grid)
        fixed = [parse_assignment(item, "--set") for item in args.fixed]
        # Local runs get absolute directories; through a launcher the path is the remote one.
        runs = plan(args.config, grid, fixed, args.out if args.launcher else os.path.abspath(args.out))
    except ValueError as error:
        raise SystemExit(f"{PROGRAM}: {error}") from error
    error = None if args.collect else check_runs(runs)  # before any command is printed or run
    if error:
        print(error, file=sys.stderr)
        return 2
    if args.print_only:
        for run in runs:
            print(shlex.join(train_command(run, args.launcher, args.launcher_args)))
            if args.final_eval:
                print(shlex.join(eval_command(run, args.final_eval)))
        return 0
    status = {} if args.collect else execute(runs, args)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    print(write_tables(args.out, *table_rows(runs, metrics, status)), end="")
    print(f"[sweep] table: {os.path.join(args.out, TABLE_MD)}, {os.path.join(args.out, TABLE_CSV)}")
    return 1 if any(s.startswith(("failed", "final eval failed")) for s in status.values()) else 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())

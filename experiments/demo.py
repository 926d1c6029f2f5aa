"""The demo experiment (`make demo`): G²RPO-A against GRPO and fixed guidance, on a laptop CPU.

    python experiments/demo.py                     # the full experiment: 4 methods x 3 seeds
    python experiments/demo.py --seeds 0 --rl_steps 50 --methods grpo,g2rpo_a   # a smaller one

The task is 4-digit addition worked column by column (experiments/data/make_addition.py), the model
a tiny Qwen3 with a character-level tokenizer. Every stage is an ordinary run of the training entry
point, `python -m g2rpo_jax.train --config=experiments/configs/g2rpo.py:demo,<variant>`:

  1. the warm start: SFT on the reference trajectories from random init, stopped at a low but
     non-zero held-out accuracy, so that most GRPO groups get no reward at all;
  2. from that checkpoint, with the same steps, batch and learning rate, for every seed: GRPO,
     naive guidance (ℓ fixed at the adaptive schedule's start, α = ½ and α = 1) and G²RPO-A
     (ℓ adapted from the reward trend, α = ½);
  3. OUT/summary.json, a table on the console, OUT/demo.png and OUT/report.html.

Held-out accuracy is greedy, unguided, on the held-out split, which no run trains on. Finished runs
are reused and an interrupted one resumes from its last checkpoint, so re-running continues where
the last invocation stopped; `rm -r runs/demo` starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import os
import subprocess
import sys
import time
from typing import Mapping, Sequence

import numpy as np

from g2rpo_jax import plot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/configs/g2rpo.py"
HELDOUT_KEY = "eval/addition_heldout/pass@1"

# name -> (config variant, extra overrides). Everything else comes from the `demo` preset, so every
# method gets the same warm start, steps, batch, group size and learning rate.
METHODS = {
    "grpo": ("grpo", ()),
    "naive": ("naive", ()),  # ℓ fixed at guidance.initial_length, α = ½
    "naive_alpha1": ("naive", ("--config.guidance.alpha=1.0",)),  # every rollout guided
    "g2rpo_a": ("adaptive", ()),
}
LABELS = {"grpo": "GRPO", "naive": "naive ℓ fixed, α=½", "naive_alpha1": "naive ℓ fixed, α=1",
          "g2rpo_a": "G²RPO-A (adaptive ℓ)"}
COLORS = {"grpo": "tab:gray", "naive": "tab:orange", "naive_alpha1": "tab:red", "g2rpo_a": "tab:blue"}
# Methods whose curves coincide (e.g. all at zero) stay visible: GRPO wide underneath, the naive
# ones dashed and dotted on top.
LINES = {"grpo": dict(linewidth=3.5, linestyle="-"), "naive": dict(linewidth=1.8, linestyle="--"),
         "naive_alpha1": dict(linewidth=1.8, linestyle=":"), "g2rpo_a": dict(linewidth=1.8, linestyle="-")}

# The warm start: SFT at a constant 1e-3 for a fixed number of steps. Held-out accuracy climbs
# steeply around here (about 1% at 400 steps, 7% at 450, 25% at 500 on one machine), so the step
# count is fixed rather than searched per run.
SFT_STEPS = 450
SFT_OVERRIDES = ("--config.optim.learning_rate=1e-3", "--config.optim.min_learning_rate=1e-3")


@dataclasses.dataclass
class Run:
    name: str  # 'sft' or '<method>/seed<k>'
    workdir: str
    args: list[str]  # the train command's arguments after `python -m g2rpo_jax.train`
    total_steps: int
    method: str = ""  # '' for the warm start
    seed: int = 0

    def command(self) -> list[str]:
        return [sys.executable, "-m", "g2rpo_jax.train", *self.args]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="experiment directory")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run per method each")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--rl_steps", type=int, default=300, help="RL steps per run")
    parser.add_argument("--sft_steps", type=int, default=SFT_STEPS, help="steps of the SFT warm start")
    parser.add_argument("--eval_every", type=int, default=50, help="steps between held-out evaluations")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="runs trained at once, each pinned to its own core (default: the core count)")
    parser.add_argument("--extra", action="append", default=[],
                        help="a --config.<key>=<value> override for every RL run (repeatable)")
    args = parser.parse_args(argv)
    args.seeds = parse_seeds(parser, args.seeds)
    args.methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods has unknown {unknown}; valid: {list(METHODS)}")
    if not args.methods:
        parser.error(f"--methods is empty; give at least one of {list(METHODS)}")
    require_positive(parser, args, ("rl_steps", "sft_steps", "eval_every", "jobs"))
    return args


def parse_seeds(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2], each seed once in the order given; a parser error otherwise."""
    try:
        seeds = list(dict.fromkeys(int(s) for s in text.split(",") if s.strip()))
    except ValueError:
        parser.error(f"--seeds={text!r} is not a comma-separated list of integers, e.g. --seeds 0,1,2")
    if not seeds:
        parser.error("--seeds is empty; give at least one seed, e.g. --seeds 0")
    return seeds


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, flags: Sequence[str]) -> None:
    for flag in flags:
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}={getattr(args, flag)} must be at least 1")


def train_args(variant: str, workdir: str, steps: int, eval_every: int, extra: Sequence[str]) -> list[str]:
    """Arguments of one training run. Its last step is always among the evaluated ones."""
    every = eval_every if steps % eval_every == 0 else steps
    return [f"--config={CONFIG}:demo,{variant}", f"--config.run.workdir={workdir}",
            f"--config.run.total_steps={steps}", f"--config.optim.total_steps={steps}",
            f"--config.run.eval_every={every}", "--config.run.log_every=25", *extra]


def plan(args: argparse.Namespace) -> tuple[Run, list[Run]]:
    """The SFT warm-start run and the RL runs that start from its final checkpoint."""
    out = os.path.abspath(args.out)
    # All runs compile the same programs: one persistent cache spares every run after the first.
    cache = f"--config.mesh.compilation_cache_dir={os.path.join(out, 'xla_cache')}"
    sft_dir = os.path.join(out, "sft")
    sft = Run("sft", sft_dir, train_args("sft", sft_dir, args.sft_steps, args.sft_steps, (*SFT_OVERRIDES, cache)),
              args.sft_steps)
    warm_start = os.path.join(sft_dir, "final_hf")
    runs = []
    for method in args.methods:
        variant, overrides = METHODS[method]
        for seed in args.seeds:
            workdir = os.path.join(out, method, f"seed{seed}")
            extra = (cache, f"--config.model.checkpoint={warm_start}", "--config.model.random_init=False",
                     f"--config.run.seed={seed}", f"--config.data.seed={seed}", *overrides, *args.extra)
            runs.append(Run(f"{method}/seed{seed}", workdir,
                            train_args(variant, workdir, args.rl_steps, args.eval_every, extra), args.rl_steps,
                            method, seed))
    return sft, runs


# ----------------------------------------------------------------------------- running


def steps_done(run: Run) -> int:
    """The last step recorded in the run's metrics.jsonl (0 when it has none yet)."""
    try:
        records = plot.read_metrics(run.workdir)
    except (FileNotFoundError, ValueError):
        return 0
    return max((int(r["step"]) for r in records), default=0)


def is_finished(run: Run) -> bool:
    return steps_done(run) >= run.total_steps and os.path.isfile(os.path.join(run.workdir, "final_hf", "config.json"))


def start(run: Run, core: int | None) -> subprocess.Popen:
    """Starts a training run in the background, its output in WORKDIR/train.log, pinned to `core`."""
    os.makedirs(run.workdir, exist_ok=True)
    log = open(os.path.join(run.workdir, "train.log"), "a")
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log:  # the child keeps its own copy of the file descriptor
        return subprocess.Popen(run.command(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=pin)


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def run_all(runs: Sequence[Run], jobs: int, started_at: float) -> None:
    """Trains the unfinished `runs`, `jobs` at a time, printing progress (runs, steps, and the ETA
    of this stage at the step rate seen since its first step) until all are done."""
    pending = [r for r in runs if not is_finished(r)]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    jobs = min(jobs, max(len(pending), 1))
    running: dict[str, tuple[Run, subprocess.Popen, int | None]] = {}
    total_steps = sum(r.total_steps for r in pending)
    first_done = {r.name: steps_done(r) for r in pending}
    first_step_at, last_report = None, 0.0
    while pending or running:
        while pending and len(running) < jobs:
            run = pending.pop(0)
            free = [c for c in cores if c not in {core for _, _, core in running.values()}]
            core = free[0] if free and jobs > 1 else None
            running[run.name] = (run, start(run, core), core)
            print(f"[demo] started {run.name}: python -m g2rpo_jax.train {' '.join(run.args)}", flush=True)
        time.sleep(1.0)
        for name, (run, process, _) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            if process.returncode != 0 or not is_finished(run):
                raise SystemExit(f"[demo] run {name} failed (exit {process.returncode}); its log: "
                                 f"{os.path.join(run.workdir, 'train.log')}")
            print(f"[demo] finished {name}", flush=True)
        if time.time() - last_report >= 15 or not (pending or running):
            last_report = time.time()
            done = sum(min(steps_done(r), r.total_steps) - first_done[r.name] for r in runs if r.name in first_done)
            if done and first_step_at is None:
                first_step_at = time.time()  # the rate leaves out the first compilation
            seconds = time.time() - first_step_at if first_step_at else 0.0
            left = total_steps - sum(first_done.values()) - done
            eta = format_seconds(left * seconds / done) if seconds > 0 and done else "?"
            states = ", ".join(f"{n} {steps_done(r)}/{r.total_steps}" if steps_done(r) else f"{n} starting"
                               for n, (r, _, _) in running.items())
            print(f"[demo] {len(runs) - len(pending) - len(running)}/{len(runs)} runs done | {states or '-'} | "
                  f"elapsed {format_seconds(time.time() - started_at)} | stage ETA {eta}", flush=True)


# ----------------------------------------------------------------------------- results


def last_value(records: Sequence[Mapping], key: str, step: int) -> float:
    """`key` as logged at `step` (the last record of that step wins, as after a resume)."""
    steps, values = plot.series(records, key)
    by_step = dict(zip(steps, values))
    if step not in by_step:
        raise ValueError(f"no {key!r} was logged at step {step}")
    return float(by_step[step])


def mean_over_steps(records: Sequence[Mapping], key: str) -> float:
    _, values = plot.series(records, key)
    return float(np.mean(values)) if values else float("nan")


def summarize(sft: Run, runs: Sequence[Run], methods: Sequence[str], seconds: float) -> dict:
    """summary.json's content, computed from the runs' metrics.jsonl files only."""
    sft_records = plot.read_metrics(sft.workdir)
    summary: dict = {"methods": {}, "warm_start_heldout_accuracy": last_value(sft_records, HELDOUT_KEY, sft.total_steps)}
    for method in methods:
        method_runs = [r for r in runs if r.method == method]
        records = [plot.read_metrics(r.workdir) for r in method_runs]
        summary["methods"][method] = {
            "heldout_accuracy": [last_value(rec, HELDOUT_KEY, r.total_steps) for rec, r in zip(records, method_runs)],
            "zero_std_group_share": float(np.mean([mean_over_steps(rec, "zero_std_group_fraction") for rec in records])),
            "adv_std_mean": float(np.mean([mean_over_steps(rec, "guidance/advantage_std") for rec in records])),
            "seeds": [r.seed for r in method_runs],
            "reward_guided_mean": float(np.mean([mean_over_steps(rec, "guidance/reward_guided") for rec in records])),
            "reward_unguided_mean": float(np.mean([mean_over_steps(rec, "guidance/reward_unguided") for rec in records])),
            "guidance_length_mean": float(np.mean([mean_over_steps(rec, "guidance/length") for rec in records])),
            "runs": [os.path.relpath(r.workdir, os.path.dirname(sft.workdir)) for r in method_runs],
        }
    summary["seconds"] = float(seconds)
    return summary


def table(summary: Mapping) -> str:
    """The console table: one row per method."""
    methods = summary["methods"]
    header = ("method", "held-out acc per seed", "mean", "vs GRPO per seed", "zero-std groups", "adv std",
              "reward guided / free")
    rows = []
    grpo = methods.get("grpo")
    for name, m in methods.items():
        accuracy = m["heldout_accuracy"]
        versus = ("-" if grpo is None or name == "grpo" else
                  " ".join(f"{a - g:+.3f}" for a, g in zip(accuracy, grpo["heldout_accuracy"])))
        rows.append((LABELS.get(name, name), " ".join(f"{a:.3f}" for a in accuracy), f"{np.mean(accuracy):.3f}",
                     versus, f"{m['zero_std_group_share']:.1%}", f"{m['adv_std_mean']:.3f}",
                     f"{m['reward_guided_mean']:.3f} / {m['reward_unguided_mean']:.3f}"))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def findings(summary: Mapping) -> list[str]:
    """The two claims the demo tests, stated from the numbers, whichever way they come out."""
    methods = summary["methods"]
    lines = [f"Warm start (SFT) held-out accuracy: {summary['warm_start_heldout_accuracy']:.3f}."]
    if "grpo" in methods and "g2rpo_a" in methods:
        margins = [a - g for a, g in zip(methods["g2rpo_a"]["heldout_accuracy"], methods["grpo"]["heldout_accuracy"])]
        verdict = "ahead of" if all(m > 0 for m in margins) else "NOT ahead of"
        lines.append(f"G²RPO-A is {verdict} GRPO on every seed: margins {', '.join(f'{m:+.3f}' for m in margins)} "
                     f"(held-out accuracy, greedy, no guidance).")
    if "naive_alpha1" in methods and "g2rpo_a" in methods:
        naive, adaptive = methods["naive_alpha1"], methods["g2rpo_a"]
        collapsed = (naive["adv_std_mean"] < adaptive["adv_std_mean"]
                     and naive["zero_std_group_share"] > adaptive["zero_std_group_share"])
        lines.append(f"Fixed guidance on every rollout (α=1) {'collapses' if collapsed else 'does NOT collapse'} the "
                     f"advantage signal: advantage std {naive['adv_std_mean']:.3f} vs {adaptive['adv_std_mean']:.3f} "
                     f"for G²RPO-A, zero-std groups {naive['zero_std_group_share']:.1%} vs "
                     f"{adaptive['zero_std_group_share']:.1%}.")
    return lines


def smooth(values: Sequence[float], window: int = 20) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def draw(sft: Run, runs: Sequence[Run], methods: Sequence[str], path: str) -> None:
    """demo.png: held-out accuracy (mean, seeds shaded), guided/unguided reward, zero-std share,
    advantage std and ℓ over the training steps, one colour per method."""
    import matplotlib.pyplot as plt

    panels = [(HELDOUT_KEY, "held-out accuracy (greedy, no guidance)", False),
              ("guidance/reward_guided", "reward of guided rollouts", True),
              ("guidance/reward_unguided", "reward of unguided rollouts", True),
              ("zero_std_group_fraction", "share of zero-std groups", True),
              ("guidance/advantage_std", "advantage std", True),
              ("guidance/length", "guidance length ℓ", False)]
    figure, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    warm = last_value(plot.read_metrics(sft.workdir), HELDOUT_KEY, sft.total_steps)
    for axis, (key, title, smoothed) in zip(axes.flat, panels):
        for method in methods:
            curves = []
            for run in (r for r in runs if r.method == method):
                steps, values = plot.series(plot.read_metrics(run.workdir), key)
                if key == HELDOUT_KEY:  # every run starts from the warm start's accuracy
                    steps, values = [0, *steps], [warm, *values]
                curves.append((steps, smooth(values) if smoothed else np.asarray(values)))
            if not curves or not curves[0][0]:
                continue
            length = min(len(c[1]) for c in curves)
            steps = curves[0][0][:length]
            stacked = np.stack([c[1][:length] for c in curves])
            axis.plot(steps, stacked.mean(axis=0), color=COLORS[method], label=LABELS[method], **LINES[method])
            if len(curves) > 1:
                axis.fill_between(steps, stacked.min(axis=0), stacked.max(axis=0), color=COLORS[method], alpha=0.2)
        axis.set_title(title + (" (20-step mean)" if smoothed else ""))
        axis.set_xlabel("RL step")
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.suptitle("G²RPO-A vs GRPO and fixed guidance, 4-digit addition, tiny Qwen3 (lines: mean over seeds; "
                    "bands: min-max)")
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_report(summary: Mapping, text_table: str, commands: Sequence[str], path: str) -> None:
    """A one-page HTML report: what was run, the table, the plot and what they show."""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in findings(summary))
    command_list = html.escape("\n".join(commands))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>g2rpo-jax demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}}
pre{{background:#f4f4f4;padding:.8em;overflow-x:auto;font-size:12px}}img{{width:100%}}</style></head><body>
<h1>G²RPO-A vs GRPO on 4-digit addition</h1>
<p>A tiny Qwen3 (2 layers, width 64, character-level tokenizer) is warm-started by SFT on worked
column-by-column solutions until it gets a few held-out problems right, then trained with RL from that
same checkpoint by each method with the same steps, batch (8 prompts × 8 rollouts), learning rate and
seeds. Guidance forces the first ℓ tokens of the worked solution into a fraction α of each group's
rollouts; GRPO has none; naive guidance fixes ℓ; G²RPO-A adapts ℓ from the reward trend. Held-out
accuracy is greedy and unguided on problems no run trains on. Reward is 1 only for the exact boxed answer.</p>
<ul>{items}</ul>
<pre>{html.escape(text_table)}</pre>
<p>Zero-std groups are groups whose rollouts all got the same reward: they give every rollout a zero
advantage and teach nothing. The advantage std is taken over all rollouts of a step (zeros of such
groups included) and averaged over steps. Both are means over all training steps and seeds.</p>
<img src="demo.png" alt="training curves">
<h2>Commands</h2><pre>{command_list}</pre>
<p>Total time: {summary['seconds'] / 60:.1f} minutes.</p></body></html>"""
    with open(path, "w") as f:
        f.write(page)


def accumulated_seconds(out: str, seconds: float) -> float:
    """Wall time spent on the experiment over every invocation (a resumed or reused one adds its
    own), kept in OUT/elapsed_seconds.txt."""
    path = os.path.join(out, "elapsed_seconds.txt")
    if os.path.isfile(path):
        with open(path) as f:
            seconds += float(f.read())
    with open(path, "w") as f:
        f.write(f"{seconds:.1f}\n")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    sft, runs = plan(args)
    print(f"[demo] {len(args.methods)} method(s) x {len(args.seeds)} seed(s), {args.rl_steps} RL steps each, "
          f"after {args.sft_steps} SFT steps; {args.jobs} run(s) at a time; output in {out}", flush=True)
    reused = [r for r in [sft, *runs] if is_finished(r)]
    if reused:
        print(f"[demo] reusing {len(reused)} finished run(s) of {len(runs) + 1}", flush=True)
    print("[demo] stage 1: the SFT warm start", flush=True)
    run_all([sft], 1, started_at)
    print(f"[demo] stage 2: {len(runs)} RL runs from its checkpoint", flush=True)
    run_all(runs, args.jobs, started_at)
    summary = summarize(sft, runs, args.methods, accumulated_seconds(out, time.time() - started_at))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    text_table = table(summary)
    draw(sft, runs, args.methods, os.path.join(out, "demo.png"))
    commands = [f"python -m g2rpo_jax.train {' '.join(r.args)}" for r in [sft, *runs]]
    write_report(summary, text_table, commands, os.path.join(out, "report.html"))
    print("\n" + text_table + "\n")
    for line in findings(summary):
        print(line)
    print(f"\n[demo] {out}/summary.json, demo.png and report.html written; the experiment took "
          f"{format_seconds(summary['seconds'])} in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())

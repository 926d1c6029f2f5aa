"""Ablations of the guided-RL options on the demo task: each option is one row, G²RPO-A plus that
option's overrides, with the demo's warm start, steps, batch, learning rate and seeds.

    python experiments/ablations.py                       # every row, 3 seeds (about 1 h 20 min on 2 cores)
    python experiments/ablations.py --rows baseline,hint --seeds 0

The warm start is the demo's SFT run (`--demo_out`, trained first if it is missing), so the rows are
comparable with the demo's table. Finished runs are reused and interrupted ones resume. Writes
OUT/ablations.json and OUT/ablations.md (the table in experiments/README.md) and prints the table.
Held-out accuracy is greedy and unguided on the held-out split, as in the demo.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Mapping, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402  (the demo's runner: plans, runs, metrics)

from g2rpo_jax import plot  # noqa: E402

# name -> (what it tests, overrides on top of the demo preset's G²RPO-A). Length-unit rows restate
# the token schedule (ℓ0 = 24, Δ = 4, ℓ ≤ 50 of a 63-token trajectory) in their own unit.
ROWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "baseline": ("G²RPO-A as in the demo (every option at its default)", ()),
    "hint": ("guide appended to the prompt as a hint, never trained on", ("guidance.placement=prompt",)),
    "all_fail": ("guide only groups whose unguided rollouts all fail, re-sampled", ("guidance.trigger=all_fail",)),
    "percent": ("ℓ in percent of the trajectory: ℓ0 38, Δ 6, ℓ ≤ 79",
                ("guidance.length_unit=percent", "guidance.initial_length=38", "guidance.delta=6",
                 "guidance.max_length=79")),
    "steps": ("ℓ in whole steps (';'): ℓ0 2, Δ 1, ℓ ≤ 4 (columns only)",
              ("guidance.length_unit=steps", "guidance.step_delimiter=;", "guidance.initial_length=2",
               "guidance.delta=1", "guidance.max_length=4")),
    "per_problem": ("one adaptive ℓ per training problem", ("guidance.per_problem=True",)),
    # 300 steps of 8 prompts meet each of 20,000 problems at most once: a per-problem ℓ never moves.
    # On a pool of 256 problems each comes back about 9 times.
    "pool256": ("G²RPO-A on the first 256 training problems only", ("data.limit=256",)),
    "pool256_per_problem": ("one ℓ per problem, on the first 256 training problems",
                            ("data.limit=256", "guidance.per_problem=True")),
    "guide_nll": ("UFT-style NLL on guide tokens, weight 0.1", ("step.guide_nll_coef=0.1",)),
    "guided_split": ("separate baselines for guided and unguided rollouts", ("step.advantage_baseline=guided_split",)),
    "refill": ("dynamic sampling: zero-spread groups replaced, ≤ 2 extra rounds", ("sampling.refill_rounds=2",)),
    "bf16_sampling": ("sampler in bf16, train step in f32 (drift logged, not corrected)", ("sampling.dtype=bfloat16",)),
    "bf16_tis_token": ("bf16 sampling with token-level TIS, C = 2", ("sampling.dtype=bfloat16", "step.tis=token")),
    "bf16_tis_sequence": ("bf16 sampling with sequence-level TIS, C = 2",
                          ("sampling.dtype=bfloat16", "step.tis=sequence")),
    "dual_clip": ("dual clip for negative advantages, c = 3", ("step.dual_clip_c=3.0",)),
    # With μ = 1 every ratio is 1 and the dual clip never binds: these two rows take μ = 2.
    "mu2": ("μ = 2 optimizer updates per batch (off policy: the row dual clip is compared with)",
            ("step.num_iterations=2",)),
    "mu2_dual_clip": ("μ = 2 with the dual clip, c = 3", ("step.num_iterations=2", "step.dual_clip_c=3.0")),
    "beta": ("KL to the warm start, β = 0.04 (k3)", ("step.beta=0.04",)),
    "beta_kl_clamp": ("β = 0.04 with the per-token KL clamped to 0.5", ("step.beta=0.04", "step.kl_clamp=0.5")),
    "entropy_bonus": ("entropy bonus, weight 0.01", ("step.entropy_coef=0.01",)),
    "entropy_mask": ("policy term on the top 20% entropy tokens only", ("step.entropy_top_fraction=0.2",)),
    # A reward of one's own (rewards.custom): the example in experiments/custom_reward.py.
    "digit_credit": ("partial credit per correct digit of the boxed answer (rewards.custom), weight 0.2",
                     ("rewards.custom=experiments/custom_reward.py:digit_credit", "rewards.weights.custom=0.2")),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/ablations", help="experiment directory")
    parser.add_argument("--demo_out", default="runs/demo", help="the demo's directory, whose SFT run is the warm start")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {list(ROWS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--rl_steps", type=int, default=300, help="RL steps per run (the demo's budget)")
    parser.add_argument("--sft_steps", type=int, default=demo.SFT_STEPS, help="steps of the SFT warm start")
    parser.add_argument("--eval_every", type=int, default=50, help="steps between held-out evaluations")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs trained at once, one per core")
    args = parser.parse_args(argv)
    args.rows = list(dict.fromkeys(r.strip() for r in args.rows.split(",") if r.strip()))
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown or not args.rows:
        parser.error(f"--rows has unknown or no rows {unknown}; valid: {list(ROWS)}")
    args.seeds = demo.parse_seeds(parser, args.seeds)
    demo.require_positive(parser, args, ("rl_steps", "sft_steps", "eval_every", "jobs"))
    return args


def plan(args: argparse.Namespace) -> tuple[demo.Run, list[demo.Run]]:
    """The demo's SFT run and one G²RPO-A run per row and seed from its final checkpoint."""
    demo_args = argparse.Namespace(out=args.demo_out, methods=["g2rpo_a"], seeds=args.seeds, rl_steps=args.rl_steps,
                                   sft_steps=args.sft_steps, eval_every=args.eval_every, extra=[])
    sft, demo_runs = demo.plan(demo_args)
    out = os.path.abspath(args.out)
    runs = []
    for row in args.rows:
        overrides = tuple(f"--config.{o}" for o in ROWS[row][1])
        for template in demo_runs:
            workdir = os.path.join(out, row, f"seed{template.seed}")
            arguments = [a.replace(template.workdir, workdir) if a.startswith("--config.run.workdir=") else a
                         for a in template.args]
            runs.append(demo.Run(f"{row}/seed{template.seed}", workdir, [*arguments, *overrides],
                                 template.total_steps, row, template.seed))
    return sft, runs


def stale_runs(sft: demo.Run, runs: Sequence[demo.Run]) -> list[demo.Run]:
    """Runs begun (config.json written) before the warm start's checkpoint was last written."""
    warm_start = os.path.getmtime(os.path.join(sft.workdir, "final_hf", "config.json"))
    begun = [r for r in runs if os.path.isfile(os.path.join(r.workdir, "config.json"))]
    return [r for r in begun if os.path.getmtime(os.path.join(r.workdir, "config.json")) < warm_start]


def row_summary(runs: Sequence[demo.Run]) -> dict:
    """Held-out accuracy per seed and the step means of the signals the options act on."""
    records = [plot.read_metrics(r.workdir) for r in runs]

    def mean(key: str) -> float | None:
        values = [demo.mean_over_steps(rec, key) for rec in records]
        values = [v for v in values if np.isfinite(v)]
        return float(np.mean(values)) if values else None

    return {
        "heldout_accuracy": [demo.last_value(rec, demo.HELDOUT_KEY, r.total_steps) for rec, r in zip(records, runs)],
        "seeds": [r.seed for r in runs],
        "zero_std_group_share": mean("zero_std_group_fraction"),
        "adv_std_mean": mean("guidance/advantage_std"),
        "guidance_length_mean": mean("guidance/length"),
        "extra_rollouts_per_step": mean("rollout/extra_rollouts"),
        "kept_group_share": mean("rollout/kept_group_share"),
        "logprob_abs_diff": mean("mismatch/logprob_abs_diff"),
        "seconds_per_step": mean("time/step_s"),
    }


def markdown(summary: Mapping) -> str:
    """The table of experiments/README.md: one row per option."""
    lines = ["| row | option | held-out acc (seeds) | mean | Δ vs baseline | zero-std groups | adv std | mean ℓ "
             "| extra rollouts / step | log-prob drift | s / step |", "|" + "---|" * 11]
    baseline = summary["rows"].get("baseline")
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    for name, row in summary["rows"].items():
        accuracy = row["heldout_accuracy"]
        delta = "–" if baseline is None or name == "baseline" else \
            f"{np.mean(accuracy) - np.mean(baseline['heldout_accuracy']):+.3f}"
        lines.append(
            f"| {name} | {ROWS[name][0]} | {' / '.join(f'{a:.3f}' for a in accuracy)} | {np.mean(accuracy):.3f} | "
            f"{delta} | {fmt(row['zero_std_group_share'], '.1%')} | {fmt(row['adv_std_mean'], '.3f')} | "
            f"{fmt(row['guidance_length_mean'], '.1f')} | {fmt(row['extra_rollouts_per_step'], '.1f')} | "
            f"{fmt(row['logprob_abs_diff'], '.1e')} | {fmt(row['seconds_per_step'], '.2f')} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    sft, runs = plan(args)
    print(f"[ablations] {len(args.rows)} row(s) x {len(args.seeds)} seed(s), {args.rl_steps} RL steps each, "
          f"warm start {sft.workdir}; output in {out}", flush=True)
    demo.run_all([sft], 1, started_at)
    stale = stale_runs(sft, runs)
    if stale:
        raise SystemExit(f"[ablations] {len(stale)} run(s) started before the warm start {sft.workdir}/final_hf was "
                         f"last written, so they trained from another one: {', '.join(r.name for r in stale)}. "
                         f"Remove them (rm -r {' '.join(r.workdir for r in stale)}) to retrain them from this one")
    demo.run_all(runs, args.jobs, started_at)
    summary = {
        "warm_start_heldout_accuracy": demo.last_value(plot.read_metrics(sft.workdir), demo.HELDOUT_KEY, sft.total_steps),
        "rows": {row: row_summary([r for r in runs if r.method == row]) for row in args.rows},
        "overrides": {row: list(ROWS[row][1]) for row in args.rows},
        "seconds": demo.accumulated_seconds(out, time.time() - started_at),
    }
    with open(os.path.join(out, "ablations.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = markdown(summary)
    with open(os.path.join(out, "ablations.md"), "w") as f:
        f.write(table + "\n")
    print(f"\nwarm start held-out accuracy {summary['warm_start_heldout_accuracy']:.3f}\n\n{table}\n")
    print(f"[ablations] {out}/ablations.json and ablations.md written ({demo.format_seconds(summary['seconds'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a training run shows while it runs: its metric sinks, sampled rollouts and progress bar.

`RunLogger` sends each step's metrics to every enabled sink of the run directory:

  metrics.jsonl       one JSON object per step (always)
  tensorboard/        TensorBoard event files, one scalar per metric per step (`run.tensorboard`,
                      written with tensorboardX; `tensorboard --logdir WORKDIR/tensorboard`)
  Weights & Biases    when `run.wandb_project` is set ('' = off) and the `wandb` package is
                      installed; `run.wandb_mode` 'online' or 'offline' (synced later with
                      `wandb sync`). The W&B run id is kept in WORKDIR/wandb_run_id, so a resumed
                      run continues the same W&B run (W&B keeps the values it already has for
                      the steps a resume repeats).

and the sampled rollouts to rollouts.jsonl (`run.rollout_samples` groups per step, 0 = off; RL
runs only): one record per rollout with its prompt, its reference answer (a code problem's tests),
its guide and sampled continuation as text, its rewards, its group advantage and whether its
group's rewards had zero spread (see `rollout_records`). Only process 0 writes; the logger is a
context manager that closes every sink on exit, also when the run fails.

`Progress` is the progress bar (tqdm) shown on an interactive terminal only; in a log file, a pipe
or a test the console lines are all there is.

Wall-clock measurements live under `time/` (seconds) and `throughput/` (tokens per second, also
per device), plus each evaluation's `eval/<task>/seconds`; they differ between two runs of the same
config (`WALL_CLOCK_PREFIXES`, `WALL_CLOCK_SUFFIXES`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import uuid
from typing import Any, Optional, Sequence, TextIO

import jax
import numpy as np

from g2rpo_jax import grpo

TENSORBOARD_DIR = "tensorboard"
ROLLOUTS_FILE = "rollouts.jsonl"
WANDB_ID_FILE = "wandb_run_id"
WANDB_MODES = ("online", "offline")
WALL_CLOCK_PREFIXES = ("time/", "throughput/")
WALL_CLOCK_SUFFIXES = ("/seconds",)  # an evaluation's wall time: eval/<task>/seconds
METHODS = ("sft", "grpo", "guided")  # what the console line and the progress bar show


# ----------------------------------------------------------------------------- config


def validate_config(run_cfg) -> None:
    """Checks the `run` section's logging keys; raises ValueError naming the key as typed, its bad
    value and the valid ones (also when a sink is turned on but its package is not installed)."""
    samples = run_cfg.get("rollout_samples", 0)
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        raise ValueError(f"run.rollout_samples={samples!r} is not valid; valid: an integer >= 0 (groups per step "
                         f"logged to {ROLLOUTS_FILE}; 0 = off)")
    tensorboard = run_cfg.get("tensorboard", True)
    if not isinstance(tensorboard, bool):
        raise ValueError(f"run.tensorboard={tensorboard!r} is not valid; valid: True or False")
    if tensorboard and importlib.util.find_spec("tensorboardX") is None:
        raise ValueError("run.tensorboard=True needs the tensorboardX package, which is not installed: "
                         "pip install tensorboardX==2.6.5, or set run.tensorboard=False")
    project, mode = run_cfg.get("wandb_project", ""), run_cfg.get("wandb_mode", "online")
    if not isinstance(project, str):
        raise ValueError(f"run.wandb_project={project!r} is not valid; valid: a W&B project name, or '' (off)")
    if mode not in WANDB_MODES:
        raise ValueError(f"run.wandb_mode={mode!r} is not valid; valid: {WANDB_MODES}")
    if project and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"run.wandb_project={project!r} (run.wandb_mode={mode!r}) turns on Weights & Biases "
                         "logging, but the wandb package is not installed: pip install wandb, or set "
                         "run.wandb_project='' to turn W&B off")


def method_kind(loss_type: str, guidance_mode: str) -> str:
    """'sft' (the supervised baseline), 'grpo' (RL without guidance) or 'guided' (G²RPO-A and the
    other guidance schedules): what the console line and the progress bar show."""
    if loss_type == "sft":
        return "sft"
    return "grpo" if guidance_mode == "none" else "guided"


def method_note(method: str, num_iterations: int) -> Optional[str]:
    """A one-time note for the start of a run, or None. Plain GRPO's logged loss puzzles readers:
    at μ = 1 each update is on policy, so the ratio π/π_old is exactly 1 and the policy loss is
    minus the (token-weighted) mean advantage, about 0, while its gradient is not zero."""
    if method != "grpo":
        return None
    note = ("note: plain GRPO (guidance.mode='none'): at μ=1 every update is on policy, the ratio π/π_old is 1 and "
            "the policy loss reads ~0 (a group's advantages average out), while its gradient is not zero; the "
            "console shows the share of zero-std groups instead of ℓ")
    return note + (f"; this run has μ={num_iterations}" if num_iterations != 1 else "")


def sandbox_summary(report: dict) -> str:
    """The reward sandbox's protections (`rewards.sandbox_protections()`) for the start of a run:
    a heading, then one `key: value` line per protection, lists and limits written out flat."""

    def flat(value) -> str:
        if isinstance(value, dict):
            return ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
        if isinstance(value, (list, tuple)):
            return ", ".join(str(v) for v in value) or "none"
        return str(value)

    return "reward sandbox:\n" + "\n".join(f"  {key}: {flat(value)}" for key, value in report.items())


def without_wall_clock(metrics: dict) -> dict:
    """The metrics that two runs of the same config reproduce exactly (no time/, throughput/ or
    eval/<task>/seconds)."""
    return {k: v for k, v in metrics.items()
            if not k.startswith(WALL_CLOCK_PREFIXES) and not k.endswith(WALL_CLOCK_SUFFIXES)}


# ----------------------------------------------------------------------------- throughput


def batch_token_counts(prompt_mask, completion_mask, guided_mask) -> tuple[int, int]:
    """(sampled tokens, trained tokens) of a batch: completion tokens the sampler generated (forced
    guide tokens excluded), and the prompt + completion tokens the train step processes (padding
    excluded in both)."""
    completion = np.asarray(completion_mask) > 0
    sampled = int(np.sum(completion & ~(np.asarray(guided_mask) > 0)))
    trained = int(np.sum(np.asarray(prompt_mask) > 0)) + int(np.sum(completion))
    return sampled, trained


def throughput_metrics(sampled_tokens: int, trained_tokens: int, sample_s: float, train_step_s: float,
                       step_s: float, device_count: int, train_step_flops: float = 0.0) -> dict:
    """Tokens per second of each stage of a step, and per device (÷ `device_count`):

      throughput/sample_tokens_per_s   sampled completion tokens / sampling time (RL only)
      throughput/train_tokens_per_s    prompt + completion tokens / the train step's time
      throughput/tokens_per_s          prompt + completion tokens / the whole step's time
      throughput/train_step_flops_per_s  the train step's model FLOPs (`train_step.model_flops`,
                                       padded shapes) / its time: the achieved FLOP/s

    each with a `_per_device` twin. A stage that took no time (no sampling in SFT) is left out.
    The train step counts a batch once, whatever its number of updates μ.
    """
    out = {}
    for name, tokens, seconds in (("sample_tokens_per_s", sampled_tokens, sample_s),
                                  ("train_tokens_per_s", trained_tokens, train_step_s),
                                  ("tokens_per_s", trained_tokens, step_s),
                                  ("train_step_flops_per_s", train_step_flops, train_step_s)):
        if seconds > 0 and tokens > 0:
            out[f"throughput/{name}"] = tokens / seconds
            out[f"throughput/{name}_per_device"] = tokens / seconds / device_count
    return out


# ----------------------------------------------------------------------------- rollouts.jsonl


def sample_groups(num_groups: int, count: int, seed: int, step: int) -> np.ndarray:
    """Sorted indices of `count` of a step's `num_groups` groups (all of them when fewer), drawn
    without replacement by a generator seeded with (seed, step): a rerun or a resume logs the same."""
    count = min(int(count), int(num_groups))
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step)])
    return np.sort(rng.choice(int(num_groups), size=count, replace=False))


def host_advantages(rewards, guided, group_size: int, *, scale: str, eps: float,
                    baseline: str = "group") -> tuple[np.ndarray, np.ndarray]:
    """(advantages float32 [N], zero-spread groups bool [N / G]) recomputed on the host.

    The train step does not return its advantages; these are the same function
    (`grpo.group_advantages`, `grpo.zero_std_groups`) on the same inputs (the batch's rewards and
    guided flags, the step's scale_rewards, advantage_eps and advantage_baseline), run on the CPU
    backend so no accelerator is involved. Accelerator reductions may differ in the last bits.
    """
    rewards = np.asarray(rewards, np.float32)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        advantages = grpo.group_advantages(rewards, group_size, scale=scale, eps=float(eps), baseline=baseline,
                                           guided=np.asarray(guided) > 0)
        zero_spread = grpo.zero_std_groups(rewards, group_size)
    return np.asarray(advantages, np.float32), np.asarray(zero_spread, bool)


def reference_answer(example):
    """What a rollout of `example` is scored against: the gold answer of a math problem, the tests
    of a code problem (as plain JSON values)."""
    if example.answer is not None:
        return example.answer
    return json.loads(json.dumps(example.tests))


def rollout_records(step: int, rollouts, tokenizer, prompt_ids: Sequence[Sequence[int]], examples: Sequence,
                    group_size: int, groups: Sequence[int], advantages: np.ndarray,
                    zero_spread: np.ndarray) -> list[dict]:
    """One rollouts.jsonl record per rollout of `groups` (indices of the step's groups of G).

    `rollouts`: the step's `rollout.Rollouts`; `prompt_ids`, `examples`: the prepared prompts and
    their `data.Example`s by problem row. A record holds the step, the group and the rollout's
    place in it, the problem row, the prompt as the model saw it (special tokens kept, a hint of
    placement 'prompt' excluded), the reference the rewards scored against (`answer`: the gold
    answer, or a code problem's tests), whether the rollout was guided, the guide and the sampled
    continuation apart as text (with their token counts), the total reward and the reward of each
    kind, the advantage and whether the group's rewards had zero spread. The guide is the hint
    appended to the prompt or the forced tokens at the start of the completion; guide +
    continuation is the text the rewards scored. Where token boundaries make the separately decoded
    pieces differ from it, the scored text is added as `text`.
    """
    records = []
    for group in groups:
        for member in range(group_size):
            i = int(group) * group_size + member
            problem = int(rollouts.problem_ids[i])
            prompt = [int(t) for t in prompt_ids[problem]]
            hint = [int(t) for t in rollouts.prompts[i][len(prompt):]]  # placement 'prompt' only
            completion = np.asarray(rollouts.mask[i]) > 0
            forced = completion & (np.asarray(rollouts.guided_mask[i]) > 0)
            tokens = np.asarray(rollouts.tokens[i])
            guide_ids = hint + tokens[forced].tolist()
            sampled_ids = tokens[completion & ~forced].tolist()
            text = rollouts.texts[i]
            guide = tokenizer.decode(guide_ids, skip_special_tokens=True)
            if text.startswith(guide):
                continuation = text[len(guide):]
            else:
                continuation = tokenizer.decode(sampled_ids, skip_special_tokens=True)
            record = {
                "step": int(step), "group": int(group), "rollout": member, "problem_id": problem,
                "prompt": tokenizer.decode(prompt, skip_special_tokens=False),
                "answer": reference_answer(examples[problem]),
                "guided": bool(rollouts.guided[i]), "guide": guide, "continuation": continuation,
                "guide_tokens": len(guide_ids), "continuation_tokens": len(sampled_ids),
                "reward": float(rollouts.rewards[i]),
                "rewards": {kind: float(values[i]) for kind, values in rollouts.per_kind.items()},
                "advantage": float(advantages[i]), "zero_spread": bool(zero_spread[int(group)]),
            }
            if guide + continuation != text:
                record["text"] = text
            records.append(record)
    return records


def step_rollout_records(step: int, rollouts, batch, tokenizer, prompt_ids: Sequence[Sequence[int]],
                         examples: Sequence, group_size: int, count: int, seed: int, *, scale: str, eps: float,
                         baseline: str) -> list[dict]:
    """The rollouts.jsonl records of a step: `count` of its groups (`sample_groups`), with the
    advantages the train step computed from `batch` (`host_advantages`)."""
    groups = sample_groups(len(rollouts) // group_size, count, seed, step)
    advantages, zero_spread = host_advantages(batch.rewards, batch.guided, group_size, scale=scale, eps=eps,
                                              baseline=baseline)
    return rollout_records(step, rollouts, tokenizer, prompt_ids, examples, group_size, groups, advantages,
                           zero_spread)


# ----------------------------------------------------------------------------- sinks


def numeric_scalars(metrics: dict) -> dict[str, float]:
    """The metrics that are numbers (bools and the step itself left out), as floats."""
    return {key: float(value) for key, value in metrics.items()
            if key != "step" and isinstance(value, (int, float, np.number)) and not isinstance(value, bool)}


def open_tensorboard(logdir: str, start_step: int):
    """A tensorboardX writer; after a resume from step S, TensorBoard discards what an earlier
    start wrote for steps after S (`purge_step`), as metrics.jsonl drops those records."""
    from tensorboardX import SummaryWriter

    # A file per start (the name's suffix): tensorboardX names files by the second, and would
    # overwrite an earlier start's file begun in the same second.
    return SummaryWriter(logdir=logdir, purge_step=start_step + 1 if start_step else None, flush_secs=30,
                         filename_suffix=f".start{start_step}.{os.getpid()}")


def wandb_run_id(workdir: str) -> str:
    """The run's W&B id, created at its first start and kept in WORKDIR/wandb_run_id."""
    path = os.path.join(workdir, WANDB_ID_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    run_id = uuid.uuid4().hex[:16]
    with open(path + ".tmp", "w") as f:
        f.write(run_id + "\n")
    os.replace(path + ".tmp", path)
    return run_id


def open_wandb(workdir: str, project: str, mode: str, config: Optional[dict]):
    """A W&B run (imported here: W&B is optional) named after the run directory, resumed by id."""
    try:
        import wandb
    except ImportError as error:
        raise ValueError(f"run.wandb_project={project!r} (run.wandb_mode={mode!r}) needs the wandb package: "
                         "pip install wandb, or set run.wandb_project='' to turn W&B off") from error
    name = os.path.join(*workdir.rstrip(os.sep).split(os.sep)[-2:])
    return wandb.init(project=project, mode=mode, dir=workdir, name=name, id=wandb_run_id(workdir),
                      resume="allow", config=config)


class RunLogger:
    """Fans a step's metrics out to metrics.jsonl, TensorBoard and W&B (the enabled ones), and
    sampled rollouts to rollouts.jsonl. Only the writing process (process 0) opens anything; on the
    others every call does nothing. Use as a context manager: leaving it closes every sink, also on
    an exception (W&B then records the run as failed)."""

    def __init__(self, workdir: str, *, start_step: int = 0, tensorboard: bool = True, wandb_project: str = "",
                 wandb_mode: str = "online", config: Optional[dict] = None, writer: bool = True):
        self.workdir, self.writer = workdir, writer
        self._metrics: Optional[TextIO] = None
        self._rollouts: Optional[TextIO] = None
        self._tensorboard = None
        self._wandb = None
        if not writer:
            return
        try:
            self._metrics = open(os.path.join(workdir, "metrics.jsonl"), "a")
            if tensorboard:
                self._tensorboard = open_tensorboard(os.path.join(workdir, TENSORBOARD_DIR), start_step)
            if wandb_project:
                self._wandb = open_wandb(workdir, wandb_project, wandb_mode, config)
        except BaseException:
            self.close(failed=True)
            raise

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(failed=exc_type is not None)

    def log_metrics(self, metrics: dict) -> None:
        """A step's record: its numbers to TensorBoard and W&B at step metrics['step'], then a line
        of metrics.jsonl (flushed). The line comes last: once it is in the file, the step's other
        records are written too (a watcher of the file, or a signal it prompts, sees them all)."""
        if self._metrics is None:
            return
        self.log_scalars(int(metrics["step"]), numeric_scalars(metrics))
        self._metrics.write(json.dumps(metrics) + "\n")
        self._metrics.flush()

    def log_scalars(self, step: int, scalars: dict) -> None:
        """Numbers for TensorBoard and W&B only, e.g. the time a checkpoint of `step` took to start
        (known only after the step's record was written)."""
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, global_step=step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(dict(scalars), step=step)

    def log_rollouts(self, records: Sequence[dict]) -> None:
        """Appends records to rollouts.jsonl (created at the first record)."""
        if not self.writer or not records:
            return
        if self._rollouts is None:
            self._rollouts = open(os.path.join(self.workdir, ROLLOUTS_FILE), "a")
        self._rollouts.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._rollouts.flush()

    def close(self, failed: bool = False) -> None:
        """Closes every open sink (each one even if another fails to close); safe to call twice."""
        errors = []
        for name in ("_metrics", "_rollouts", "_tensorboard", "_wandb"):
            sink = getattr(self, name)
            setattr(self, name, None)
            if sink is None:
                continue
            try:
                if name == "_wandb":
                    sink.finish(exit_code=1 if failed else 0)
                else:
                    sink.close()
            except Exception as error:  # noqa: BLE001 -- close the others, then report
                errors.append(error)
        if errors and not failed:
            raise errors[0]


# ----------------------------------------------------------------------------- the progress bar


def progress_enabled(stream: Any) -> bool:
    """True when `stream` is an interactive terminal; a log file, a pipe or a test's capture is not
    (nor a closed stream, or an object without `isatty`)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except (ValueError, OSError):
        return False


def progress_postfix(m: dict, method: str) -> str:
    """The bar's short summary of a step: the reward (SFT: its loss), ℓ for guided methods or the
    zero-std group share for GRPO, and the step's tokens per second."""
    get = lambda key: m.get(key, float("nan"))  # noqa: E731
    if method == "sft":
        parts = [f"loss {get('loss'):.4f}"]
    else:
        parts = [f"reward {get('reward/total'):.3f}"]
        parts.append(f"ℓ {get('guidance/length'):.0f}" if method == "guided"
                     else f"zero-std {get('zero_std_group_fraction'):.2f}")
    if "throughput/tokens_per_s" in m:
        parts.append(f"{m['throughput/tokens_per_s']:.0f} tok/s")
    return " ".join(parts)


class Progress:
    """A tqdm bar of the run's steps (k/N, rate, ETA and `progress_postfix`) on `stream`, when
    enabled. While it is open, what is printed goes above the bar. Disabled, it does nothing and
    prints stay as they are. A context manager."""

    def __init__(self, enabled: bool, total: int, initial: int, stream: Optional[TextIO] = None):
        self.enabled = enabled
        self.total, self.initial = total, initial
        self.stream = stream
        self._bar = None
        self._redirect: Optional[contextlib.AbstractContextManager] = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            from tqdm import tqdm
            from tqdm.contrib import DummyTqdmFile

            stream = self.stream or sys.stdout
            self._bar = tqdm(total=self.total, initial=self.initial, desc="train", unit="step", file=stream,
                             dynamic_ncols=True, leave=True)
            self._redirect = contextlib.redirect_stdout(DummyTqdmFile(stream))
            self._redirect.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(*exc)
            self._redirect = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def update(self, postfix: str) -> None:
        """One more step done; `postfix` replaces the bar's summary."""
        if self._bar is not None:
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(1)


# ----------------------------------------------------------------------------- the console line


def step_metrics(step, state_metrics, batch, info, elapsed, train_step_s: float = 0.0,
                 train_step_flops: float = 0.0) -> dict:
    """One flat dict of floats for metrics.jsonl and the console: the train step's metrics
    (loss, clipping, KL, entropy, guidance) plus the host side (rewards, timing, throughput).
    `elapsed`: the whole step's seconds; `train_step_s`: the train step's (the update's) seconds;
    `train_step_flops`: its model FLOPs."""
    metrics = {"step": step, **{k: float(v) for k, v in jax.device_get(state_metrics).items()}}
    if info["per_kind"]:  # rollouts were scored (not the SFT baseline)
        metrics["reward/total"] = float(batch.rewards.mean())
    metrics.update({
        **{f"reward/{name}": float(values.mean()) for name, values in info["per_kind"].items()},
        **{f"reward_events/{name}": int(count) for name, count in info["stats"].items()},
        "completion/mean_tokens": float(info["lengths"].mean()),
        "time/sample_s": info["sample_s"],
        "time/reward_s": info["reward_s"],
        "time/step_s": elapsed,
        "time/train_step_s": train_step_s,
        **info.get("metrics", {}),
    })
    sampled, trained = batch_token_counts(batch.prompt_mask, batch.completion_mask, batch.guided_mask)
    metrics.update(throughput_metrics(sampled if info["per_kind"] else 0, trained, info["sample_s"],
                                      train_step_s, elapsed, jax.device_count(), train_step_flops))
    return metrics


LENGTH_UNITS = {"tokens": "", "percent": "%", "steps": " steps"}  # how ℓ reads in each guidance.length_unit


def console_line(m: dict, method: str = "guided", length_unit: str = "tokens") -> str:
    """A step's console line for `method` (`method_kind`: 'sft', 'grpo' or 'guided').
    All show the loss, gradient norm, entropy and completion length; the RL methods add the
    accuracy, the advantage std and the seconds of sampling, rewards and the whole step; guided
    methods the accuracy of guided / free rollouts and ℓ (in its guidance.length_unit), GRPO the share
    of zero-std groups instead.
    Then the tokens per second of the whole step and `option_details`."""
    get = lambda key: m.get(key, float("nan"))  # noqa: E731
    line = f"step {m['step']:>5} | loss {get('loss'):.4f} | "
    if method == "sft":
        line += (f"grad {get('grad_norm'):.3f} | entropy {get('entropy'):.2f} | len {get('completion/mean_tokens'):.0f} | "
                 f"step {get('time/step_s'):.1f}s")
    else:
        if method == "grpo":
            line += f"acc {get('reward/accuracy'):.3f} | zero-std groups {get('zero_std_group_fraction'):.2f} | "
        else:
            line += (f"acc {get('reward/accuracy'):.3f} (guided {get('guidance/reward_guided'):.2f} "
                     f"/ free {get('guidance/reward_unguided'):.2f}) | "
                     f"ℓ {get('guidance/length'):.0f}{LENGTH_UNITS[length_unit]} | ")
        line += (f"grad {get('grad_norm'):.3f} | entropy {get('entropy'):.2f} | adv std {get('guidance/advantage_std'):.2f} | "
                 f"len {get('completion/mean_tokens'):.0f} | sample {get('time/sample_s'):.1f}s "
                 f"reward {get('time/reward_s'):.1f}s step {get('time/step_s'):.1f}s")
    if "throughput/tokens_per_s" in m:
        line += f" | {m['throughput/tokens_per_s']:.0f} tok/s"
    return line + option_details(m)


def option_details(m: dict) -> str:
    """What the guided-RL options that are on add to the console line (nothing when all are off)."""
    parts = []
    if "rollout/extra_rollouts" in m:
        parts.append(f"extra rollouts {m['rollout/extra_rollouts']:.0f}")
    if "rollout/sampling_rounds" in m:
        parts.append(f"sampling rounds {m['rollout/sampling_rounds']:.0f}")
    if m.get("mismatch/logprob_abs_diff", 0.0) > 1e-4:  # only when the sampler's numerics differ
        parts.append(f"sampler drift {m['mismatch/logprob_abs_diff']:.1e}")
    return "".join(f" | {p}" for p in parts)

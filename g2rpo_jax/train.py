"""The GRPO / G²RPO-A training loop.

    python -m g2rpo_jax.train --config=experiments/configs/g2rpo.py:demo [--config.<key>=<value> ...]

One step: a batch of prompts -> G rollouts each, a fraction α of every group carrying the first ℓ
tokens of its problem's reference trajectory -> sampling -> rewards on the host (`rollout.py`, which
also holds the guided-RL options: hint placement, the all-fail trigger, length units, dynamic
sampling) -> the jitted train step (advantages, loss, update, guidance-schedule update) -> metrics
-> checkpoint. The SFT baseline
(`step.loss_type='sft'`, the `sft` config variant) replaces rollouts and rewards with each prompt's
reference trajectory and trains on its negative log-likelihood.

The run directory holds
  config.json             the config of the run's first start; each resume from step S adds
                          config.from_step_S.json (nothing is overwritten)
  metrics.jsonl           one JSON object per step; a resume from step S first drops the records
                          of steps after S, so a step is never recorded twice
  checkpoints/<step>/     orbax: the TrainState plus a JSON item of host state (the data
                          iterator's position, counters, the config it was written under), one
                          atomic step; the last run.max_checkpoints are kept and, with periodic
                          evaluation (every evaluated step is saved with its score), also the one
                          with the best eval/average/pass@1
  checkpoints_damaged/    checkpoints that could not be read back, moved aside at a resume
  final_hf/               a Hugging Face checkpoint of the policy, at the end

Long runs. Re-running the same command resumes from the newest checkpoint that reads back whole
(a damaged one is reported by path and the one before it used). The config is compared with the
checkpoint's before anything expensive: keys that fix the state's shapes or the data order
(`FIXED_ON_RESUME`) stop the run with the list of them; other changes are logged and applied.
SIGTERM or SIGINT (preemption, scancel, docker stop, Ctrl-C) lets the step in flight finish,
saves it, waits for the write and exits with status 0; a second signal exits at once. (The
scheduler's grace period must cover a step and a save, e.g. `sbatch --signal=TERM@120`.) An
exception saves the last completed step before it propagates; a configuration error is raised
before any work and saves nothing. A step with a non-finite loss or gradient is skipped (metric
`skipped_nonfinite`); `run.max_nonfinite_steps` of them in a row save and stop the run.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from g2rpo_jax import data, guidance, models, optim, rewards, rollout, sampling
from g2rpo_jax import eval as evaluation
from g2rpo_jax import sharding as sharding_lib
from g2rpo_jax import train_state as train_state_lib
from g2rpo_jax import train_step as train_step_lib


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(f"[train] {message}", flush=True)


def resolve_checkpoint(model_cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """The policy checkpoint directory; a tiny random-init one is written for `random_init` runs."""
    if model_cfg.random_init:
        path = os.path.join(workdir, "random_init_model")
        if not os.path.exists(os.path.join(path, "config.json")):
            tokenizer_dir = model_cfg.random_init_tokenizer or None
            model_shape = models.TINY_QWEN3
            if tokenizer_dir:  # the tiny model's vocabulary and special tokens follow the tokenizer
                model_shape = models.tiny_qwen3_for(models.load_tokenizer(tokenizer_dir))
            models.write_random_checkpoint(path, model_shape, seed=model_cfg.random_init_seed,
                                           tokenizer_dir=tokenizer_dir)
            log(f"wrote a random-init tiny Qwen3 checkpoint (vocabulary {model_shape.vocab_size}) to {path}")
        return path
    if not model_cfg.checkpoint:
        raise ValueError("model.checkpoint is empty: pass --config.model.checkpoint=/path/to/hf_dir "
                         "(or --config.model.random_init=True for a tiny random model)")
    return model_cfg.checkpoint


# ----------------------------------------------------------------------------- the SFT baseline's batch


def reference_batch(cfg, prepared, rows, tokenizer):
    """The SFT baseline's batch: each prompt's reference trajectory as its completion, ended by the
    stop token when it fits the budget (so the model learns to stop). No sampling, no rewards."""
    max_new = cfg.sampling.max_new_tokens
    pad_id = data.pad_token_id(tokenizer)
    stop_id = data.stop_token_ids(tokenizer)[0]
    prompts = [list(prepared.prompt_ids[r]) for r in rows]
    completions = [list(prepared.trajectory_ids[r])[:max_new] for r in rows]
    completions = [c + [stop_id] if len(c) < max_new else c for c in completions]
    completion_tokens, completion_mask = rollout.pad_rows(completions, max_new, pad_id, left=False)
    prompt_tokens, prompt_mask = rollout.pad_rows(prompts, sampling.bucket_length(max(map(len, prompts))), pad_id)
    batch = train_step_lib.make_batch(prompt_tokens, prompt_mask, completion_tokens, completion_mask,
                                      np.zeros(len(rows), np.float32))
    info = dict(per_kind={}, stats={}, sample_s=0.0, reward_s=0.0, lengths=completion_mask.sum(axis=1))
    return batch, info


# ----------------------------------------------------------------------------- bookkeeping


def step_metrics(step, state_metrics, batch, info, elapsed) -> dict:
    """One flat dict of floats for metrics.jsonl and the console: the train step's metrics
    (loss, clipping, KL, entropy, guidance) plus the host side (rewards, timing)."""
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
        **info.get("metrics", {}),
    })
    return metrics


def periodic_eval(cfg, model_cfg, params, tokenizer, tasks, pool, mesh, step: int, workdir: str) -> dict:
    """Runs the `eval` section on the current policy; returns flat metrics for metrics.jsonl."""
    start = time.perf_counter()
    summary = evaluation.evaluate(
        model_cfg, params, tokenizer, tasks, **evaluation.evaluate_options(cfg.eval), pool=pool, mesh=mesh,
        step=step, output_dir=os.path.join(workdir, "eval", f"step_{step}"),
    )
    flat = evaluation.flat_metrics(summary)
    log(f"eval at step {step} ({time.perf_counter() - start:.0f} s): "
        + ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in flat.items() if k.endswith("pass@1")))
    return flat


def console_line(m: dict) -> str:
    get = lambda key: m.get(key, float("nan"))  # noqa: E731
    return (f"step {m['step']:>5} | loss {get('loss'):.4f} | acc {get('reward/accuracy'):.3f} (guided {get('guidance/reward_guided'):.2f} "
            f"/ free {get('guidance/reward_unguided'):.2f}) | ℓ {get('guidance/length'):.0f} | "
            f"grad {get('grad_norm'):.3f} | entropy {get('entropy'):.2f} | adv std {get('guidance/advantage_std'):.2f} | "
            f"len {get('completion/mean_tokens'):.0f} | sample {get('time/sample_s'):.1f}s "
            f"reward {get('time/reward_s'):.1f}s step {get('time/step_s'):.1f}s" + option_details(m))


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


# ----------------------------------------------------------------------------- configs and resumes

# Keys a resumed run may not change: they fix the shapes of the saved state (the model), what the
# guidance state means, or the data order the saved iterator position points into. An entry
# ending in '.' covers a whole section. Everything else (learning rate, total steps, sampling,
# rewards, mesh, ...) may change and is logged.
FIXED_ON_RESUME = (
    "model.", "guidance.mode", "guidance.per_problem", "guidance.length_unit", "step.group_size", "data.source", "data.adapter", "data.split",
    "data.limit", "data.seed", "data.shuffle", "data.curriculum_key", "data.curriculum_order",
    "data.batch_size",
)
_ABSENT = "<absent>"
# Fixed keys added after runs that may still be resumed: absent in their configs means this value.
_ADDED_FIXED_DEFAULTS = {"guidance.per_problem": False, "guidance.length_unit": "tokens"}


def config_as_dict(cfg: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON values (tuples become lists), as it is stored in checkpoints."""
    return json.loads(cfg.to_json_best_effort())


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim.learning_rate': 1e-4, ...}: nested dicts to dotted keys."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, current value)} for every key that differs or exists in one only."""
    old, new = flatten(saved), flatten(current)
    return {key: (old.get(key, _ABSENT), new.get(key, _ABSENT))
            for key in sorted(old.keys() | new.keys()) if old.get(key, _ABSENT) != new.get(key, _ABSENT)}


def fixed_changes(changes: dict[str, tuple[Any, Any]], guidance_mode: str) -> list[str]:
    """The changed keys a resume cannot accept (see FIXED_ON_RESUME), plus two that matter only
    in some settings: the size of the guidance mode's reward buffer (`guidance_mode`: the run's
    mode) and turning gradient clipping on or off both change the saved state's structure."""
    fixed = [key for key in changes
             if any(key == f or (f.endswith(".") and key.startswith(f)) for f in FIXED_ON_RESUME)
             and changes[key] != (_ABSENT, _ADDED_FIXED_DEFAULTS.get(key, _ABSENT))]
    for key, mode in (("guidance.window", "adaptive"), ("guidance.update_every", "ratio")):
        if key in changes and guidance_mode == mode:
            fixed.append(key)
    if "optim.max_grad_norm" in changes:
        old, new = changes["optim.max_grad_norm"]
        if not (isinstance(old, (int, float)) and isinstance(new, (int, float))) or (old > 0) != (new > 0):
            fixed.append("optim.max_grad_norm")
    return sorted(set(fixed))


def describe_changes(changes: dict[str, tuple[Any, Any]], keys: Sequence[str]) -> str:
    return ", ".join(f"{key} ({changes[key][0]!r} -> {changes[key][1]!r})" for key in keys)


def check_resume_config(saved: Optional[dict], current: dict, step: int, workdir: str) -> dict:
    """Raises ValueError listing the keys that differ from the checkpoint's config and cannot
    change on resume; returns all the differences otherwise."""
    if saved is None:
        return {}
    changes = config_changes(saved, current)
    fixed = fixed_changes(changes, current["guidance"]["mode"])
    if fixed:
        raise ValueError(
            f"cannot resume {workdir} from its checkpoint of step {step} with this config: "
            f"{describe_changes(changes, fixed)} differ from the run's and cannot change on resume. "
            f"Set them back (the run's config is in {os.path.join(workdir, 'config.json')}), or start a "
            f"new run with another run.workdir")
    return changes


def newest_saved_config(manager) -> tuple[Optional[int], Optional[dict]]:
    """(step, config) of the newest checkpoint whose host state reads back; a cheap JSON read
    that lets a config mismatch stop the run before any model is loaded."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return step, train_state_lib.restore_host_state(manager, step).get("config")
        except Exception:  # noqa: BLE001 -- damaged; the restore reports and skips it
            continue
    return None, None


def write_start_config(workdir: str, cfg: ml_collections.ConfigDict, start_step: int) -> str:
    """Keeps this start's config: config.json for a run's first start, config.from_step_S.json for
    a resume from step S (.1, .2, ... when a step is resumed from more than once)."""
    if start_step == 0:
        path = os.path.join(workdir, "config.json")
    else:
        path = os.path.join(workdir, f"config.from_step_{start_step}.json")
        n = 0
        while os.path.exists(path):
            n += 1
            path = os.path.join(workdir, f"config.from_step_{start_step}.{n}.json")
    if jax.process_index() == 0:
        with open(path + ".tmp", "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))
        os.replace(path + ".tmp", path)
    return path


def truncate_metrics(path: str, last_step: int) -> int:
    """Drops the records of steps after `last_step` (written after the checkpoint being resumed
    from) and a last line cut short by a crash; rewrites the file atomically. Returns how many
    records were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    kept, dropped = [], 0
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)) and record["step"] > last_step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        with open(path + ".tmp", "w") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(path + ".tmp", path)
    return dropped


def abstract_params(model_cfg, dtype):
    """Shapes and dtypes of the policy's params as `models.load_hf` makes them; nothing allocated."""
    shapes = jax.eval_shape(lambda: models.init_params(model_cfg, jax.random.key(0)))
    dtype = models.resolve_dtype(dtype)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), shapes)


def guide_lengths(guidance_state, gcfg: ml_collections.ConfigDict, rows) -> list[int]:
    """ℓ for each prompt row: the problem's own with guidance.per_problem, else the global one."""
    if gcfg.mode == "none":
        return [0] * len(rows)
    lengths = guidance.row_lengths(guidance_state, np.asarray(rows, np.int32))
    return [int(n) for n in jax.device_get(lengths)]


def validate_config(cfg: ml_collections.ConfigDict, mesh) -> None:
    """Every check that needs no data and no model, so a mistake stops the run before any work."""
    train_step_lib.validate_config(cfg.step)
    guidance.validate(cfg.guidance)
    rollout.validate_options(cfg.guidance, cfg.sampling)
    optim.validate(cfg.optim)
    rewards.settings_from_config(cfg.rewards)
    train_step_lib.validate_layout(cfg.data.batch_size * cfg.step.group_size, cfg.step.group_size,
                                   cfg.step.micro_batch_size, mesh, tuple(cfg.mesh.rules))
    for key, low in (("total_steps", 0), ("log_every", 1), ("checkpoint_every", 1), ("max_checkpoints", 0),
                     ("eval_every", 0), ("max_nonfinite_steps", 0)):
        value = cfg.run[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"run.{key}={value!r} is not valid; valid: an integer >= {low}")


# ----------------------------------------------------------------------------- signals


class StopRequests:
    """SIGTERM and SIGINT as requests to stop: the first one lets the step in flight finish and
    asks the loop to save it and exit; a second one ends the process at once (the usual meaning of
    a repeated Ctrl-C or of a scheduler's follow-up SIGKILL). Handlers can only be installed from
    the main thread; elsewhere the signals keep their previous behaviour."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        # A handler may interrupt a print: write to the file descriptor, not through sys.stdout.
        if self.received is not None:
            os.write(1, f"[train] second {name}: exiting at once without saving\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = name
        os.write(1, f"[train] {name} received: finishing the step in flight, then saving it and exiting "
                    f"({name} again exits at once)\n".encode())

    def agreed(self) -> Optional[str]:
        """The signal's name when any host received one, else None: every host must stop after
        the same step, or the others would wait forever in the next step's collectives."""
        if jax.process_count() == 1:
            return self.received
        if train_state_lib.all_hosts_agree(self.received is None):
            return None
        return self.received or "a signal on another host"


# ----------------------------------------------------------------------------- the loop


def save(manager, state, host: dict, score: Optional[float] = None) -> bool:
    """Checkpoint of the state and host state at state.step (async; skipped if it exists)."""
    step = int(jax.device_get(state.step))
    if step in manager.all_steps():
        return False
    train_state_lib.save_checkpoint(manager, state, host, force=True, score=score)
    log(f"checkpoint of step {step} started (async)")
    return True


def eval_score(metrics: dict) -> Optional[float]:
    """What `keep_best` ranks checkpoints by: the macro-average pass@1 of the periodic eval."""
    value = metrics.get("eval/average/pass@1")
    return float(value) if value is not None and math.isfinite(value) else None


def train(cfg: ml_collections.ConfigDict) -> dict:
    """Runs (or resumes) a training run; returns the last step's metrics."""
    sharding_lib.initialize_distributed(cfg.mesh.distributed)
    sharding_lib.enable_compilation_cache(cfg.mesh.compilation_cache_dir)
    mesh = sharding_lib.make_mesh(dict(cfg.mesh.mesh))
    rules = tuple(cfg.mesh.rules)
    validate_config(cfg, mesh)
    workdir = os.path.abspath(cfg.run.workdir)
    os.makedirs(workdir, exist_ok=True)
    current_config = config_as_dict(cfg)
    manager = train_state_lib.make_checkpoint_manager(
        os.path.join(workdir, "checkpoints"), max_to_keep=cfg.run.max_checkpoints, keep_best=bool(cfg.run.eval_every))
    old_layout = train_state_lib.single_item_steps(manager)
    if old_layout:
        raise ValueError(
            f"{manager.directory} holds checkpoints of steps {old_layout} in the layout of an earlier version (the "
            f"state alone, the data position in {workdir}/data_state/); this version cannot resume them. Finish "
            f"that run with the version that wrote it, or give this one another run.workdir")
    newest, saved_config = newest_saved_config(manager)
    if newest is not None:  # before any model is loaded
        check_resume_config(saved_config, current_config, newest, workdir)

    log(f"mesh {sharding_lib.describe(mesh)} on {jax.device_count()} {jax.devices()[0].platform} device(s)")
    checkpoint = resolve_checkpoint(cfg.model, workdir)
    model_cfg = models.read_config(checkpoint, cfg.model.dtype)
    tokenizer = models.load_tokenizer(checkpoint)
    prepared = data.prepare_from_config(cfg.data, tokenizer)
    log(f"data: {len(prepared)} prompts from {cfg.data.source} ({prepared.report})")
    # With guidance.per_problem the state holds one schedule per training problem.
    num_problems = len(prepared) if cfg.guidance.per_problem else None
    optimizer = optim.make_optimizer(cfg.optim)
    abstract = train_state_lib.abstract_state(abstract_params(model_cfg, cfg.model.dtype), optimizer, cfg.guidance,
                                              num_problems=num_problems)
    shardings = train_state_lib.state_shardings(abstract, optimizer, mesh, models.param_logical_axes(model_cfg), rules)
    resumed = train_state_lib.restore_latest_intact(
        manager, abstract, shardings=shardings,
        check_host=lambda step, host: check_resume_config(host.get("config"), current_config, step, workdir))
    host: dict = {}
    if resumed is None:
        _, params = models.load_hf(checkpoint, dtype=cfg.model.dtype, mesh=mesh, rules=rules)
        state = train_state_lib.shard_state(
            train_state_lib.create(params, optimizer, cfg.guidance, jax.random.key(cfg.run.seed),
                                   num_problems=num_problems), shardings)
        del params
    else:
        for step, path, error in resumed.damaged:
            log(f"WARNING: the checkpoint of step {step} at {path} is damaged or incomplete "
                f"({error}); moved it to {manager.directory}_damaged/ and "
                f"resuming from step {resumed.step} instead")
        state, host = resumed.state, resumed.host
        changes = config_changes(host.get("config") or current_config, current_config)
        if changes:
            log(f"config changes since the checkpoint of step {resumed.step}: "
                f"{describe_changes(changes, list(changes))}")
    ref_params = None
    if cfg.step.beta != 0:
        _, ref_params = models.load_hf(cfg.model.reference or checkpoint, dtype=cfg.model.dtype, mesh=mesh, rules=rules)
    iterator = data.iterator_from_config(cfg.data, prepared)
    supervised = cfg.step.loss_type == "sft"
    if cfg.guidance.mode != "none" and not prepared.trajectory_ids:
        raise ValueError(f"guidance.mode={cfg.guidance.mode!r} needs reference trajectories, but the "
                         f"{cfg.data.adapter!r} data has none; use guidance.mode='none'")
    if supervised and not (prepared.trajectory_ids and all(prepared.trajectory_ids)):
        raise ValueError(f"step.loss_type='sft' trains on reference trajectories, but some of the "
                         f"{cfg.data.adapter!r} data has none; use data with a trajectory for every problem")
    if resumed is not None:
        iterator.set_state(host["data"])

    start_step = int(state.step)
    write_start_config(workdir, cfg, start_step)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() == 0:
        dropped = truncate_metrics(metrics_path, start_step)
        if dropped:
            log(f"dropped {dropped} record(s) after step {start_step} from metrics.jsonl (written after that "
                "checkpoint)")
    if resumed is not None:
        log(f"resumed from step {start_step} in {workdir}")

    step_fn = train_step_lib.make_train_step(model_cfg, cfg.step, cfg.guidance, optimizer, mesh, rules,
                                             num_problems=num_problems)
    reward_settings = rewards.settings_from_config(cfg.rewards)
    pool = rewards.RewardPool(reward_settings.num_workers) if reward_settings.num_workers else None
    log(f"reward sandbox: {rewards.sandbox_protections()}")

    def reward_scorer(texts, examples):
        return rewards.score_batch(texts, examples, pool=pool, settings=reward_settings)

    collector = rollout.RolloutCollector(cfg, model_cfg, tokenizer, prepared, reward_scorer, mesh)
    pad_id = data.pad_token_id(tokenizer)

    eval_tasks = []
    if cfg.run.eval_every:
        eval_tasks = [evaluation.load_task(t, cfg.eval.data_root or None, int(cfg.eval.limit) or None)
                      for t in evaluation.parse_task_list(cfg.eval.tasks)]
    metrics: dict = {}
    # Host state saved with every checkpoint; it always describes the same step as `state`.
    nonfinite_in_a_row = int(host.get("nonfinite_in_a_row", 0))
    nonfinite_total = int(host.get("nonfinite_total", 0))
    data_state = iterator.get_state()
    completed = start_step  # the step `state` holds, as a Python int (a failed step may have donated it)

    def host_state() -> dict:
        return {"data": data_state, "nonfinite_in_a_row": nonfinite_in_a_row,
                "nonfinite_total": nonfinite_total, "config": current_config}

    stopped_by, too_many_nonfinite = None, False
    with StopRequests() as stops:
        try:
            with open(metrics_path, "a") as metrics_file:
                while completed < cfg.run.total_steps:
                    stopped_by = stops.agreed()
                    if stopped_by:
                        break
                    start = time.perf_counter()
                    step = completed
                    rows = next(iterator)
                    key = jax.random.fold_in(jax.random.key(cfg.run.seed), step)
                    if supervised:
                        batch, info = reference_batch(cfg, prepared, rows, tokenizer)
                    else:
                        lengths_of = functools.partial(guide_lengths, state.guidance, cfg.guidance)
                        rollouts, info = collector.collect(state.params, rows, lengths_of, key,
                                                           lambda: next(iterator))
                        batch = rollout.to_batch(rollouts, pad_id)
                    position_after_batch = iterator.get_state()  # after any refill draws
                    state, state_metrics = step_fn(state, ref_params, batch)
                    state_metrics = jax.device_get(state_metrics)  # waits for the step, so its time is counted
                    # From here `state` is step + 1: the host state follows it at once.
                    completed, data_state = step + 1, position_after_batch
                    skipped = bool(state_metrics["skipped_nonfinite"] > 0)
                    nonfinite_in_a_row = nonfinite_in_a_row + 1 if skipped else 0
                    nonfinite_total += int(skipped)
                    metrics = step_metrics(completed, state_metrics, batch, info, time.perf_counter() - start)
                    metrics["skipped_nonfinite_total"] = nonfinite_total
                    if skipped:
                        log(f"WARNING: step {completed}: non-finite loss or gradient (loss {metrics['loss']}, grad "
                            f"norm {metrics['grad_norm']}); the update was skipped ({nonfinite_in_a_row} in a row, "
                            f"the run stops at run.max_nonfinite_steps={cfg.run.max_nonfinite_steps})")
                    score = None
                    if cfg.run.eval_every and completed % cfg.run.eval_every == 0:
                        metrics.update(periodic_eval(cfg, model_cfg, state.params, tokenizer, eval_tasks, pool,
                                                     mesh, completed, workdir))
                        score = eval_score(metrics)
                    if jax.process_index() == 0:
                        metrics_file.write(json.dumps(metrics) + "\n")
                        metrics_file.flush()
                    if completed % cfg.run.log_every == 0 or step == 0:
                        log(console_line(metrics))
                    if cfg.run.max_nonfinite_steps and nonfinite_in_a_row >= cfg.run.max_nonfinite_steps:
                        too_many_nonfinite = True
                        break
                    if completed % cfg.run.checkpoint_every == 0 or score is not None:
                        save(manager, state, host_state(), score)
        except BaseException:
            if completed > start_step:
                log("interrupted: saving the last completed step before exiting")
                try:
                    save(manager, state, host_state())
                except Exception as error:  # e.g. the state was donated to a step that then failed
                    log(f"could not save on the way out ({error!r}); the last periodic checkpoint stands")
            raise
        finally:
            manager.wait_until_finished()
            if pool is not None:
                pool.close()
        if completed > start_step:
            save(manager, state, host_state())
        manager.wait_until_finished()  # a stop signal must not end the process before the write
    saved_at = os.path.join(str(manager.directory), str(completed))
    if stopped_by:
        if completed == start_step:
            log(f"stopped by {stopped_by} before the first step of this start; nothing new to save")
        else:
            log(f"stopped by {stopped_by} after step {completed}: checkpoint {saved_at} is complete; run the "
                f"same command to resume")
        return metrics
    if too_many_nonfinite:
        raise FloatingPointError(
            f"{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (run.max_nonfinite_steps="
            f"{cfg.run.max_nonfinite_steps}); their updates were skipped and the run stopped. The checkpoint of "
            f"step {completed} ({saved_at}) holds the last finite parameters: lower optim.learning_rate or check "
            f"the rewards before resuming")
    if cfg.run.save_hf_at_end:
        final = os.path.join(workdir, "final_hf")
        models.save_hf(final, model_cfg, jax.device_get(state.params))
        tokenizer.save_pretrained(final)
        log(f"policy saved as a Hugging Face checkpoint in {final}")
    return metrics


def main(argv: Optional[list[str]] = None) -> int:
    from absl import app, logging
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "experiments/configs/<file>.py:<preset>[,<variant>]",
                                             lock_config=True)

    def run(_):
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
        if config.value is None:
            raise app.UsageError("--config is required, e.g. --config=experiments/configs/g2rpo.py:demo")
        try:
            train(config.value)
        except FloatingPointError as error:  # the run stopped itself, saved: the message says it all
            log(f"ERROR: {error}")
            return 1

    app.run(run, argv=argv or sys.argv)
    return 0


if __name__ == "__main__":
    main()

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
  tensorboard/            TensorBoard event files of every metric (run.tensorboard)
  rollouts.jsonl          a few groups per step: prompt, reference answer, guide and continuation
                          apart, rewards, advantages (run.rollout_samples)

Long runs. Re-running the same command resumes from the newest checkpoint that reads back whole
(a damaged one is reported by path and the one before it used); when that checkpoint is already at
run.total_steps it says the run is complete, names its outputs and exits 0 without redoing anything
(only a missing final_hf/ is written). The config is compared with the checkpoint's before
anything expensive: keys that fix the state's shapes or the data order (`resume.FIXED_ON_RESUME`)
stop the run with the list of them; other changes are logged and applied.
SIGTERM or SIGINT (preemption, scancel, docker stop, Ctrl-C) lets the step in flight finish,
saves it, waits for the write and exits with status 0; a second signal exits at once. (The
scheduler's grace period must cover a step and a save, e.g. `sbatch --signal=TERM@120`.) An
exception saves the last completed step before it propagates; a configuration error is raised
before any work and saves nothing. A step with a non-finite loss or gradient is skipped (metric
`skipped_nonfinite`); `run.max_nonfinite_steps` of them in a row save and stop the run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from typing import Optional, Sequence

import jax
import ml_collections

from g2rpo_jax import command_line, data, guidance, models, optim, resume, rewards, rollout
from g2rpo_jax import eval as evaluation
from g2rpo_jax import run_logging
from g2rpo_jax import sharding as sharding_lib
from g2rpo_jax import train_state as train_state_lib
from g2rpo_jax import train_step as train_step_lib


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(f"[train] {message}", flush=True)


def resolve_checkpoint(model_cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """The policy checkpoint directory; a tiny random-init one (of `model.random_init_architecture`)
    is written for `random_init` runs."""
    if model_cfg.random_init:
        path = os.path.join(workdir, "random_init_model")
        if not os.path.exists(os.path.join(path, "config.json")):
            architecture = model_cfg.get("random_init_architecture") or "Qwen3ForCausalLM"
            tokenizer_dir = model_cfg.random_init_tokenizer or None
            model_shape = models.tiny_config(architecture)
            if tokenizer_dir:  # the tiny model's vocabulary and special tokens follow the tokenizer
                model_shape = models.tiny_config_for(models.load_tokenizer(tokenizer_dir), architecture)
            models.write_random_checkpoint(path, model_shape, seed=model_cfg.random_init_seed,
                                           tokenizer_dir=tokenizer_dir)
            log(f"wrote a random-init tiny {architecture} checkpoint (vocabulary {model_shape.vocab_size}) to {path}")
        return path
    return model_cfg.checkpoint  # start_run has checked that there is one


CONFIG_REQUIRED = "--config is required, e.g. --config=experiments/configs/g2rpo.py:demo"


def check_model_source(model_cfg: ml_collections.ConfigDict) -> None:
    """A run needs a checkpoint or a random-init model (checked before the run directory exists)."""
    if not model_cfg.random_init and not model_cfg.checkpoint:
        raise ValueError("model.checkpoint is empty: pass --config.model.checkpoint=/path/to/hf_dir "
                         "(or --config.model.random_init=True for a tiny random model)")


# ----------------------------------------------------------------------------- bookkeeping


def periodic_eval(settings, model_cfg, params, tokenizer, tasks, pool, mesh, step: int, workdir: str,
                  rules=None) -> dict:
    """Evaluates the current policy (`settings`: the `eval` section's `EvalSettings`; `rules`: the
    config's mesh.rules, None = the defaults); returns flat metrics for metrics.jsonl."""
    start = time.perf_counter()
    summary = evaluation.evaluate(
        model_cfg, params, tokenizer, tasks, settings, pool=pool, mesh=mesh, rules=rules, step=step,
        output_dir=os.path.join(workdir, "eval", f"step_{step}"),
    )
    flat = evaluation.flat_metrics(summary)
    log(f"eval at step {step} ({time.perf_counter() - start:.0f} s): "
        + ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in flat.items() if k.endswith("pass@1")))
    return flat


def abstract_params(model_cfg, dtype):
    """Shapes and dtypes of the policy's params as `models.load_hf` makes them; nothing allocated."""
    shapes = jax.eval_shape(lambda: models.init_params(model_cfg, jax.random.key(0)))
    dtype = models.resolve_dtype(dtype)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), shapes)


def validate_config(cfg: ml_collections.ConfigDict, mesh) -> None:
    """Every check that needs no data and no model, so a mistake stops the run before any work.
    The run's own keys come first: other sections derive values from them (optim.total_steps)."""
    for key, low in (("total_steps", 1), ("log_every", 1), ("checkpoint_every", 1), ("max_checkpoints", 0),
                     ("eval_every", 0), ("max_nonfinite_steps", 0)):
        value = cfg.run[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"run.{key}={value!r} is not valid; valid: an integer >= {low}")
    models.resolve_dtype(cfg.model.dtype, "model.dtype")
    train_step_lib.validate_config(cfg.step)
    architecture = cfg.model.get("random_init_architecture") or "Qwen3ForCausalLM"
    if cfg.model.random_init and architecture not in models.SUPPORTED_ARCHITECTURES:
        raise ValueError(f"model.random_init_architecture={architecture!r} is not valid; valid: "
                         f"{models.SUPPORTED_ARCHITECTURES}")
    guidance.validate(cfg.guidance)
    rollout.validate_options(cfg.guidance, cfg.sampling)
    optim.validate(cfg.optim)
    rewards.settings_from_config(cfg.rewards)
    train_step_lib.validate_layout(cfg.data.batch_size * cfg.step.group_size, cfg.step.group_size,
                                   cfg.step.micro_batch_size, mesh, tuple(cfg.mesh.rules))
    run_logging.validate_config(cfg.run)  # rollout_samples, tensorboard, wandb_project, wandb_mode


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


class StartError(ValueError):
    """A mistake found before any work (a bad config value, a missing or damaged data file or
    checkpoint): the command line prints its message alone, without a traceback."""


def open_run_dir(cfg: ml_collections.ConfigDict, mesh) -> tuple[str, dict, object]:
    """(workdir, the config as saved with checkpoints, the checkpoint manager). Refuses, before any
    model is loaded, checkpoints of an older layout and a resume whose config changes fixed keys."""
    workdir = os.path.abspath(cfg.run.workdir)
    os.makedirs(workdir, exist_ok=True)
    current_config = resume.config_as_dict(cfg)
    manager = train_state_lib.make_checkpoint_manager(
        os.path.join(workdir, "checkpoints"), max_to_keep=cfg.run.max_checkpoints, keep_best=bool(cfg.run.eval_every))
    old_layout = train_state_lib.single_item_steps(manager)
    if old_layout:
        raise ValueError(
            f"{manager.directory} holds checkpoints of steps {old_layout} in the layout of an earlier version (the "
            f"state alone, the data position in {workdir}/data_state/); this version cannot resume them. Finish "
            f"that run with the version that wrote it, or give this one another run.workdir")
    newest, saved_config = resume.newest_saved_config(manager)
    if newest is not None:
        resume.check_resume_config(saved_config, current_config, newest, workdir)
    return workdir, current_config, manager


def check_data(cfg: ml_collections.ConfigDict, prepared: data.PreparedPrompts, model_cfg, checkpoint: str) -> None:
    """The data must hold what the method trains on (reference trajectories for guidance and SFT),
    its rollouts must fit the model's positions, and a reward function of the user's must score
    two of its examples (their reference trajectories as completions) before the model loads."""
    needed, how = rollout.positions_needed(prepared.prompt_ids, cfg.guidance, cfg.sampling)
    if needed > model_cfg.max_position_embeddings:
        raise ValueError(f"{how} = {needed} positions, more than the model's max_position_embeddings="
                         f"{model_cfg.max_position_embeddings} ({os.path.join(checkpoint, 'config.json')}); lower "
                         f"sampling.max_new_tokens or data.max_prompt_tokens")
    if cfg.guidance.mode != "none" and not prepared.trajectory_ids:
        raise ValueError(f"guidance.mode={cfg.guidance.mode!r} needs reference trajectories, but the "
                         f"{cfg.data.adapter!r} data has none; use guidance.mode='none'")
    if cfg.step.loss_type == "sft" and not (prepared.trajectory_ids and all(prepared.trajectory_ids)):
        raise ValueError(f"step.loss_type='sft' trains on reference trajectories, but some of the "
                         f"{cfg.data.adapter!r} data has none; use data with a trajectory for every problem")
    if cfg.rewards.custom:
        sample = list(prepared.examples[:2])
        rewards.custom_rewards(cfg.rewards.custom, [example.trajectory for example in sample], sample)


def load_state(cfg, run_dir: tuple[str, dict, object], checkpoint: str, model_cfg, optimizer, mesh,
               num_problems: Optional[int]):
    """(train state, host state): restored from the newest intact checkpoint (damaged ones are
    moved aside and reported), or fresh from the policy checkpoint with empty host state."""
    workdir, current_config, manager = run_dir
    rules = tuple(cfg.mesh.rules)
    abstract = train_state_lib.abstract_state(abstract_params(model_cfg, cfg.model.dtype), optimizer, cfg.guidance,
                                              num_problems=num_problems)
    shardings = train_state_lib.state_shardings(abstract, optimizer, mesh, models.param_logical_axes(model_cfg), rules)
    resumed = train_state_lib.restore_latest_intact(
        manager, abstract, shardings=shardings,
        check_host=lambda step, host: resume.check_resume_config(host.get("config"), current_config, step, workdir))
    if resumed is None:
        _, params = models.load_hf(checkpoint, dtype=cfg.model.dtype, mesh=mesh, rules=rules)
        state = train_state_lib.create(params, optimizer, cfg.guidance, jax.random.key(cfg.run.seed),
                                       num_problems=num_problems)
        return train_state_lib.shard_state(state, shardings), {}
    for step, path, error in resumed.damaged:
        log(f"WARNING: the checkpoint of step {step} at {path} is damaged or incomplete "
            f"({error}); moved it to {manager.directory}_damaged/ and resuming from step {resumed.step} instead")
    changes = resume.config_changes(resumed.host.get("config") or current_config, current_config)
    if changes:
        log(f"config changes since the checkpoint of step {resumed.step}: "
            f"{resume.describe_changes(changes, list(changes))}")
    return resumed.state, resumed.host


@dataclasses.dataclass
class Run:
    """One start of a training run: what `start_run` sets up and the loop drives. The host-side
    counters are saved with every checkpoint and always describe the same step as `state`."""

    cfg: ml_collections.ConfigDict
    workdir: str
    config: dict  # the config as saved with checkpoints
    manager: object
    mesh: object
    model_cfg: object
    tokenizer: object
    prepared: data.PreparedPrompts
    iterator: data.BatchIterator
    state: train_state_lib.TrainState
    ref_params: object
    step_fn: object
    collector: rollout.RolloutCollector
    pool: Optional[rewards.RewardPool]
    eval_tasks: list
    eval_settings: Optional[evaluation.EvalSettings]
    start_step: int
    completed: int  # the step `state` holds, as a Python int (a failed step may have donated it)
    data_state: dict
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    rollout_records: list = dataclasses.field(default_factory=list)  # the last step's, for rollouts.jsonl

    def host_state(self) -> dict:
        return {"data": self.data_state, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "nonfinite_total": self.nonfinite_total, "config": self.config}


def start_run(cfg: ml_collections.ConfigDict) -> Optional[Run]:
    """Checks the config, then loads the model, data and state (or resumes them) and builds the
    step, the rollout collector, the reward pool and the evaluation tasks. None when the run
    directory holds a finished run whose outputs are all there."""
    sharding_lib.initialize_distributed(cfg.mesh.distributed)
    sharding_lib.enable_compilation_cache(cfg.mesh.compilation_cache_dir)
    mesh = sharding_lib.make_mesh(dict(cfg.mesh.mesh))
    validate_config(cfg, mesh)
    check_model_source(cfg.model)  # before the run directory exists: nothing to clean up after it
    run_dir = open_run_dir(cfg, mesh)
    workdir = run_dir[0]
    finished = resume.completed_step(cfg, run_dir[2])
    if finished is not None and not resume.final_export_missing(cfg, workdir):
        log(resume.complete_message(cfg, workdir, finished, with_export=bool(cfg.run.save_hf_at_end)))
        return None
    log(f"mesh {sharding_lib.describe(mesh)} on {jax.device_count()} {jax.devices()[0].platform} device(s)")
    checkpoint = resolve_checkpoint(cfg.model, workdir)
    model_cfg = models.read_config(checkpoint, cfg.model.dtype)
    tokenizer = models.load_tokenizer(checkpoint)
    prepared = data.prepare_from_config(cfg.data, tokenizer)
    log(f"data: {len(prepared)} prompts from {cfg.data.source} ({prepared.report})")
    check_data(cfg, prepared, model_cfg, checkpoint)
    warning = rollout.guide_budget_warning(cfg.guidance, cfg.sampling)
    if warning:
        log(f"WARNING: {warning}")
    num_problems = len(prepared) if cfg.guidance.per_problem else None  # one schedule per problem
    optimizer = optim.make_optimizer(cfg.optim)
    state, host = load_state(cfg, run_dir, checkpoint, model_cfg, optimizer, mesh, num_problems)
    ref_params = None
    if train_step_lib.uses_reference(cfg.step):
        _, ref_params = models.load_hf(cfg.model.reference or checkpoint, dtype=cfg.model.dtype, mesh=mesh,
                                       rules=tuple(cfg.mesh.rules))
    iterator = data.iterator_from_config(cfg.data, prepared)
    if host:
        iterator.set_state(host["data"])
    start_step = int(state.step)
    shared_prompts, why = rollout.prompt_sharing(cfg)
    log(f"train step: {'each group runs its prompt once' if shared_prompts else 'every rollout runs its prompt'} "
        f"({why})")
    step_fn = train_step_lib.make_train_step(model_cfg, cfg.step, cfg.guidance, optimizer, mesh,
                                             tuple(cfg.mesh.rules), num_problems=num_problems,
                                             shared_prompts=shared_prompts)
    reward_settings = rewards.settings_from_config(cfg.rewards)
    pool = rewards.RewardPool(reward_settings.num_workers) if reward_settings.num_workers else None
    log(run_logging.sandbox_summary(rewards.sandbox_protections(reward_settings.code_limits, log=False)))

    def scorer(texts, examples):  # looked up at each call, so a test may stand in for score_batch
        return rewards.score_batch(texts, examples, pool=pool, settings=reward_settings)

    eval_tasks, eval_settings = [], None
    if cfg.run.eval_every:
        eval_settings = evaluation.EvalSettings.from_config(cfg.eval, "eval")
        eval_tasks = [evaluation.load_task(t, cfg.eval.data_root or None, int(cfg.eval.limit) or None)
                      for t in evaluation.parse_task_list(cfg.eval.tasks)]
    return Run(cfg, workdir, run_dir[1], run_dir[2], mesh, model_cfg, tokenizer, prepared, iterator, state,
               ref_params, step_fn, rollout.RolloutCollector(cfg, model_cfg, tokenizer, prepared, scorer, mesh,
                                                               overlap_scoring=pool is not None),
               pool, eval_tasks, eval_settings, start_step, start_step, iterator.get_state(),
               int(host.get("nonfinite_in_a_row", 0)), int(host.get("nonfinite_total", 0)))


def begin_metrics(run: Run) -> str:
    """Keeps this start's config and cuts metrics.jsonl (and rollouts.jsonl) back to the start step;
    returns the path of metrics.jsonl."""
    resume.write_start_config(run.workdir, run.cfg, run.start_step)
    metrics_path = os.path.join(run.workdir, "metrics.jsonl")
    if jax.process_index() == 0:
        dropped = resume.truncate_metrics(metrics_path, run.start_step)
        if dropped:
            log(f"dropped {dropped} record(s) after step {run.start_step} from metrics.jsonl (written after that "
                "checkpoint)")
        resume.truncate_metrics(os.path.join(run.workdir, run_logging.ROLLOUTS_FILE), run.start_step)
    if run.start_step:
        log(f"resumed from step {run.start_step} in {run.workdir}")
    return metrics_path


def run_step(run: Run) -> dict:
    """One step: a batch (sampled and scored rollouts, or reference trajectories for SFT), the
    train step, the host counters and, when due, the periodic evaluation. Returns its metrics."""
    cfg, start, step = run.cfg, time.perf_counter(), run.completed
    rows = next(run.iterator)
    rollouts = None  # the SFT baseline samples none
    if cfg.step.loss_type == "sft":
        batch, info = rollout.reference_batch(cfg, run.prepared, rows, run.tokenizer)
    else:
        lengths_of = functools.partial(rollout.guide_lengths, run.state.guidance, cfg.guidance)
        rollouts, info = run.collector.collect(run.state.params, rows, lengths_of, run.state.step_key(step),
                                               lambda: next(run.iterator))
        batch = rollout.to_batch(rollouts, run.collector.pad_id)
    position_after_batch = run.iterator.get_state()  # after any refill draws
    train_start = time.perf_counter()
    run.state, state_metrics = run.step_fn(run.state, run.ref_params, batch)
    state_metrics = jax.device_get(state_metrics)  # waits for the step, so its time is counted
    train_step_s = time.perf_counter() - train_start
    # From here `state` is step + 1: the host state follows it at once.
    run.completed, run.data_state = step + 1, position_after_batch
    skipped = bool(state_metrics["skipped_nonfinite"] > 0)
    run.nonfinite_in_a_row = run.nonfinite_in_a_row + 1 if skipped else 0
    run.nonfinite_total += int(skipped)
    step_flops = train_step_lib.model_flops(run.model_cfg, cfg.step, batch, rollout.shares_prompts(cfg))
    metrics = run_logging.step_metrics(run.completed, state_metrics, batch, info, time.perf_counter() - start,
                                       train_step_s, step_flops)
    metrics["skipped_nonfinite_total"] = run.nonfinite_total
    run.rollout_records = []
    if rollouts is not None and cfg.run.get("rollout_samples", 0) and jax.process_index() == 0:
        run.rollout_records = run_logging.step_rollout_records(
            run.completed, rollouts, batch, run.tokenizer, run.prepared.prompt_ids, run.prepared.examples,
            cfg.step.group_size, cfg.run.rollout_samples, cfg.run.seed, scale=cfg.step.scale_rewards,
            eps=cfg.step.advantage_eps, baseline=cfg.step.advantage_baseline)
    if skipped:
        log(f"WARNING: step {run.completed}: non-finite loss or gradient (loss {metrics['loss']}, grad "
            f"norm {metrics['grad_norm']}); the update was skipped ({run.nonfinite_in_a_row} in a row, "
            f"the run stops at run.max_nonfinite_steps={cfg.run.max_nonfinite_steps})")
    if cfg.run.eval_every and run.completed % cfg.run.eval_every == 0:
        metrics.update(periodic_eval(run.eval_settings, run.model_cfg, run.state.params, run.tokenizer,
                                     run.eval_tasks, run.pool,
                                     run.mesh, run.completed, run.workdir, tuple(cfg.mesh.rules)))
    return metrics


def finish(run: Run, metrics: dict, stopped_by: Optional[str], too_many_nonfinite: bool) -> dict:
    """Reports how the run ended; at its end, saves the policy as a Hugging Face checkpoint."""
    cfg, completed = run.cfg, run.completed
    saved_at = os.path.join(str(run.manager.directory), str(completed))
    if stopped_by:
        if completed == run.start_step:
            log(f"stopped by {stopped_by} before the first step of this start; nothing new to save")
        else:
            log(f"stopped by {stopped_by} after step {completed}: checkpoint {saved_at} is complete; run the "
                f"same command to resume")
        return metrics
    if too_many_nonfinite:
        raise FloatingPointError(
            f"{run.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (run.max_nonfinite_steps="
            f"{cfg.run.max_nonfinite_steps}); their updates were skipped and the run stopped. The checkpoint of "
            f"step {completed} ({saved_at}) holds the last finite parameters: lower optim.learning_rate or check "
            f"the rewards before resuming")
    if cfg.run.save_hf_at_end:
        export_final(run)
    return metrics


def export_final(run: Run) -> None:
    """The policy as a Hugging Face checkpoint (weights, config.json, tokenizer) in final_hf/."""
    final = resume.final_hf_dir(run.workdir)
    models.save_hf(final, run.model_cfg, jax.device_get(run.state.params))
    run.tokenizer.save_pretrained(final)
    log(f"policy saved as a Hugging Face checkpoint in {final}")


def train(cfg: ml_collections.ConfigDict) -> dict:
    """Runs (or resumes) a training run; returns the last step's metrics."""
    try:
        run = start_run(cfg)
    except BaseException as error:  # a start that fails leaves no empty run directory behind
        resume.remove_empty_run_dir(cfg.run.workdir)
        if isinstance(error, (ValueError, FileNotFoundError)):
            raise StartError(str(error)) from error
        raise
    if run is None:  # finished earlier, with all its outputs
        return {}
    if run.start_step >= cfg.run.total_steps:  # finished earlier, but its export was never written
        log(resume.complete_message(cfg, run.workdir, run.start_step, with_export=False))
        try:
            log("its Hugging Face export is missing: writing it")
            export_final(run)
        finally:
            if run.pool is not None:
                run.pool.close()
        return {}
    method = run_logging.method_kind(cfg.step.loss_type, cfg.guidance.mode)
    writer = jax.process_index() == 0
    show_bar = writer and run_logging.progress_enabled(sys.stdout)  # a terminal, not a log file or a pipe
    metrics: dict = {}
    stopped_by, too_many_nonfinite = None, False
    try:
        begin_metrics(run)
        logger = run_logging.RunLogger(
            run.workdir, start_step=run.start_step, tensorboard=cfg.run.get("tensorboard", True),
            wandb_project=cfg.run.get("wandb_project", ""), wandb_mode=cfg.run.get("wandb_mode", "online"),
            config=run.config, writer=writer)
    except BaseException:
        if run.pool is not None:
            run.pool.close()
        raise

    def timed_save(score: Optional[float] = None) -> None:
        """`save`, and the seconds it held the loop as time/checkpoint_s of the saved step (to
        TensorBoard and W&B: the step's line of metrics.jsonl is written before the save)."""
        started = time.perf_counter()
        if save(run.manager, run.state, run.host_state(), score):
            logger.log_scalars(run.completed, {"time/checkpoint_s": time.perf_counter() - started})

    with logger:  # closes every sink on the way out, also on an exception
        with resume.StopRequests() as stops:
            try:
                with run_logging.Progress(show_bar, cfg.run.total_steps, run.completed) as progress:
                    note = run_logging.method_note(method, cfg.step.num_iterations)
                    if note:
                        log(note)
                    if show_bar and run.completed < cfg.run.total_steps:
                        log("compiling the first step… (sampling and the train step compile on first use)")
                    while run.completed < cfg.run.total_steps:
                        stopped_by = stops.agreed()
                        if stopped_by:
                            break
                        metrics = run_step(run)
                        logger.log_rollouts(run.rollout_records)
                        progress.update(run_logging.progress_postfix(metrics, method))
                        if run.completed % cfg.run.log_every == 0 or run.completed == 1:
                            log(run_logging.console_line(metrics, method, cfg.guidance.length_unit))
                        logger.log_metrics(metrics)  # the step's metrics.jsonl line last
                        if cfg.run.max_nonfinite_steps and run.nonfinite_in_a_row >= cfg.run.max_nonfinite_steps:
                            too_many_nonfinite = True
                            break
                        score = eval_score(metrics)
                        if run.completed % cfg.run.checkpoint_every == 0 or score is not None:
                            timed_save(score)
            except BaseException:
                if run.completed > run.start_step:
                    log("interrupted: saving the last completed step before exiting")
                    try:
                        save(run.manager, run.state, run.host_state())
                    except Exception as error:  # e.g. the state was donated to a step that then failed
                        log(f"could not save on the way out ({error!r}); the last periodic checkpoint stands")
                raise
            finally:
                run.manager.wait_until_finished()
                if run.pool is not None:
                    run.pool.close()
            if run.completed > run.start_step:
                timed_save()
            run.manager.wait_until_finished()  # a stop signal must not end the process before the write
        return finish(run, metrics, stopped_by, too_many_nonfinite)


def check_args(program: str, args: Sequence[str], root: Optional[str] = None) -> Optional[str]:
    """The one-line error this command line stops with at start-up for `args` (--config=FILE[:ARG]
    and --config.KEY=VALUE) when their config file, a key or a value is wrong, as `program: ...`;
    None when they pass. For tools that print or launch train commands (experiments/sweep.py,
    launch/): relative paths are taken from `root` (default: the working directory), and the checks
    that need the run's devices, model or data (batch shards of its mesh, positions, data files)
    are left to the run."""
    with command_line.working_directory(root or os.getcwd()):
        try:
            cfg = command_line.parse_config_args(program, args)
        except ValueError as error:
            return str(error)
        if cfg is None:
            return f"{program}: {CONFIG_REQUIRED}"
        try:
            validate_config(cfg, mesh=None)
            check_model_source(cfg.model)
        except ValueError as error:
            return f"{program}: {error}"
    return None


def main(argv: Optional[list[str]] = None) -> int:
    from absl import app, logging
    from ml_collections import config_flags

    program = "python -m g2rpo_jax.train"
    config = config_flags.DEFINE_config_file(
        "config", None, "experiments/configs/<file>.py:<preset>[,<variant>], then --config.<key>=<value> "
        "overrides (the presets and variants: --help)", lock_config=True)
    usage = (f"usage: {program} --config=experiments/configs/<file>.py:<preset>[,<variant>] "
             f"[--config.<key>=<value> ...]\n\n{__doc__.strip()}")
    help_text = command_line.config_file_help(usage)

    def run(_):
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
        try:
            cfg = config.value
            if cfg is not None:
                cfg.keys()  # ml_collections reports a config file it could not read on first use
        except OSError as error:
            print(command_line.flag_error_message(program, error, argv or sys.argv), file=sys.stderr)
            return 2
        if cfg is None:
            raise app.UsageError(CONFIG_REQUIRED)
        try:
            train(cfg)
        except StartError as error:  # nothing was done: the message names the key or file and the fix
            print(f"{program}: {error}", file=sys.stderr)
            return 2
        except FloatingPointError as error:  # the run stopped itself, saved: the message says it all
            log(f"ERROR: {error}")
            return 1

    app.run(run, argv=argv or sys.argv, flags_parser=command_line.config_flags_parser(program, help_text))
    return 0


if __name__ == "__main__":
    main()

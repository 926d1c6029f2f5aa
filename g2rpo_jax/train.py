"""The GRPO / G²RPO-A training loop.

    python -m g2rpo_jax.train --config=experiments/configs/g2rpo.py:demo [--config.<key>=<value> ...]

One step: a batch of prompts -> G rollouts each, a fraction α of every group carrying the first ℓ
tokens of its problem's reference trajectory -> sampling -> rewards on the host -> the jitted train
step (advantages, loss, update, guidance-schedule update) -> metrics -> checkpoint. The SFT baseline
(`step.loss_type='sft'`, the `sft` config variant) replaces rollouts and rewards with each prompt's
reference trajectory and trains on its negative log-likelihood.

The run directory holds config.json, metrics.jsonl (one JSON object per step), orbax checkpoints
with the data iterator's position beside them, and, at the end, a Hugging Face checkpoint of the
policy. Re-running the same command resumes from the latest checkpoint; an exception or Ctrl-C
saves the current state first.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np

from g2rpo_jax import data, guidance, models, optim, rewards, sampling
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


# ----------------------------------------------------------------------------- rollouts


def pad_rows(rows: Sequence[Sequence[int]], width: int, pad_id: int, left: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Int32 tokens padded to [N, width] (on the left for prompts, the right for completions) and
    their 0/1 mask."""
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        columns = slice(width - len(row), width) if left else slice(0, len(row))
        tokens[i, columns] = row
        mask[i, columns] = 1
    return tokens, mask


def guides_for_batch(prepared: data.PreparedPrompts, rows: Sequence[int], guided: np.ndarray, length: int,
                     group_size: int, max_new_tokens: int) -> list[list[int]]:
    """Guide ids per rollout: the first ℓ trajectory ids of its problem (capped by the budget)."""
    trajectories = [list(prepared.trajectory_ids[r]) if prepared.trajectory_ids else [] for r in rows]
    per_rollout = [t for t in trajectories for _ in range(group_size)]
    return guidance.guides_for_rollouts(per_rollout, guided, min(length, max_new_tokens))


def collect_rollouts(cfg, model_cfg, params, tokenizer, prepared, rows, guided, length, key, mesh, reward_scorer):
    """Samples and scores G rollouts per prompt. Returns (RolloutBatch, host info for logging)."""
    group_size = cfg.step.group_size
    max_new = cfg.sampling.max_new_tokens
    prompts = [list(prepared.prompt_ids[r]) for r in rows for _ in range(group_size)]
    examples = [prepared.examples[r] for r in rows for _ in range(group_size)]
    guides = guides_for_batch(prepared, rows, guided, length, group_size, max_new)
    pad_id = data.pad_token_id(tokenizer)

    start = time.perf_counter()
    out = sampling.sample(
        model_cfg, params, prompts, guides, max_new_tokens=max_new, temperature=cfg.step.temperature,
        top_p=cfg.sampling.top_p, top_k=cfg.sampling.top_k, eos_ids=data.stop_token_ids(tokenizer),
        rng=key, pad_id=pad_id, mesh=mesh, score_guides=False,  # the train step recomputes log-probs
    )
    sample_s = time.perf_counter() - start

    start = time.perf_counter()
    # Rewards see the whole completion, guide included (as in the official code).
    texts = tokenizer.batch_decode([out.tokens[i, : out.lengths[i]] for i in range(len(prompts))],
                                   skip_special_tokens=True)
    total, per_kind, stats = reward_scorer(texts, examples)
    reward_s = time.perf_counter() - start

    width = sampling.bucket_length(max(len(p) for p in prompts))
    prompt_tokens, prompt_mask = pad_rows(prompts, width, pad_id)
    batch = train_step_lib.make_batch(
        prompt_tokens, prompt_mask, out.tokens, out.mask, total,
        accuracy=per_kind["accuracy"], guided_mask=out.guided_mask, old_logprobs=out.logprobs,
    )
    info = dict(texts=texts, per_kind=per_kind, stats=stats, sample_s=sample_s, reward_s=reward_s,
                lengths=out.lengths)
    return batch, info


def reference_batch(cfg, prepared, rows, tokenizer):
    """The SFT baseline's batch: each prompt's reference trajectory as its completion, ended by the
    stop token when it fits the budget (so the model learns to stop). No sampling, no rewards."""
    max_new = cfg.sampling.max_new_tokens
    pad_id = data.pad_token_id(tokenizer)
    stop_id = data.stop_token_ids(tokenizer)[0]
    prompts = [list(prepared.prompt_ids[r]) for r in rows]
    completions = [list(prepared.trajectory_ids[r])[:max_new] for r in rows]
    completions = [c + [stop_id] if len(c) < max_new else c for c in completions]
    completion_tokens, completion_mask = pad_rows(completions, max_new, pad_id, left=False)
    prompt_tokens, prompt_mask = pad_rows(prompts, sampling.bucket_length(max(map(len, prompts))), pad_id)
    batch = train_step_lib.make_batch(prompt_tokens, prompt_mask, completion_tokens, completion_mask,
                                      np.zeros(len(rows), np.float32))
    info = dict(per_kind={}, stats={}, sample_s=0.0, reward_s=0.0, lengths=completion_mask.sum(axis=1))
    return batch, info


# ----------------------------------------------------------------------------- bookkeeping


def data_state_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, "data_state", f"{step}.json")


def save(manager, state, data_state: dict, workdir: str) -> None:
    """Orbax checkpoint of the train state (async) plus the data iterator's position (JSON)."""
    step = int(jax.device_get(state.step))
    if step in manager.all_steps():
        return
    os.makedirs(os.path.join(workdir, "data_state"), exist_ok=True)
    path = data_state_path(workdir, step)
    with open(path + ".tmp", "w") as f:
        json.dump(data_state, f)
    os.replace(path + ".tmp", path)
    train_state_lib.save_checkpoint(manager, state, force=True)
    log(f"checkpoint of step {step} started (async)")


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
            f"reward {get('time/reward_s'):.1f}s step {get('time/step_s'):.1f}s")


# ----------------------------------------------------------------------------- the loop


def train(cfg: ml_collections.ConfigDict) -> dict:
    """Runs (or resumes) a training run; returns the last step's metrics."""
    sharding_lib.initialize_distributed(cfg.mesh.distributed)
    sharding_lib.enable_compilation_cache(cfg.mesh.compilation_cache_dir)
    workdir = os.path.abspath(cfg.run.workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))

    mesh = sharding_lib.make_mesh(dict(cfg.mesh.mesh))
    rules = tuple(cfg.mesh.rules)
    log(f"mesh {sharding_lib.describe(mesh)} on {jax.device_count()} {jax.devices()[0].platform} device(s)")
    checkpoint = resolve_checkpoint(cfg.model, workdir)
    model_cfg, params = models.load_hf(checkpoint, dtype=cfg.model.dtype, mesh=mesh, rules=rules)
    ref_params = None
    if cfg.step.beta != 0:
        _, ref_params = models.load_hf(cfg.model.reference or checkpoint, dtype=cfg.model.dtype, mesh=mesh, rules=rules)
    tokenizer = models.load_tokenizer(checkpoint)

    prepared = data.prepare_from_config(cfg.data, tokenizer)
    iterator = data.iterator_from_config(cfg.data, prepared)
    log(f"data: {len(prepared)} prompts from {cfg.data.source} ({prepared.report})")
    supervised = cfg.step.loss_type == "sft"
    if cfg.guidance.mode != "none" and not prepared.trajectory_ids:
        raise ValueError(f"guidance.mode={cfg.guidance.mode!r} needs reference trajectories, but the "
                         f"{cfg.data.adapter!r} data has none; use guidance.mode='none'")
    if supervised and not (prepared.trajectory_ids and all(prepared.trajectory_ids)):
        raise ValueError(f"step.loss_type='sft' trains on reference trajectories, but some of the "
                         f"{cfg.data.adapter!r} data has none; use data with a trajectory for every problem")

    optimizer = optim.make_optimizer(cfg.optim)
    state = train_state_lib.create(params, optimizer, cfg.guidance, jax.random.key(cfg.run.seed))
    shardings = train_state_lib.state_shardings(
        jax.eval_shape(lambda: state), optimizer, mesh, models.param_logical_axes(model_cfg), rules)
    state = train_state_lib.shard_state(state, shardings)
    del params
    manager = train_state_lib.make_checkpoint_manager(
        os.path.join(workdir, "checkpoints"), max_to_keep=cfg.run.max_checkpoints)
    if manager.latest_step() is not None:
        state = train_state_lib.restore_checkpoint(manager, state, shardings=shardings)
        with open(data_state_path(workdir, int(state.step))) as f:
            iterator.set_state(json.load(f))
        log(f"resumed from step {int(state.step)} in {workdir}")

    step_fn = train_step_lib.make_train_step(model_cfg, cfg.step, cfg.guidance, optimizer, mesh, rules)
    reward_settings = rewards.settings_from_config(cfg.rewards)
    pool = rewards.RewardPool(reward_settings.num_workers) if reward_settings.num_workers else None
    log(f"reward sandbox: {rewards.sandbox_protections()}")

    def reward_scorer(texts, examples):
        return rewards.score_batch(texts, examples, pool=pool, settings=reward_settings)

    eval_tasks = []
    if cfg.run.eval_every:
        eval_tasks = [evaluation.load_task(t, cfg.eval.data_root or None, int(cfg.eval.limit) or None)
                      for t in evaluation.parse_task_list(cfg.eval.tasks)]
    metrics: dict = {}
    data_state = iterator.get_state()
    try:
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as metrics_file:
            while int(state.step) < cfg.run.total_steps:
                start = time.perf_counter()
                step = int(state.step)
                data_state = iterator.get_state()  # the position of this step's batch, for a crash
                rows = next(iterator)
                key = jax.random.fold_in(jax.random.key(cfg.run.seed), step)
                assign_key, sample_key = jax.random.split(key)
                length = int(guidance.length(state.guidance)) if cfg.guidance.mode != "none" else 0
                guided = np.asarray(guidance.assign_guided(
                    assign_key, len(rows), cfg.step.group_size, cfg.guidance.alpha if length else 0.0))
                if supervised:
                    batch, info = reference_batch(cfg, prepared, rows, tokenizer)
                else:
                    batch, info = collect_rollouts(cfg, model_cfg, state.params, tokenizer, prepared, rows,
                                                   guided, length, sample_key, mesh, reward_scorer)
                state, state_metrics = step_fn(state, ref_params, batch)
                state_metrics = jax.device_get(state_metrics)  # waits for the step, so its time is counted
                metrics = step_metrics(step + 1, state_metrics, batch, info, time.perf_counter() - start)
                if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0:
                    metrics.update(periodic_eval(cfg, model_cfg, state.params, tokenizer, eval_tasks, pool, mesh,
                                                 step + 1, workdir))
                if jax.process_index() == 0:
                    metrics_file.write(json.dumps(metrics) + "\n")
                    metrics_file.flush()
                if (step + 1) % cfg.run.log_every == 0 or step == 0:
                    log(console_line(metrics))
                data_state = iterator.get_state()
                if (step + 1) % cfg.run.checkpoint_every == 0:
                    save(manager, state, data_state, workdir)
    except BaseException:
        log("interrupted: saving the last completed step before exiting")
        try:
            save(manager, state, data_state, workdir)
        except Exception as error:  # e.g. the state was donated to a step that then failed
            log(f"could not save on the way out ({error!r}); the last periodic checkpoint stands")
        raise
    finally:
        manager.wait_until_finished()
        if pool is not None:
            pool.close()
    save(manager, state, iterator.get_state(), workdir)
    manager.wait_until_finished()
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
        train(config.value)

    app.run(run, argv=argv or sys.argv)
    return 0


if __name__ == "__main__":
    main()

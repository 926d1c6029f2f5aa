"""The training loop end to end on the demo preset: metrics, checkpoints, resume, crash safety."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from g2rpo_jax import data, models, resume, rewards, rollout, run_logging, train, train_state
from tests.reference import grpo_numpy
from tests.reference.rewards_reference import ref_digit_credit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config(workdir, variant="adaptive", **run):
    spec = importlib.util.spec_from_file_location("g2rpo_config", os.path.join(REPO, "experiments/configs/g2rpo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(f"demo,{variant}")
    # 4 prompts x G=2 on the 8 test devices (data=2, fsdp=2, tensor=2): one group per batch shard.
    cfg.mesh.mesh.update({"data": 2, "fsdp": 2, "tensor": 2})
    cfg.data.batch_size = 4
    cfg.step.group_size = 2
    cfg.guidance.alpha = 0.5
    # A guide of ℓ = 64 holds a whole worked solution (62-64 tokens), boxed answer included.
    cfg.guidance.update({"initial_length": 64, "max_length": 68})
    cfg.sampling.max_new_tokens = 68
    cfg.run.eval_every = 0
    cfg.run.workdir = str(workdir)
    cfg.run.checkpoint_every = 1
    cfg.run.update(run)
    return cfg


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def saved_host_state(workdir, step):
    """The host-side item of checkpoint `step` (data position, counters, config)."""
    manager = train_state.make_checkpoint_manager(os.path.join(workdir, "checkpoints"))
    try:
        return train_state.restore_host_state(manager, step)
    finally:
        manager.close()


def read_rollout_records(workdir):
    with open(os.path.join(workdir, run_logging.ROLLOUTS_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def with_digit_credit(cfg):
    """The example reward of one's own (experiments/custom_reward.py) added with weight 0.2."""
    cfg.rewards.custom = os.path.join(REPO, "experiments", "custom_reward.py") + ":digit_credit"
    cfg.rewards.weights.custom = CUSTOM_WEIGHT
    return cfg


CUSTOM_WEIGHT = 0.2


def test_demo_runs_resumes_and_exports(tmp_path, capsys, monkeypatch):
    sampled = []  # each step's Rollouts, in step order, to hold rollouts.jsonl against
    real_collect = rollout.RolloutCollector.collect

    def recording_collect(self, *args, **kwargs):
        rollouts, info = real_collect(self, *args, **kwargs)
        sampled.append(rollouts)
        return rollouts, info

    monkeypatch.setattr(rollout.RolloutCollector, "collect", recording_collect)
    workdir = tmp_path / "run"
    train.train(with_digit_credit(demo_config(workdir, total_steps=2)))
    first = read_metrics(workdir)
    assert [m["step"] for m in first] == [1, 2]
    for m in first:
        assert m["guidance/guided_rollout_share"] == 0.5  # one of the two rollouts in each group
        # A guide of ℓ >= the worked solution holds the boxed answer: guided rollouts score.
        assert m["guidance/reward_guided"] == 1.0
        # The total adds the user's reward (format's weight is 0 on the demo preset).
        assert m["reward/total"] == pytest.approx(m["reward/accuracy"] + CUSTOM_WEIGHT * m["reward/custom"], abs=1e-6)
        assert m["reward/custom"] >= 0.5 * m["reward/accuracy"] > 0  # guided rollouts hold the whole boxed answer
        assert np.isfinite(m["loss"])
        assert m["time/train_step_s"] > 0 and m["throughput/sample_tokens_per_s"] > 0
        assert m["throughput/train_tokens_per_s_per_device"] == pytest.approx(m["throughput/train_tokens_per_s"] / 8)
    assert first[0]["guidance/length"] == 64 and first[1]["guidance/length"] == 68  # ℓ adapts

    train.train(with_digit_credit(demo_config(workdir, total_steps=3)))  # resumes at step 2
    resumed = read_metrics(workdir)
    assert [m["step"] for m in resumed] == [1, 2, 3]

    # Not a terminal: the console lines as always, no progress bar (no carriage return).
    out = capsys.readouterr().out
    assert "\r" not in out and "compiling the first step" not in out
    assert [line.split("|")[0] for line in out.splitlines() if line.startswith("[train] step ")] == [
        "[train] step     1 ", "[train] step     2 ", "[train] step     3 "]

    # TensorBoard holds each step's metrics once (the resume replaced nothing: it went on from
    # step 2), as float32, and the time each checkpoint held the loop.
    from tests.test_run_logging import read_tensorboard

    scalars = read_tensorboard(workdir / run_logging.TENSORBOARD_DIR)
    for key in ("loss", "reward/total", "guidance/length", "throughput/tokens_per_s"):
        assert scalars[key] == {m["step"]: np.float32(m[key]) for m in resumed}, key
    assert sorted(scalars["time/checkpoint_s"]) == [1, 2, 3]

    # rollouts.jsonl: run.rollout_samples = 2 of the 4 groups of G = 2 at each step.
    records = read_rollout_records(workdir)
    assert [r["step"] for r in records] == [1] * 4 + [2] * 4 + [3] * 4
    assert len(sampled) == 3
    for record in records:
        assert set(record) == {"step", "group", "rollout", "problem_id", "prompt", "answer", "guided", "guide",
                               "continuation", "guide_tokens", "continuation_tokens", "reward", "rewards", "advantage",
                               "zero_spread"}
        rollouts = sampled[record["step"] - 1]
        group = slice(2 * record["group"], 2 * record["group"] + 2)
        i = 2 * record["group"] + record["rollout"]
        assert record["guided"] == bool(rollouts.guided[i]) and record["problem_id"] == rollouts.problem_ids[i]
        assert record["guide"] + record["continuation"] == rollouts.texts[i]
        assert bool(record["guide"]) == record["guided"] and record["prompt"].startswith("Question:")
        first_term, second_term = re.search(r"(\d+)\+(\d+)=", record["prompt"]).groups()
        assert record["answer"] == str(int(first_term) + int(second_term))  # the group's gold answer
        assert record["reward"] == rollouts.rewards[i] and record["rewards"]["accuracy"] == rollouts.accuracy[i]
        credit = ref_digit_credit(rollouts.texts[i], record["answer"])
        assert record["rewards"]["custom"] == pytest.approx(credit, abs=1e-6)
        assert record["reward"] == pytest.approx(record["rewards"]["accuracy"] + CUSTOM_WEIGHT * credit, abs=1e-6)
        expected = grpo_numpy.group_advantages_ref(rollouts.rewards, 2)[i]  # scale 'group', eps 1e-4
        assert record["advantage"] == pytest.approx(expected, abs=1e-6)
        spread = float(rollouts.rewards[group].max() - rollouts.rewards[group].min())
        assert record["zero_spread"] == (spread == 0) and (not record["zero_spread"] or record["advantage"] == 0)
    assert saved_host_state(workdir, 2)["data"]  # the iterator position is inside the checkpoint
    # Each start kept its own config; the resume changed only run.total_steps.
    assert os.path.isfile(workdir / "config.json") and os.path.isfile(workdir / "config.from_step_2.json")
    # The tiny model took its vocabulary from the demo's character-level tokenizer.
    cfg, params = models.load_hf(str(workdir / "final_hf"))
    tokenizer = models.load_tokenizer(str(workdir / "final_hf"))
    assert cfg.vocab_size == len(tokenizer) < 128 and tokenizer.eos_token == "<eos>"
    assert tokenizer.decode(tokenizer.encode("3482+1759=")) == "3482+1759="


def test_sft_baseline_fits_the_reference_trajectories(tmp_path, capsys):
    workdir = tmp_path / "sft"
    cfg = demo_config(workdir, variant="sft", total_steps=4)
    cfg.data.batch_size, cfg.step.group_size = 8, 1  # one sequence per prompt, no sampling
    cfg.optim.update({"learning_rate": 1e-3, "min_learning_rate": 1e-3})  # the demo's SFT rate
    train.train(cfg)
    metrics = read_metrics(workdir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # No rollouts: nothing for rollouts.jsonl, no sampling rate, and a console line without RL fields.
    assert not os.path.exists(workdir / run_logging.ROLLOUTS_FILE)
    assert metrics[0]["throughput/train_tokens_per_s"] > 0 and "throughput/sample_tokens_per_s" not in metrics[0]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[train] step ")]
    assert len(lines) == 4 and all("| loss " in line for line in lines)
    assert not any(field in line for line in lines for field in ("acc ", "ℓ", "guided", "free", "adv std", "zero-std"))
    # The loss is the trajectories' token-mean NLL: it starts near log(vocab) and falls.
    vocab_size = len(models.load_tokenizer(str(workdir / "random_init_model")))
    assert abs(metrics[0]["loss"] - np.log(vocab_size)) < 0.2
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.2
    assert "reward/total" not in metrics[0] and metrics[0]["guided_token_share"] == 0.0

    # Each row's completion is its trajectory, then the stop token, then padding.
    tokenizer = models.load_tokenizer(str(workdir / "random_init_model"))
    prepared = data.prepare_from_config(cfg.data, tokenizer)
    batch, _ = rollout.reference_batch(cfg, prepared, [0, 5], tokenizer)
    for row, index in enumerate([0, 5]):
        expected = list(prepared.trajectory_ids[index]) + [data.stop_token_ids(tokenizer)[0]]
        assert 0 < len(expected) < cfg.sampling.max_new_tokens
        assert batch.completion_tokens[row, : len(expected)].tolist() == expected
        assert batch.completion_mask[row].tolist() == [1] * len(expected) + [0] * (cfg.sampling.max_new_tokens - len(expected))
        assert batch.prompt_tokens[row, batch.prompt_mask[row] == 1].tolist() == list(prepared.prompt_ids[index])


def test_a_crash_saves_the_last_state(tmp_path, monkeypatch):
    workdir = tmp_path / "crash"
    calls = {"n": 0}
    real_score = rewards.score_batch

    def failing_score(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("reward server went away")
        return real_score(*args, **kwargs)

    monkeypatch.setattr(rewards, "score_batch", failing_score)
    with pytest.raises(RuntimeError, match="reward server went away"):
        train.train(demo_config(workdir, total_steps=3, checkpoint_every=100))
    assert os.path.isdir(workdir / "checkpoints" / "1")  # step 1 finished; it was saved on the way out
    # Resuming replays the batch of the step that failed, then goes on.
    position_after_step_one = saved_host_state(workdir, 1)["data"]
    train.train(demo_config(workdir, total_steps=2, checkpoint_every=100))
    assert [m["step"] for m in read_metrics(workdir)] == [1, 2]
    assert saved_host_state(workdir, 2)["data"] != position_after_step_one


def test_compilation_cache_keeps_compiled_programs(tmp_path):
    """In a fresh process (the cache folder is process-wide state): a compiled program lands there."""
    cache = tmp_path / "xla"
    script = (
        "import jax\n"
        "from g2rpo_jax import sharding\n"
        f"sharding.enable_compilation_cache({str(cache)!r})\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        "jax.jit(lambda x: x * 2 + 1)(1.0).block_until_ready()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"compiled programs are cached in {cache}" in result.stdout
    assert any(cache.iterdir()), "no compiled program was written"


# ----------------------------------------------------------------------------- long runs (see also test_preemption)


def test_a_config_error_is_found_before_any_work_and_saves_nothing(tmp_path):
    workdir = tmp_path / "bad"
    cfg = demo_config(workdir, total_steps=2)
    cfg.step.micro_batch_size = 3  # would split a group: found at start, not at the first step
    with pytest.raises(ValueError, match="micro_batch_size=3"):
        train.train(cfg)
    assert not os.path.exists(workdir)
    cfg = demo_config(workdir, total_steps=2, max_nonfinite_steps=-1)
    with pytest.raises(ValueError, match=r"run.max_nonfinite_steps=-1 is not valid"):
        train.train(cfg)
    assert not os.path.exists(workdir)
    cfg = demo_config(workdir, total_steps=2, rollout_samples=-1)
    with pytest.raises(ValueError, match=r"run.rollout_samples=-1 is not valid; valid: an integer >= 0"):
        train.train(cfg)
    assert not os.path.exists(workdir)
    # A reward function of the user's that fails on the data is called on two examples at start.
    reward_file = tmp_path / "needs_difficulty.py"
    reward_file.write_text("def score(completions, examples):\n    return [e.metadata['difficulty'] for e in examples]\n")
    cfg = demo_config(workdir, total_steps=2)
    cfg.rewards.custom = f"{reward_file}:score"
    with pytest.raises(train.StartError, match=r"rewards.custom=.*:score' raised KeyError: 'difficulty'"):
        train.train(cfg)
    assert sorted(os.listdir(workdir)) == ["random_init_model"]  # the preset's model, written first; no state


def test_checkpoints_of_the_earlier_layout_are_refused_at_start(tmp_path):
    workdir = tmp_path / "old"
    os.makedirs(workdir / "checkpoints" / "100" / "default")  # what the earlier version wrote
    with pytest.raises(ValueError, match=r"checkpoints of steps \[100\] in the layout of an earlier version"):
        train.train(demo_config(workdir, total_steps=200))
    assert sorted(os.listdir(workdir)) == ["checkpoints"]


def test_config_changes_separate_fixed_keys_from_allowed_ones(tmp_path):
    saved = resume.config_as_dict(demo_config(tmp_path))
    cfg = demo_config(tmp_path)
    cfg.optim.learning_rate = 5e-5
    cfg.guidance.window = 5  # the adaptive rule's reward buffer: a shape in the saved state
    cfg.model.dtype = "bfloat16"
    changes = resume.config_changes(saved, resume.config_as_dict(cfg))
    assert changes["optim.learning_rate"] == (1e-4, 5e-5)
    assert resume.fixed_changes(changes, "adaptive") == ["guidance.window", "model.dtype"]
    with pytest.raises(ValueError, match=r"guidance.window \(3 -> 5\), model.dtype \('float32' -> 'bfloat16'\) differ"):
        resume.check_resume_config(saved, resume.config_as_dict(cfg), 7, str(tmp_path))
    cfg = demo_config(tmp_path, variant="naive")  # fixed guidance: the window is not used
    naive = resume.config_as_dict(cfg)
    cfg.guidance.window = 5
    cfg.optim.max_grad_norm = 0.5  # clipping stays on: the optimizer state keeps its structure
    assert resume.fixed_changes(resume.config_changes(naive, resume.config_as_dict(cfg)), "fixed") == []
    cfg.optim.max_grad_norm = 0.0  # clipping off: a stage of the optimizer state goes away
    changes = resume.config_changes(naive, resume.config_as_dict(cfg))
    assert resume.fixed_changes(changes, "fixed") == ["optim.max_grad_norm"]

    # Keys added to the config since a run started: resumable at their defaults, fixed otherwise.
    older = resume.config_as_dict(demo_config(tmp_path))
    for key in ("per_problem", "length_unit", "placement"):
        del older["guidance"][key]
    cfg = demo_config(tmp_path)
    cfg.guidance.placement = "prompt"  # may change on resume: the state does not depend on it
    assert resume.fixed_changes(resume.config_changes(older, resume.config_as_dict(cfg)), "adaptive") == []
    cfg.guidance.update({"per_problem": True, "length_unit": "steps"})  # change what the state holds or means
    assert resume.fixed_changes(resume.config_changes(older, resume.config_as_dict(cfg)), "adaptive") == [
        "guidance.length_unit", "guidance.per_problem"]


def test_truncating_metrics_keeps_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')  # cut by a kill
    assert resume.truncate_metrics(str(path), 2) == 3
    assert read_metrics(tmp_path) == records[:2]
    assert resume.truncate_metrics(str(path), 2) == 0 and not os.path.exists(str(path) + ".tmp")


def test_stop_requests_turn_the_first_signal_into_a_flag():
    import signal

    before = signal.getsignal(signal.SIGINT)
    with resume.StopRequests() as stops:
        assert stops.agreed() is None
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt, a request to stop
        assert stops.agreed() == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is before


# ----------------------------------------------------------------------------- guided-RL options (rollout.py)


def options_config(workdir, total_steps):
    """Every rollout option at once: a hint in the prompt, ℓ in whole steps, only for all-fail
    groups, one ℓ per problem, and refill of zero-spread groups."""
    cfg = demo_config(workdir, total_steps=total_steps)
    cfg.guidance.update({"placement": "prompt", "trigger": "all_fail", "length_unit": "steps",
                         "step_delimiter": ";", "initial_length": 2, "delta": 1, "min_length": 0,
                         "max_length": 4, "per_problem": True})
    cfg.sampling.refill_rounds = 1
    cfg.data.limit = 16  # few problems, so a problem comes back within three steps
    return cfg


def per_problem_lengths(workdir, step):
    """The checkpoint's per-problem ℓ (float32 [P]), read by orbax as a plain tree (no target)."""
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), train_state.STATE_ITEM)
    state = ocp.PyTreeCheckpointer().restore(path)
    return np.asarray(state["guidance"]["per_problem"]["current_length"])


def test_guided_rl_options_run_together_and_the_per_problem_state_resumes(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train.train(options_config(whole, 3))
    train.train(options_config(split, 2))
    train.train(options_config(split, 3))  # resumes at step 2
    uninterrupted, resumed = read_metrics(whole), read_metrics(split)
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for a, b in zip(uninterrupted, resumed):
        assert run_logging.without_wall_clock(a) == run_logging.without_wall_clock(b)
    for m in uninterrupted:
        assert m["rollout/sampling_rounds"] in (1.0, 2.0) and "rollout/extra_rollouts" in m
        assert m["guided_token_share"] == 0.0  # hints live in the prompt: no guide token is trained
    lengths = per_problem_lengths(whole, 3)
    assert lengths.shape == (16,)
    np.testing.assert_array_equal(lengths, per_problem_lengths(split, 3))
    assert set(np.unique(lengths)) - {2.0} and set(np.unique(lengths)) <= {1.0, 2.0, 3.0, 4.0}


def test_console_line_shows_the_options_that_are_on():
    base = {"step": 3, "loss": 0.1}
    assert " | extra" not in run_logging.console_line(base) and "drift" not in run_logging.console_line(base)
    line = run_logging.console_line({**base, "rollout/extra_rollouts": 32.0, "rollout/sampling_rounds": 2.0,
                               "mismatch/logprob_abs_diff": 0.011})
    assert line.endswith(" | extra rollouts 32 | sampling rounds 2 | sampler drift 1.1e-02")
    assert "drift" not in run_logging.console_line({**base, "mismatch/logprob_abs_diff": 5e-7})  # f32 rounding only


def test_console_line_fits_the_method():
    m = {"step": 7, "loss": 0.0001, "reward/accuracy": 0.25, "guidance/length": 24.0, "guidance/reward_guided": 0.5,
         "guidance/reward_unguided": 0.125, "zero_std_group_fraction": 0.75, "guidance/advantage_std": 0.5,
         "grad_norm": 0.1, "entropy": 1.0, "completion/mean_tokens": 60.0, "time/sample_s": 1.0, "time/reward_s": 0.1,
         "time/step_s": 2.0, "throughput/tokens_per_s": 512.4}
    guided = run_logging.console_line(m)
    assert guided.startswith("step     7 | loss 0.0001 | acc 0.250 (guided 0.50 / free 0.12) | ℓ 24 | grad 0.100")
    assert guided.endswith("step 2.0s | 512 tok/s") and "zero-std" not in guided
    assert "| ℓ 24% |" in run_logging.console_line(m, "guided", "percent")  # ℓ in its guidance.length_unit
    assert "| ℓ 24 steps |" in run_logging.console_line(m, "guided", "steps")
    grpo = run_logging.console_line(m, "grpo")
    assert "| acc 0.250 | zero-std groups 0.75 | grad" in grpo and "ℓ" not in grpo and "guided" not in grpo
    sft = run_logging.console_line(m, "sft")
    assert sft == "step     7 | loss 0.0001 | grad 0.100 | entropy 1.00 | len 60 | step 2.0s | 512 tok/s"

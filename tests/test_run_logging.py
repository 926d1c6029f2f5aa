"""run_logging.py without a training run: sinks, TensorBoard read-back, the progress bar's
terminal rule, throughput, rollout records and the config checks (the training runs that write
these files are in test_train.py)."""

import glob
import io
import json
import os
import struct
import time

import ml_collections
import numpy as np
import pytest

from g2rpo_jax import data, flops, models, rollout, run_logging, train_step
from tests.reference import grpo_numpy


def read_tensorboard(logdir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the scalars in every event file of `logdir`, read with the record
    format (u64 length, u32 crc, payload, u32 crc) and tensorboardX's Event proto, and with
    TensorBoard's rule for a restart: a SessionLog START at step S drops what came before for
    steps >= S."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "*tfevents*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset: offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12: offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                for values in scalars.values():
                    for step in [s for s in values if s >= event.step]:
                        del values[step]
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


class Stream(io.StringIO):
    """A text stream that says whether it is a terminal."""

    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        super().isatty()  # ValueError once closed, as for a real file
        return self.tty


# ----------------------------------------------------------------------------- sinks


def test_tensorboard_holds_each_steps_metrics_and_a_resume_replaces_later_steps(tmp_path):
    records = [{"step": s, "loss": 0.5 / s, "reward/total": 0.25 * s, "time/step_s": 1.0 + s,
                "reward_events/format_missing": 3} for s in (1, 2, 3)]
    with run_logging.RunLogger(str(tmp_path)) as logger:
        for record in records:
            logger.log_metrics(record)
        logger.log_scalars(2, {"time/checkpoint_s": 0.75})
    # A resume from step 2 writes step 3 again, with other values.
    again = {**records[2], "loss": 9.0}
    with run_logging.RunLogger(str(tmp_path), start_step=2) as logger:
        logger.log_metrics(again)
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line) for line in f] == records + [again]  # the loop cuts the file itself
    scalars = read_tensorboard(tmp_path / run_logging.TENSORBOARD_DIR)
    assert set(scalars) == {"loss", "reward/total", "time/step_s", "reward_events/format_missing", "time/checkpoint_s"}
    assert scalars["loss"] == {1: np.float32(0.5), 2: np.float32(0.25), 3: 9.0}
    assert scalars["reward/total"] == {s: np.float32(0.25 * s) for s in (1, 2, 3)}
    assert scalars["time/checkpoint_s"] == {2: 0.75}


def test_only_the_writing_process_writes_and_sinks_close_on_an_exception(tmp_path):
    with run_logging.RunLogger(str(tmp_path), writer=False) as logger:
        logger.log_metrics({"step": 1, "loss": 1.0})
        logger.log_rollouts([{"step": 1}])
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="boom"):
        with run_logging.RunLogger(str(tmp_path), tensorboard=True) as logger:
            logger.log_metrics({"step": 1, "loss": 1.0})
            logger.log_rollouts([{"step": 1, "text": "ü"}])
            raise RuntimeError("boom")
    assert logger._metrics is None and logger._tensorboard is None and logger._rollouts is None
    assert read_tensorboard(tmp_path / run_logging.TENSORBOARD_DIR) == {"loss": {1: 1.0}}
    with open(tmp_path / run_logging.ROLLOUTS_FILE, encoding="utf-8") as f:
        assert json.loads(f.read()) == {"step": 1, "text": "ü"}


def test_wandb_offline_receives_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with run_logging.RunLogger(str(tmp_path), tensorboard=False, wandb_project="g2rpo-test", wandb_mode="offline",
                               config={"run": {"seed": 0}}) as logger:
        logger.log_metrics({"step": 1, "loss": 0.5})
        logger.log_metrics({"step": 2, "loss": 0.25})
        run_id = logger._wandb.id
    assert run_logging.wandb_run_id(str(tmp_path)) == run_id  # a resume continues the same W&B run
    records = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    assert len(records) == 1
    # The offline record file stores each history row's keys and JSON values uncompressed. W&B's
    # service process may still be writing it when finish() returns, so wait for it a while.
    deadline, data = time.monotonic() + 30, b""
    while not (b"loss" in data and b"0.25" in data and b"0.5" in data) and time.monotonic() < deadline:
        time.sleep(0.2)
        with open(records[0], "rb") as f:
            data = f.read()
    assert b"loss" in data and b"0.25" in data and b"0.5" in data, data[:200]


def test_config_checks_name_the_key():
    def run_cfg(**changes):
        return ml_collections.ConfigDict({"rollout_samples": 2, "tensorboard": True, "wandb_project": "",
                                          "wandb_mode": "online", **changes})

    run_logging.validate_config(run_cfg())
    for changes, message in (({"rollout_samples": -1}, r"run.rollout_samples=-1 is not valid; valid: an integer >= 0"),
                             ({"rollout_samples": True}, r"run.rollout_samples=True is not valid"),
                             ({"tensorboard": "yes"}, r"run.tensorboard='yes' is not valid; valid: True or False"),
                             ({"wandb_mode": "cloud"}, r"run.wandb_mode='cloud' is not valid; valid: \('online', 'offline'\)")):
        with pytest.raises(ValueError, match=message):
            run_logging.validate_config(run_cfg(**changes))
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"run.wandb_project='proj' \(run.wandb_mode='offline'\) .* wandb package"):
            run_logging.validate_config(run_cfg(wandb_project="proj", wandb_mode="offline"))


# ----------------------------------------------------------------------------- the progress bar


def test_the_progress_bar_shows_on_a_terminal_only():
    assert run_logging.progress_enabled(Stream(tty=True))
    assert not run_logging.progress_enabled(Stream(tty=False))
    assert not run_logging.progress_enabled(object())  # no isatty at all
    closed = Stream(tty=True)
    closed.close()
    assert not run_logging.progress_enabled(closed)

    metrics = {"step": 3, "loss": 0.01, "reward/total": 0.625, "guidance/length": 24.0,
               "zero_std_group_fraction": 0.5, "throughput/tokens_per_s": 1234.4}
    terminal = Stream(tty=True)
    with run_logging.Progress(True, total=10, initial=2, stream=terminal) as progress:
        print("[train] a line above the bar")
        progress.update(run_logging.progress_postfix(metrics, "guided"))
    shown = terminal.getvalue()
    assert "\r" in shown and "3/10" in shown and "reward 0.625 ℓ 24 1234 tok/s" in shown
    assert "[train] a line above the bar\n" in shown

    log = Stream(tty=False)
    with run_logging.Progress(False, total=10, initial=2, stream=log) as progress:
        progress.update(run_logging.progress_postfix(metrics, "guided"))
    assert log.getvalue() == ""  # nothing of a bar in a log file
    assert run_logging.progress_postfix(metrics, "grpo") == "reward 0.625 zero-std 0.50 1234 tok/s"
    assert run_logging.progress_postfix(metrics, "sft") == "loss 0.0100 1234 tok/s"


def test_the_method_decides_the_note():
    assert run_logging.method_kind("sft", "none") == "sft"
    assert run_logging.method_kind("grpo", "none") == "grpo"
    assert run_logging.method_kind("dapo", "adaptive") == "guided"
    assert "reads ~0" in run_logging.method_note("grpo", 1) and "μ=2" in run_logging.method_note("grpo", 2)
    assert run_logging.method_note("guided", 1) is None and run_logging.method_note("sft", 1) is None


# ----------------------------------------------------------------------------- throughput


def test_throughput_counts_real_tokens_per_stage():
    prompt_mask = np.array([[0, 1, 1], [1, 1, 1]])
    completion_mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    guided_mask = np.array([[1, 0, 0, 0], [0, 0, 0, 0]])  # one forced guide token: not sampled
    sampled, trained = run_logging.batch_token_counts(prompt_mask, completion_mask, guided_mask)
    assert (sampled, trained) == (4, 10)
    out = run_logging.throughput_metrics(sampled, trained, sample_s=2.0, train_step_s=0.5, step_s=4.0, device_count=2)
    assert out == {"throughput/sample_tokens_per_s": 2.0, "throughput/sample_tokens_per_s_per_device": 1.0,
                   "throughput/train_tokens_per_s": 20.0, "throughput/train_tokens_per_s_per_device": 10.0,
                   "throughput/tokens_per_s": 2.5, "throughput/tokens_per_s_per_device": 1.25}
    sft = run_logging.throughput_metrics(0, trained, sample_s=0.0, train_step_s=0.5, step_s=1.0, device_count=1)
    assert not any(k.startswith("throughput/sample") for k in sft)  # no sampling, no sampling rate
    with_flops = run_logging.throughput_metrics(sampled, trained, 2.0, 0.5, 4.0, 2, train_step_flops=3e9)
    assert with_flops["throughput/train_step_flops_per_s"] == 6e9
    assert with_flops["throughput/train_step_flops_per_s_per_device"] == 3e9


def test_step_model_flops_count_the_forwards_the_step_runs():
    """μ forward + backward passes, plus the reference forward (beta != 0) and the old policy's
    (μ > 1): in units of one forward, 3μ + [beta != 0] + [μ > 1]."""
    cfg = models.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                             num_kv_heads=1, head_dim=8)
    batch = train_step.make_batch(np.ones((4, 3)), np.ones((4, 3)), np.ones((4, 5)), np.ones((4, 5)), np.zeros(4))
    forward = flops.forward_flops(cfg, 4, 3, 5)
    for beta, updates, forwards in ((0.0, 1, 3), (0.04, 1, 4), (0.0, 2, 7), (0.04, 2, 8)):
        step_cfg = train_step.get_default_config()
        step_cfg.update(beta=beta, num_iterations=updates)
        assert train_step.model_flops(cfg, step_cfg, batch) == forwards * forward
        # Groups of 2 sharing one prompt: the prompt's 3 positions count for 2 of the 4 rows.
        step_cfg.group_size = 2
        shared = train_step.model_flops(cfg, step_cfg, batch, shared_prompts=True)
        assert shared == forwards * flops.forward_flops(cfg, 4, 3, 5, shared_prompt_group=2)
        body, _ = flops.matmul_parameters(cfg)
        assert shared == forwards * (forward - 2 * 3 * (2 * body + flops.attention_flops(cfg, 3 + 5)))


# ----------------------------------------------------------------------------- rollout records


class CharTokenizer:
    """One character per id (id 0 = '<eos>', special), enough for decoding records."""

    vocab = "\0abcdefghijklmnopqrstuvwxyz +=?:"

    def decode(self, ids, skip_special_tokens=False):
        return "".join("" if i == 0 and skip_special_tokens else ("<eos>" if i == 0 else self.vocab[i]) for i in ids)

    def encode(self, text):
        return [self.vocab.index(c) for c in text]


def make_rollouts(tokenizer, hint_in_prompt: bool):
    """Two groups of two: rollouts 0 and 2 guided by 'ab', rollout 1 and 3 free."""
    prompt_ids = [tokenizer.encode("q one?"), tokenizer.encode("q two?")]
    guide = tokenizer.encode("ab")
    sampled = [tokenizer.encode("cd"), tokenizer.encode("xyz"), tokenizer.encode("e"), tokenizer.encode("zz")]
    guided = np.array([True, False, True, False])
    width = 6
    tokens, mask, guided_mask, prompts, texts = [], [], [], [], []
    for i, rest in enumerate(sampled):
        problem = i // 2
        forced = guide if guided[i] and not hint_in_prompt else []
        row = forced + rest + [0]
        tokens.append(row + [0] * (width - len(row)))
        mask.append([1] * len(row) + [0] * (width - len(row)))
        guided_mask.append([1] * len(forced) + [0] * (width - len(forced)))
        prompts.append(tuple(prompt_ids[problem]) + (tuple(guide) if guided[i] and hint_in_prompt else ()))
        texts.append(tokenizer.decode((guide if guided[i] else []) + rest, skip_special_tokens=True))
    rewards = np.array([1.0, 0.0, 1.0, 1.0], np.float32)
    return prompt_ids, rollout.Rollouts(
        problem_ids=np.array([0, 0, 1, 1], np.int32), prompts=prompts, guided=guided,
        tokens=np.array(tokens, np.int32), mask=np.array(mask, np.int32), guided_mask=np.array(guided_mask, np.int32),
        sampler_logprobs=np.zeros((4, width), np.float32), texts=texts, rewards=rewards,
        per_kind={"accuracy": rewards, "format": np.zeros(4, np.float32)}, stats={})


@pytest.mark.parametrize("hint_in_prompt", [False, True])
def test_rollout_records_split_guide_and_continuation(hint_in_prompt):
    tokenizer = CharTokenizer()
    prompt_ids, rollouts = make_rollouts(tokenizer, hint_in_prompt)
    advantages, zero_spread = run_logging.host_advantages(rollouts.rewards, rollouts.guided, 2, scale="group", eps=1e-4)
    np.testing.assert_allclose(advantages, grpo_numpy.group_advantages_ref(rollouts.rewards, 2), rtol=1e-6)
    assert zero_spread.tolist() == [False, True]
    tests = {"kind": "stdio", "cases": [{"input": "1 2", "output": "3"}]}
    examples = [data.Example(id="one", prompt="q one?", answer="42"),
                data.Example(id="two", prompt="q two?", tests=tests)]
    records = run_logging.rollout_records(7, rollouts, tokenizer, prompt_ids, examples, 2, [0, 1], advantages,
                                          zero_spread)
    assert [(r["group"], r["rollout"], r["problem_id"]) for r in records] == [(0, 0, 0), (0, 1, 0), (1, 0, 1), (1, 1, 1)]
    first, second = records[0], records[1]
    assert first["prompt"] == "q one?"  # the hint is not part of the prompt shown
    # The reference each group was scored against: a math problem's gold answer, a code problem's tests.
    assert [r["answer"] for r in records] == ["42", "42", tests, tests]
    assert (first["guided"], first["guide"], first["continuation"], first["guide_tokens"]) == (True, "ab", "cd", 2)
    assert first["continuation_tokens"] == 3  # 'c', 'd' and the stop token
    assert (second["guide"], second["continuation"]) == ("", "xyz")
    assert all(r["guide"] + r["continuation"] == text and "text" not in r for r, text in zip(records, rollouts.texts))
    assert first["rewards"] == {"accuracy": 1.0, "format": 0.0} and first["step"] == 7
    assert [r["zero_spread"] for r in records] == [False, False, True, True]
    assert [r["advantage"] for r in records[2:]] == [0.0, 0.0]
    json.dumps(records)  # plain JSON values


def test_split_baseline_advantages_follow_the_train_step():
    rewards = np.array([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 1.0, 0.0], np.float32)
    guided = np.array([1, 1, 0, 0, 1, 0, 1, 0], bool)
    advantages, _ = run_logging.host_advantages(rewards, guided, 4, scale="group", eps=1e-4, baseline="guided_split")
    np.testing.assert_allclose(advantages, grpo_numpy.group_advantages_split_ref(rewards, guided, 4), rtol=1e-6, atol=1e-7)


def test_sampled_groups_are_a_function_of_seed_and_step():
    picked = run_logging.sample_groups(16, 2, seed=0, step=3)
    assert len(picked) == 2 and len(set(picked)) == 2 and list(picked) == sorted(picked)
    np.testing.assert_array_equal(picked, run_logging.sample_groups(16, 2, seed=0, step=3))
    assert run_logging.sample_groups(3, 5, seed=0, step=1).tolist() == [0, 1, 2]
    assert len({tuple(run_logging.sample_groups(16, 2, seed=0, step=s)) for s in range(1, 20)}) > 1


def test_sandbox_summary_puts_one_protection_per_line():
    report = {"isolation": "namespaces", "no_new_privs": True, "writable_mounts": ["/tmp/sandbox", "/dev/shm"],
              "hidden_paths": [], "rlimits": {"RLIMIT_AS": 2147483648, "RLIMIT_NPROC": 64}, "output_cap_bytes": 1048576}
    assert run_logging.sandbox_summary(report).splitlines() == [
        "reward sandbox:",
        "  isolation: namespaces",
        "  no_new_privs: True",
        "  writable_mounts: /tmp/sandbox, /dev/shm",
        "  hidden_paths: none",
        "  rlimits: RLIMIT_AS=2147483648, RLIMIT_NPROC=64",
        "  output_cap_bytes: 1048576",
    ]
    from g2rpo_jax import rewards  # noqa: PLC0415

    real = run_logging.sandbox_summary(rewards.sandbox_protections(log=False))  # what a run prints at start
    assert max(len(line) for line in real.splitlines()) < 120 and "  isolation: " in real


def test_without_wall_clock_keeps_what_two_runs_of_a_config_reproduce():
    metrics = {"step": 3, "loss": 0.5, "time/step_s": 1.2, "throughput/tokens_per_s": 900.0,
               "eval/addition_heldout/seconds": 0.41, "eval/addition_heldout/pass@1": 0.125}
    assert run_logging.without_wall_clock(metrics) == {"step": 3, "loss": 0.5, "eval/addition_heldout/pass@1": 0.125}

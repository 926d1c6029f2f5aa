"""Long runs on the demo preset, run as a scheduler runs them (subprocesses of the command line):
SIGTERM saves the step in flight, SIGKILL plus resume reproduces an uninterrupted run bit for bit,
a damaged newest checkpoint falls back to the one before it, non-finite steps are skipped and
stop the run, and a resume checks the config before any work.

One chain of runs in one work directory serves most tests (a module fixture), and the
subprocesses share a compilation cache, so only the first one compiles.
"""

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from g2rpo_jax import models, resume, run_logging, train, train_state
from tests.test_train import REPO, demo_config, read_metrics

TOTAL_STEPS = 8
TIMEOUT_S = 600  # one run on a loaded 2-core machine, compilation included


def run_config(workdir, model=None, **run):
    """`demo_config` on the first 64 problems (enough for these runs; preparing all 20000 takes
    seconds), from the tiny model in `model` when given (written once, shared by the runs)."""
    cfg = demo_config(workdir, **run)
    cfg.data.limit = 64
    if model is not None:
        cfg.model.update({"random_init": False, "checkpoint": str(model)})
    return cfg


def cli_flags(cfg, cache) -> list[str]:
    """Command-line flags that turn the demo preset into `cfg`."""
    spec = importlib.util.spec_from_file_location("g2rpo_config", os.path.join(REPO, "experiments/configs/g2rpo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    changes = resume.config_changes(resume.config_as_dict(module.get_config("demo,adaptive")), resume.config_as_dict(cfg))
    return [f"--config.{key}={new}" for key, (_, new) in changes.items()] + [
        f"--config.mesh.compilation_cache_dir={cache}"]


def start(workdir, cache, *, model=None, script=None, extra=(), **run) -> subprocess.Popen:
    """`python -m g2rpo_jax.train` (or `script`, given the same flags) on `run_config(...)` in
    the background; its output goes to WORKDIR.log."""
    argv = ["--config=experiments/configs/g2rpo.py:demo", *cli_flags(run_config(workdir, model, **run), cache), *extra]
    command = [sys.executable, *(["-m", "g2rpo_jax.train"] if script is None else ["-c", script]), *argv]
    log = open(f"{workdir}.log", "a")
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))


def finish(process: subprocess.Popen, workdir) -> tuple[int, str]:
    returncode = process.wait(timeout=TIMEOUT_S)
    with open(f"{workdir}.log") as f:
        return returncode, f.read()


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def metrics_lines(workdir) -> int:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return sum(1 for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return 0


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


def without_timing(records) -> list[dict]:
    return [run_logging.without_wall_clock(r) for r in records]


def largest_file(directory) -> str:
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    return max(files, key=os.path.getsize)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory, compile_cache):
    """An uninterrupted reference run and, in another directory, the same run stopped by SIGTERM,
    resumed and SIGKILLed at a random moment, its newest checkpoint then cut short, and resumed
    to the end."""
    root = tmp_path_factory.mktemp("long_run")
    reference, run = root / "reference", root / "run"
    model = reference / "random_init_model"
    out = {"reference": reference, "run": run, "model": model}

    process = start(reference, compile_cache, total_steps=TOTAL_STEPS, checkpoint_every=100)
    returncode, out["reference_log"] = finish(process, reference)
    assert returncode == 0, out["reference_log"][-3000:]

    # SIGTERM once the first step is recorded: the second is in flight (no periodic checkpoints).
    process = start(run, compile_cache, model=model, total_steps=TOTAL_STEPS, checkpoint_every=100)
    wait_for(lambda: metrics_lines(run) >= 1, process, "the first step")
    out["steps_before_sigterm"] = metrics_lines(run)
    process.send_signal(signal.SIGTERM)
    out["sigterm_exit"], out["sigterm_log"] = finish(process, run)
    out["sigterm_checkpoints"] = checkpoint_steps(run)
    out["sigterm_metrics"] = [m["step"] for m in read_metrics(run)]

    # Resume, checkpointing every step, and SIGKILL at a random moment after a random checkpoint
    # (one that leaves steps to run: an async checkpoint appears while the next steps run).
    rng = random.Random()
    stopped_at = out["sigterm_checkpoints"][-1]
    target = rng.randint(stopped_at + 1, max(stopped_at + 1, TOTAL_STEPS - 3))
    delay = rng.uniform(0.0, 0.3)
    out["kill"] = f"after checkpoint {target} + {delay:.3f} s"
    process = start(run, compile_cache, model=model, total_steps=TOTAL_STEPS, checkpoint_every=1)
    wait_for(lambda: os.path.isdir(run / "checkpoints" / str(target)), process, f"checkpoint {target}")
    time.sleep(delay)
    assert process.poll() is None, f"the run finished before the SIGKILL ({out['kill']})"
    process.kill()
    out["sigkill_exit"], out["sigkill_log"] = finish(process, run)

    # Cut the biggest file of the newest complete checkpoint in half.
    out["damaged"] = checkpoint_steps(run)[-1]
    victim = largest_file(run / "checkpoints" / str(out["damaged"]) / train_state.STATE_ITEM)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)

    process = start(run, compile_cache, model=model, total_steps=TOTAL_STEPS, checkpoint_every=1)
    out["final_exit"], out["final_log"] = finish(process, run)
    return out


def test_sigterm_saves_the_step_in_flight_and_exits_cleanly(chain):
    log = chain["sigterm_log"]
    assert chain["sigterm_exit"] == 0, log[-3000:]
    assert "SIGTERM received: finishing the step in flight" in log
    # The step that was running when the signal came finished and is the one saved.
    [saved] = chain["sigterm_checkpoints"]
    assert saved > chain["steps_before_sigterm"] and chain["sigterm_metrics"] == list(range(1, saved + 1)), log
    assert f"stopped by SIGTERM after step {saved}: checkpoint {chain['run']}/checkpoints/{saved} is complete" in log
    # The next start resumed from it: no step lost, and its changed checkpoint interval was logged.
    assert f"resumed from step {saved} in" in chain["sigkill_log"]
    assert "run.checkpoint_every (100 -> 1)" in chain["sigkill_log"]


def test_sigkill_and_resume_reproduce_the_uninterrupted_run(chain):
    assert chain["sigkill_exit"] == -signal.SIGKILL
    assert chain["final_exit"] == 0, chain["final_log"][-3000:]
    expected, got = read_metrics(chain["reference"]), read_metrics(chain["run"])
    assert [m["step"] for m in got] == list(range(1, TOTAL_STEPS + 1)), chain["kill"]  # each step once
    assert without_timing(got) == without_timing(expected), chain["kill"]
    _, want = models.load_hf(str(chain["reference"] / "final_hf"))
    _, have = models.load_hf(str(chain["run"] / "final_hf"))
    assert jax.tree.structure(have) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(have), jax.tree.leaves(want)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()  # bitwise


def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_used(chain):
    step = chain["damaged"]
    path = chain["run"] / "checkpoints" / str(step)
    log = chain["final_log"]
    assert f"WARNING: the checkpoint of step {step} at {path} is damaged or incomplete" in log
    assert f"resumed from step {step - 1} in" in log
    assert os.path.isdir(chain["run"] / "checkpoints_damaged" / str(step))
    assert "Traceback" not in log, log[log.find("Traceback") - 300:][:3000]  # one warning, no orbax noise


def directory_listing(root) -> dict:
    return {os.path.join(d, n): os.path.getmtime(os.path.join(d, n)) for d, _, names in os.walk(root) for n in names}


def test_an_incompatible_resume_stops_at_start_naming_the_keys(chain, monkeypatch):
    run = chain["run"]
    cfg = run_config(run, chain["model"], total_steps=TOTAL_STEPS)
    cfg.guidance.update({"mode": "ratio", "min_length": 1})  # 'ratio' needs it; an allowed change, so not listed below
    cfg.step.group_size = 4
    monkeypatch.setattr(models, "load_hf", lambda *a, **k: pytest.fail("loaded a model before the config check"))
    before = directory_listing(run)
    with pytest.raises(ValueError, match=r"guidance.mode \('adaptive' -> 'ratio'\), step.group_size \(2 -> 4\) "
                                         r"differ from the run's and cannot change on resume") as raised:
        train.train(cfg)
    assert "min_length" not in str(raised.value)
    assert directory_listing(run) == before  # no config file, no checkpoint, no metrics touched


def test_a_compatible_change_resumes_and_is_logged(chain, tmp_path, capfd, compile_cache):
    run = tmp_path / "run"
    shutil.copytree(chain["run"], run)
    cfg = run_config(run, chain["model"], total_steps=TOTAL_STEPS + 1)  # one more step, so the run resumes
    cfg.optim.update({"learning_rate": 5e-5, "min_learning_rate": 5e-5})
    cfg.mesh.compilation_cache_dir = compile_cache
    train.train(cfg)
    log = capfd.readouterr().out
    assert "optim.learning_rate (0.0001 -> 5e-05)" in log and f"resumed from step {TOTAL_STEPS} in {run}" in log
    with open(run / f"config.from_step_{TOTAL_STEPS}.json") as f:
        assert json.load(f)["optim"]["learning_rate"] == 5e-5
    with open(run / "config.json") as f:
        assert json.load(f)["optim"]["learning_rate"] == 1e-4  # the first start's config is kept


def test_rerunning_a_finished_run_reports_it_complete_and_redoes_nothing(chain, tmp_path, capfd, compile_cache):
    run = tmp_path / "run"
    shutil.copytree(chain["run"], run)
    before = directory_listing(run)
    process = start(run, compile_cache, model=chain["model"], total_steps=TOTAL_STEPS, checkpoint_every=1)
    returncode, log = finish(process, run)
    assert returncode == 0, log[-3000:]
    assert (f"the run in {run} is already complete at step {TOTAL_STEPS} (run.total_steps={TOTAL_STEPS}); nothing to "
            f"do. Its outputs: {run}/metrics.jsonl, {run}/checkpoints/{TOTAL_STEPS}, {run}/final_hf.") in log
    assert "resumed" not in log and "policy saved" not in log
    assert directory_listing(run) == before  # no export, no config file, no metrics line, no checkpoint
    # A finished run whose export is missing (stopped while writing it) gets only the export.
    shutil.rmtree(run / "final_hf")
    train.train(run_config(run, chain["model"], total_steps=TOTAL_STEPS, checkpoint_every=1))
    log = capfd.readouterr().out
    assert "its Hugging Face export is missing: writing it" in log and "resumed" not in log
    _, want = models.load_hf(str(chain["run"] / "final_hf"))
    _, have = models.load_hf(str(run / "final_hf"))  # the policy of the newest checkpoint, as the run wrote it
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(have), jax.tree.leaves(want)))
    assert checkpoint_steps(run) == checkpoint_steps(chain["run"])
    assert [m["step"] for m in read_metrics(run)] == list(range(1, TOTAL_STEPS + 1))


# The test hook: rewards from the second step on are NaN, so advantages, loss and gradient are too.
NAN_REWARDS = """
import sys
import numpy as np
from g2rpo_jax import rewards, train
real_score_batch, calls = rewards.score_batch, []
def nan_rewards(*args, **kwargs):
    total, per_kind, stats = real_score_batch(*args, **kwargs)
    calls.append(1)
    return (np.full_like(total, np.nan) if len(calls) >= 2 else total), per_kind, stats
rewards.score_batch = nan_rewards
train.main(["train", *sys.argv[1:]])
"""


def restored_state(workdir, step) -> dict:
    """The TrainState of a checkpoint as saved (nested dicts of arrays), without a target."""
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "host"))
    try:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        manager.close()


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, compile_cache, chain):
    workdir = tmp_path / "nan"
    process = start(workdir, compile_cache, model=chain["model"], script=NAN_REWARDS,
                    extra=["--config.run.max_nonfinite_steps=2"], total_steps=6, checkpoint_every=1)
    returncode, log = finish(process, workdir)
    assert returncode == 1, log[-3000:]  # an error: the run did not finish
    assert "Traceback" not in log  # a message, not a crash
    assert "2 steps in a row had a non-finite loss or gradient (run.max_nonfinite_steps=2)" in log
    assert "step 2: non-finite loss or gradient" in log and "the update was skipped (1 in a row" in log
    metrics = read_metrics(workdir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert [m["skipped_nonfinite"] for m in metrics] == [0.0, 1.0, 1.0]
    assert [m["skipped_nonfinite_total"] for m in metrics] == [0, 1, 2]
    # The stop saved step 3; its params, optimizer state and guidance are step 1's, bit for bit.
    assert checkpoint_steps(workdir) == [1, 2, 3]
    first, last = restored_state(workdir, 1), restored_state(workdir, 3)
    assert int(last["step"]) == 3
    for key in ("params", "opt_state", "guidance", "rng"):
        for a, b in zip(jax.tree.leaves(last[key]), jax.tree.leaves(first[key])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=key)

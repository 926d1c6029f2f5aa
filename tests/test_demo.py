"""The demo experiment's orchestrator end to end on a tiny budget: its runs, summary.json, report."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("grpo", "naive", "naive_alpha1", "g2rpo_a")
HELDOUT = "eval/addition_heldout/pass@1"


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_demo(out):
    command = [sys.executable, "experiments/demo.py", "--out", str(out), "--seeds", "3", "--sft_steps", "2",
               "--rl_steps", "2", "--eval_every", "1", "--extra=--config.eval.limit=16"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "runs"
    return out, run_demo(out)


def test_summary_follows_the_contract_and_the_runs_metrics(demo):
    out, stdout = demo
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert set(summary) >= {"methods", "warm_start_heldout_accuracy", "seconds"}
    assert summary["seconds"] > 0
    sft = read_metrics(out / "sft")
    assert summary["warm_start_heldout_accuracy"] == sft[-1][HELDOUT]
    assert set(summary["methods"]) == set(METHODS)
    for name in METHODS:
        entry = summary["methods"][name]
        records = read_metrics(out / name / "seed3")
        assert [r["step"] for r in records] == [1, 2]
        assert entry["seeds"] == [3]
        # Greedy held-out accuracy at the end of training, and means over every training step.
        assert entry["heldout_accuracy"] == [records[-1][HELDOUT]]
        assert entry["zero_std_group_share"] == pytest.approx(np.mean([r["zero_std_group_fraction"] for r in records]))
        assert entry["adv_std_mean"] == pytest.approx(np.mean([r["guidance/advantage_std"] for r in records]))
        assert all(0.0 <= a <= 1.0 for a in entry["heldout_accuracy"])
    # Each method is the run it claims to be: its share of guided rollouts and its ℓ.
    share = {name: read_metrics(out / name / "seed3")[0]["guidance/guided_rollout_share"] for name in METHODS}
    assert share == {"grpo": 0.0, "naive": 0.5, "naive_alpha1": 1.0, "g2rpo_a": 0.5}
    naive_lengths = {r["guidance/length"] for r in read_metrics(out / "naive" / "seed3")}
    assert len(naive_lengths) == 1
    # Every run started from the SFT warm start's exported checkpoint.
    for name in METHODS:
        with open(out / name / "seed3" / "config.json") as f:
            assert json.load(f)["model"]["checkpoint"] == str(out / "sft" / "final_hf")
    # The console shows the table, the report embeds the plot.
    assert "G²RPO-A (adaptive ℓ)" in stdout and "zero-std groups" in stdout
    assert (out / "demo.png").stat().st_size > 10_000
    assert 'src="demo.png"' in (out / "report.html").read_text()


def test_rerunning_reuses_finished_runs(demo):
    out, _ = demo
    stdout = run_demo(out)
    assert "reusing 5 finished run(s) of 5" in stdout
    assert "started" not in stdout


# ----------------------------------------------------------------------------- ablations (experiments/ablations.py)


def load_experiment_module(name):
    import importlib.util

    sys.path.insert(0, os.path.join(REPO, "experiments"))
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_ablation_row_is_a_valid_config():
    """Each row's overrides name real keys with valid values (a typo would only show after an hour)."""
    from g2rpo_jax import command_line, rollout, train

    ablations = load_experiment_module("ablations")
    configs = load_experiment_module("configs/g2rpo")
    for row, (_, overrides) in ablations.ROWS.items():
        cfg = configs.get_config("demo,adaptive")
        for override in overrides:
            key, value = override.split("=", 1)
            *sections, name = key.split(".")
            section = cfg
            for part in sections:
                section = section[part]
            assert name in section, f"row {row}: {key} is not a config key"
            old = section[name]
            section[name] = type(old)(value == "True") if isinstance(old, bool) else type(old)(value)
        with command_line.working_directory(REPO):  # rows name files from the repository root, as runs do
            train.validate_config(cfg, None)
        rollout.validate_options(cfg.guidance, cfg.sampling)


def test_ablation_rows_share_the_demo_warm_start_and_report_the_runs_metrics(demo, tmp_path):
    out, _ = demo
    ablation_out = tmp_path / "ablations"
    command = [sys.executable, "experiments/ablations.py", "--out", str(ablation_out), "--demo_out", str(out),
               "--rows", "baseline,steps", "--seeds", "3", "--sft_steps", "2", "--rl_steps", "2", "--eval_every", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((ablation_out / "ablations.json").read_text())
    for row in ("baseline", "steps"):
        config = json.loads((ablation_out / row / "seed3" / "config.json").read_text())
        assert config["model"]["checkpoint"] == str(out / "sft" / "final_hf")  # the demo's warm start
        metrics = read_metrics(ablation_out / row / "seed3")
        assert summary["rows"][row]["heldout_accuracy"] == [metrics[-1][HELDOUT]]
    steps_config = json.loads((ablation_out / "steps" / "seed3" / "config.json").read_text())["guidance"]
    assert (steps_config["length_unit"], steps_config["step_delimiter"], steps_config["max_length"]) == ("steps", ";", 4)
    assert "| steps |" in (ablation_out / "ablations.md").read_text()

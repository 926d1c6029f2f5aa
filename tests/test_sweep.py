"""experiments/sweep.py: grids into named runs, the commands it prints or hands to a launcher, and a
2×2 sweep of the demo preset whose table holds exactly the numbers of the runs' metrics."""

import csv
import importlib.util
import json
import os
import sys

import pytest

from g2rpo_jax import train
from tests import stand_in

spec = importlib.util.spec_from_file_location("sweep", os.path.join(stand_in.REPO, "experiments", "sweep.py"))
sweep = sys.modules.setdefault("sweep", importlib.util.module_from_spec(spec))  # dataclasses look it up
spec.loader.exec_module(sweep)
DEMO = f"--config={os.path.join(stand_in.REPO, 'experiments/configs/g2rpo.py')}:demo"


def test_grid_expands_into_named_runs_in_order():
    grid = sweep.parse_grid(["guidance.alpha=0.25,0.5", "step.alpha=1", "method=grpo,g2rpo_a"])
    runs = sweep.plan("experiments/configs/g2rpo.py:qwen3_0_6b_math,naive", grid, [("run.seed", "3")], "out")
    assert [r.name for r in runs] == [
        "guidance.alpha=0.25,step.alpha=1,method=grpo", "guidance.alpha=0.25,step.alpha=1,method=g2rpo_a",
        "guidance.alpha=0.5,step.alpha=1,method=grpo", "guidance.alpha=0.5,step.alpha=1,method=g2rpo_a"]
    assert runs[1].train_args == (
        "--config=experiments/configs/g2rpo.py:qwen3_0_6b_math,g2rpo_a", "--config.run.seed=3",
        "--config.guidance.alpha=0.25", "--config.step.alpha=1",
        "--config.run.workdir=out/guidance.alpha=0.25,step.alpha=1,method=g2rpo_a")
    assert sweep.run_name({"data.source": "/data/a b.jsonl"}, {"data.source": "source"}) == "source=_data_a_b.jsonl"
    for bad, message in ((["alpha"], "write KEY=VALUE"), (["a=1,1"], "distinct, non-empty"),
                         (["a=1", "a=2"], "appears twice")):
        with pytest.raises(ValueError, match=message):
            sweep.parse_grid(bad)
    with pytest.raises(ValueError, match="needs a preset"):
        sweep.plan("experiments/configs/g2rpo.py", sweep.parse_grid(["method=grpo"]), [], "out")


def test_print_shows_train_eval_and_launcher_commands(capsys, tmp_path):
    base = ["--config=experiments/configs/g2rpo.py:qwen3_1_7b_math", "--grid", "method=grpo,clip_higher",
            "--set", "model.checkpoint=/ckpt/Qwen3-1.7B", "--out", str(tmp_path / "s"), "--print"]
    assert sweep.main([*base, "--final_eval", "paper_math"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and "g2rpo_jax.train --config=experiments/configs/g2rpo.py:qwen3_1_7b_math,grpo" in lines[0]
    assert "--config.model.checkpoint=/ckpt/Qwen3-1.7B" in lines[0] and f"{tmp_path}/s/method=grpo" in lines[0]
    assert "eval.py:paper_math" in lines[1] and f"--checkpoint={tmp_path}/s/method=grpo/final_hf" in lines[1]
    assert sweep.main([*base[:-3], "--out", "runs/s", "--print", "--launcher", "tpu",
                       "--launcher_args=--tpu t1 --zone z --num_workers 2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[1:8] == ["launch/tpu.py", "--tpu", "t1", "--zone", "z", "--num_workers", "2"]
    assert lines[1].endswith("--config.run.workdir=runs/s/method=clip_higher")  # the remote path, as given
    assert not os.path.exists(tmp_path / "s") and not os.path.exists(os.path.join(stand_in.REPO, "runs", "s"))


@pytest.mark.parametrize("grid,fixed,message", [
    ("guidance.alpah=0.25,0.5", "", '--config.guidance.alpah: the config has no key \'alpah\'; did you mean "alpha"?'),
    ("step.group_size=0,2", "", "step.group_size=0 is not valid; valid: an integer >= 1"),
    ("run.seed=0,1", "step.group_size=two",
     "--config.step.group_size=two: invalid literal for int() with base 10: 'two'"),
])
def test_print_checks_the_overrides_as_train_does(capsys, tmp_path, grid, fixed, message):
    """A bad key or value stops the sweep before any command is printed: train's one-line error, status 2."""
    config = "experiments/configs/g2rpo.py:demo"
    argv = [f"--config={config}", "--grid", grid, *(["--set", fixed] if fixed else []), "--out", str(tmp_path),
            "--print"]
    assert sweep.main(argv) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.startswith(f"experiments/sweep.py: {message}")
    assert len(printed.err.strip().splitlines()) == 1
    first = sweep.plan(config, sweep.parse_grid([grid]), [sweep.parse_assignment(fixed, "--set")] if fixed else [],
                       str(tmp_path))[0]
    body = printed.err.strip().removeprefix("experiments/sweep.py: ")
    assert train.check_args("python -m g2rpo_jax.train", first.train_args) == f"python -m g2rpo_jax.train: {body}"


def test_final_eval_summary_takes_precedence_over_metrics(tmp_path):
    run = sweep.Run("a=1", str(tmp_path / "a=1"), {"a": "1"}, ())
    os.makedirs(tmp_path / "a=1" / "final_eval")
    stand_in.write_jsonl(str(tmp_path / "a=1" / "metrics.jsonl"),
                         [{"step": 50, "eval/math500/pass@1": 0.25}, {"step": 51, "loss": 0.1}])
    assert sweep.final_numbers(run.workdir, ["pass@1"]) == ("step 50", {"math500 pass@1": 0.25})
    with open(tmp_path / "a=1" / "final_eval" / "summary.json", "w") as handle:
        json.dump({"tasks": {"aime24": {"pass@1": 0.1}, "math500": {"pass@1": 0.5, "pass@8": 0.75}}}, handle)
    assert sweep.final_numbers(run.workdir, ["pass@1"]) == ("final_eval", {"aime24 pass@1": 0.1, "math500 pass@1": 0.5})
    header, rows = sweep.table_rows([run], ["pass@1"], {"a=1": "done"})
    assert header == ["run", "a", "status", "numbers from", "aime24 pass@1", "math500 pass@1"]
    assert rows == [["a=1", "1", "done", "final_eval", 0.1, 0.5]]


@pytest.mark.slow
def test_a_2x2_demo_sweep_makes_4_runs_and_one_table_of_their_numbers(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [DEMO, "--grid", "run.seed=0,1", "--grid", "eval.limit=4,8", "--out", str(out),
            "--metrics", "pass@1,num_problems,mean_completion_tokens", "--in_process",
            *[arg for item in ("run.total_steps=2", "run.eval_every=2", "run.checkpoint_every=2",
                               "run.save_hf_at_end=False", "sampling.max_new_tokens=24", "eval.max_new_tokens=24")
              for arg in ("--set", item)]]
    with stand_in.compilation_cache(str(tmp_path / "xla")):
        assert sweep.main(argv) == 0
    names = ["seed=0,limit=4", "seed=0,limit=8", "seed=1,limit=4", "seed=1,limit=8"]
    assert sorted(os.listdir(out)) == sorted(names + ["sweep.csv", "sweep.md"])
    with open(out / "sweep.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["run"] for row in table] == names
    for row in table:
        records = stand_in.read_metrics(str(out / row["run"]))
        assert [r["step"] for r in records] == [1, 2] and row["numbers from"] == "step 2"
        task = "addition_heldout"
        for metric in ("pass@1", "num_problems", "mean_completion_tokens"):
            assert float(row[f"{task} {metric}"]) == records[-1][f"eval/{task}/{metric}"]
        assert row["average pass@1"] == repr(records[-1]["eval/average/pass@1"])
        assert float(row[f"{task} num_problems"]) == int(row["run"][-1])  # the run's own eval.limit
    printed = capsys.readouterr().out
    assert printed.count("| seed=") == 4 and (out / "sweep.md").read_text() in printed
    # Collecting again reads the same directories and writes the same table.
    before = (out / "sweep.csv").read_text()
    assert sweep.main([*argv, "--collect"]) == 0
    assert (out / "sweep.csv").read_text().replace(",done,", ",,") == before.replace(",done,", ",,")


def test_runs_go_one_after_another_in_subprocesses_and_failures_are_reported(tmp_path, monkeypatch, capsys):
    """Each run's output goes to its train.log; a failing run is marked and the sweep goes on;
    a run with a final_hf/ is not trained again."""
    out = tmp_path / "s"
    os.makedirs(out / "seed=1" / "final_hf")
    (out / "seed=1" / "final_hf" / "config.json").write_text("{}")
    script = "import sys; print('training', sys.argv[-1]); sys.exit(3 if sys.argv[-1].endswith('seed=0') else 0)"
    monkeypatch.setattr(sweep, "train_command", lambda run, *_: [sys.executable, "-c", script, run.train_args[-1]])
    argv = ["--config=experiments/configs/g2rpo.py:demo", "--grid", "run.seed=0,1,2", "--out", str(out)]
    assert sweep.main(argv) == 1
    with open(out / "sweep.csv", newline="") as handle:
        status = {row["run"]: row["status"] for row in csv.DictReader(handle)}
    assert status["seed=0"].startswith("failed (exit 3, see ") and status["seed=1"] == "done (reused)"
    assert status["seed=2"] == "done" and not os.path.exists(out / "seed=1" / "train.log")
    assert f"training --config.run.workdir={out}/seed=2" in (out / "seed=2" / "train.log").read_text()
    assert "| seed=0 | 0 | failed" in capsys.readouterr().out

"""Benchmark harness: pass@k estimator, task registry, gold-solution hook, CLI end to end."""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

import g2rpo_jax.eval as evaluation
from g2rpo_jax import data, models, rewards
from tests import stand_in
from tests.reference.pass_at_k_reference import (mean_pass_at_k, pass_at_k_by_enumeration,
                                                 pass_at_k_exact)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "eval")
needs_shared_data = stand_in.needs_shared_data
IN_PROCESS_REWARDS = rewards.RewardSettings(num_workers=0)
RECORD_FIELDS = {"task", "problem_id", "sample_index", "prompt", "completion", "reward", "passed",
                 "details", "num_tokens", "finish_reason"}


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def fixture_data_root(tmp_path_factory):
    """The fixture files laid out like ../shared/data (HumanEval gzipped, as upstream ships it)."""
    root = tmp_path_factory.mktemp("eval_data_root")
    os.makedirs(root / "math500")
    os.makedirs(root / "humaneval")
    os.makedirs(root / "mbpp")
    shutil.copy(os.path.join(FIXTURES, "math500_style.jsonl"), root / "math500" / "test.jsonl")
    shutil.copy(os.path.join(FIXTURES, "mbpp_style.jsonl"), root / "mbpp" / "mbpp.jsonl")
    with open(os.path.join(FIXTURES, "humaneval_style.jsonl"), "rb") as source:
        with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "wb") as target:
            target.write(source.read())
    return str(root)


@pytest.fixture(scope="module")
def tiny_eval_checkpoint(tmp_path_factory):
    """A one-layer random-init Qwen3 with the real Qwen3 tokenizer beside it."""
    path = str(tmp_path_factory.mktemp("tiny_eval_qwen3"))
    return models.write_random_checkpoint(path, cfg=models.TINY_QWEN3.replace(num_layers=1), seed=3)


@pytest.fixture(scope="module")
def tiny_model(tiny_eval_checkpoint):
    cfg, params = models.load_hf(tiny_eval_checkpoint)
    return cfg, params, models.load_tokenizer(tiny_eval_checkpoint)


def gold_completion(example) -> str:
    """What a perfect model would write, built from the raw record fields, not library helpers."""
    if example.answer is not None:
        return f"Working omitted. The answer is $\\boxed{{{example.answer}}}$."
    return f"Here is the code:\n```python\n{example.trajectory}\n```\n"


def wrong_completion(example) -> str:
    if example.answer is not None:
        return "I am not sure; maybe \\boxed{\\text{unknown}}."
    return "```python\ndef unrelated_helper():\n    return None\n```"


def gold_hook(examples, k):
    return [[gold_completion(e)] * k for e in examples]


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# ----------------------------------------------------------------------------- pass@k

def test_pass_at_k_matches_exact_binomials_on_a_grid():
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                ours = float(evaluation.pass_at_k(n, c, k))
                assert ours == pytest.approx(float(pass_at_k_exact(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases_agree_with_enumerated_subsets():
    for n, c, k in [(5, 0, 1), (5, 0, 5), (5, 5, 1), (5, 5, 5), (6, 3, 4), (6, 1, 6), (7, 2, 6), (4, 1, 2)]:
        expected = float(pass_at_k_by_enumeration(n, c, k))
        assert float(evaluation.pass_at_k(n, c, k)) == pytest.approx(expected, abs=1e-12), (n, c, k)
    assert float(evaluation.pass_at_k(8, 0, 3)) == 0.0  # no correct sample: never passes
    assert float(evaluation.pass_at_k(8, 8, 3)) == 1.0  # all correct
    assert float(evaluation.pass_at_k(8, 6, 3)) == 1.0  # k > n - c: any 3 samples hold a correct one


def test_pass_at_k_is_vectorised_and_pass_at_1_is_the_mean_fraction():
    correct = np.array([0, 1, 2, 4, 3])
    np.testing.assert_allclose(evaluation.pass_at_k(4, correct, 1), correct / 4)
    expected = [float(pass_at_k_exact(4, int(c), 2)) for c in correct]
    np.testing.assert_allclose(evaluation.pass_at_k(4, correct, 2), expected, atol=1e-12)


def test_pass_at_k_stays_accurate_for_many_samples():
    # Exact binomials of n = 200 are ~1e58; the product form must not lose precision.
    for c, k in [(1, 1), (3, 10), (50, 100), (0, 7), (199, 200)]:
        assert float(evaluation.pass_at_k(200, c, k)) == pytest.approx(
            float(pass_at_k_exact(200, c, k)), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError, match="num_correct|k="):
        evaluation.pass_at_k(n, c, k)


def test_resolve_pass_k_defaults_and_errors():
    assert evaluation.resolve_pass_k((), 4) == (1, 4)
    assert evaluation.resolve_pass_k("", 1) == (1,)
    assert evaluation.resolve_pass_k("4,1,2,2", 8) == (1, 2, 4)
    with pytest.raises(ValueError, match=r"pass_k=.*outside 1..num_samples=2"):
        evaluation.resolve_pass_k([1, 4], 2)
    with pytest.raises(ValueError, match="comma-separated list of integers"):
        evaluation.resolve_pass_k("1,two", 2)


# ----------------------------------------------------------------------------- task registry

def test_unknown_task_error_lists_every_known_task():
    with pytest.raises(ValueError) as info:
        evaluation.parse_task_list("math500,math_500")
    message = str(info.value)
    assert "'math_500'" in message
    for name in ("math500", "aime24", "aime25", "gsm8k", "humaneval", "mbpp"):
        assert f"'{name}'" in message
    assert "file:PATH:ADAPTER" in message


def test_registry_covers_the_issue_benchmarks_with_the_right_reward():
    expected = {"math500": "math", "aime24": "math", "aime25": "math", "gsm8k": "math",
                "humaneval": "code", "mbpp": "code"}
    for name, reward in expected.items():
        spec = evaluation.parse_task(name)
        assert (spec.name, spec.reward) == (name, reward)
        assert spec.local_path and spec.hub_name


def test_file_task_syntax_and_its_errors():
    spec = evaluation.parse_task("file:some/dir/my_set.jsonl.gz:gsm8k")
    assert (spec.name, spec.adapter, spec.reward, spec.local_path) == (
        "my_set", "gsm8k", "math", "some/dir/my_set.jsonl.gz")
    with pytest.raises(ValueError, match=r"ADAPTER one of \['aime', 'code_stdio'"):
        evaluation.parse_task("file:some/file.jsonl:nonsense")
    with pytest.raises(ValueError, match="more than once"):
        evaluation.parse_task_list("humaneval,file:x/humaneval.jsonl:humaneval")
    with pytest.raises(ValueError, match="is empty"):
        evaluation.parse_task_list(" , ")


def test_missing_files_raise_with_the_data_root(tmp_path):
    with pytest.raises(ValueError, match="no such file 'absent.jsonl'"):
        evaluation.load_task("file:absent.jsonl:math", data_root=str(tmp_path))
    # A registry task missing locally falls back to the hub, which is offline here.
    with pytest.raises(ValueError, match=f"not under the data root '{tmp_path}'"):
        evaluation.load_task("aime25", data_root=str(tmp_path))


def test_mbpp_keeps_the_standard_test_split_then_limits(fixture_data_root):
    task = evaluation.load_task("mbpp", data_root=fixture_data_root)
    assert [e.id for e in task.examples] == ["mbpp/11", "mbpp/12"]  # 5 and 600 are outside 11..510
    assert [e.id for e in evaluation.load_task("mbpp", fixture_data_root, limit=1).examples] == ["mbpp/11"]


def test_file_task_path_is_tried_as_given_then_under_the_data_root(fixture_data_root):
    under_root = evaluation.load_task("file:math500/test.jsonl:math", data_root=fixture_data_root)
    as_given = evaluation.load_task(f"file:{FIXTURES}/math500_style.jsonl:math", data_root="/nonexistent")
    assert under_root.name == "test" and as_given.name == "math500_style"
    assert [e.answer for e in under_root.examples] == [e.answer for e in as_given.examples]


# ----------------------------------------------------------------------------- gold-solution hook

def test_gold_solutions_score_pass_at_1_of_one_on_fixtures(fixture_data_root, tmp_path):
    tasks = ["math500", "humaneval", "mbpp", f"file:{FIXTURES}/humaneval_style.jsonl:humaneval"]
    settings = evaluation.EvalSettings(num_samples=2, data_root=fixture_data_root, batch_size=4,
                                       rewards=rewards.RewardSettings(num_workers=2))
    summary = evaluation.evaluate(None, None, None, tasks, settings, completions_fn=gold_hook,
                                  output_dir=str(tmp_path))
    assert set(summary["tasks"]) == {"math500", "humaneval", "mbpp", "humaneval_style"}
    for name, task in summary["tasks"].items():
        assert task["pass@1"] == 1.0 and task["pass@2"] == 1.0, name
        assert task["reward_stats"]["sandbox_errors"] == 0 and task["reward_stats"]["timeouts"] == 0
    assert summary["tasks"]["humaneval"]["reward_stats"]["executions"] == 3 * 2
    assert summary["macro_average"]["pass@1"] == 1.0
    records = read_jsonl(summary["files"]["generations"])
    assert len(records) == (5 + 3 + 2 + 3) * 2
    assert all(set(r) == RECORD_FIELDS and r["passed"] and r["reward"] == 1.0 for r in records)


@pytest.mark.parametrize("reward_workers", [0, 2])
def test_partial_correctness_gives_reference_pass_at_k(tiny_model, fixture_data_root, tmp_path, reward_workers):
    """Problem i gets its first (i mod 4) samples right. Prompts are reordered by length and
    chunks of 4 rows split a problem's 3 samples; with a reward pool chunks are scored in the
    background while the next one is produced. Each score must still land on its own row."""
    _, _, tokenizer = tiny_model
    k = 3
    task = evaluation.load_task("math500", data_root=fixture_data_root)
    right_count = {e.id: i % (k + 1) for i, e in enumerate(task.examples)}

    def mixed(examples, num):
        return [[gold_completion(e) if s < right_count[e.id] else wrong_completion(e) for s in range(num)]
                for e in examples]

    settings = evaluation.EvalSettings(num_samples=k, pass_k=(1, 2, 3), batch_size=4,
                                       rewards=rewards.RewardSettings(num_workers=reward_workers))
    summary = evaluation.evaluate(None, None, tokenizer, [task], settings, completions_fn=mixed,
                                  output_dir=str(tmp_path))
    counts = [(k, right_count[e.id]) for e in task.examples]
    metrics = summary["tasks"]["math500"]
    for kk in (1, 2, 3):
        assert metrics[f"pass@{kk}"] == pytest.approx(mean_pass_at_k(counts, kk), abs=1e-12)
    for record in read_jsonl(os.path.join(tmp_path, "generations.jsonl")):
        assert record["passed"] == (record["sample_index"] < right_count[record["problem_id"]])
        assert record["prompt"].startswith("<|im_start|>user")  # the chat-templated prompt
        assert record["details"]["gold_answer"] is not None


@needs_shared_data
def test_gold_solutions_score_pass_at_1_of_one_on_real_benchmarks(tmp_path):
    # Real MATH500 / AIME / GSM8K answers and HumanEval / MBPP reference code, a few of each.
    tasks = [evaluation.load_task(name, limit=limit) for name, limit in
             [("math500", 8), ("aime24", 3), ("aime25", 3), ("gsm8k", 3), ("humaneval", 5), ("mbpp", 3)]]
    settings = evaluation.EvalSettings(num_samples=1, rewards=IN_PROCESS_REWARDS)
    summary = evaluation.evaluate(None, None, None, tasks, settings, completions_fn=gold_hook,
                                  output_dir=str(tmp_path))
    for name, task in summary["tasks"].items():
        assert task["pass@1"] == 1.0, name
    assert summary["tasks"]["mbpp"]["num_problems"] == 3
    assert read_jsonl(summary["files"]["generations"])[0]["problem_id"] == tasks[0].examples[0].id


def test_completions_fn_with_the_wrong_shape_is_refused(fixture_data_root):
    with pytest.raises(ValueError, match="completions_fn must return 5 lists of num_samples=2"):
        evaluation.evaluate(None, None, None, ["math500"],
                            evaluation.EvalSettings(num_samples=2, data_root=fixture_data_root,
                                                    rewards=IN_PROCESS_REWARDS),
                            completions_fn=lambda ex, k: [["x"]] * len(ex))


# ----------------------------------------------------------------------------- with the model

def test_sampling_is_reproducible_per_seed(tiny_model, fixture_data_root, tmp_path):
    cfg, params, tokenizer = tiny_model

    def completions(seed, folder):
        settings = evaluation.EvalSettings(num_samples=2, max_new_tokens=8, batch_size=8, limit=3, seed=seed,
                                           data_root=fixture_data_root, rewards=IN_PROCESS_REWARDS)
        evaluation.evaluate(cfg, params, tokenizer, ["math500"], settings, output_dir=str(tmp_path / folder))
        records = read_jsonl(tmp_path / folder / "generations.jsonl")
        return {(r["problem_id"], r["sample_index"]): r["completion"] for r in records}

    first, again, other = completions(0, "a"), completions(0, "b"), completions(1, "c")
    assert first == again
    assert first != other
    assert len(set(first.values())) > 1  # samples of one problem differ from each other


def test_cli_end_to_end_on_a_random_tiny_checkpoint(tiny_eval_checkpoint, fixture_data_root, tmp_path):
    out = tmp_path / "out"
    argv = ["g2rpo_jax.eval", "--checkpoint", tiny_eval_checkpoint, "--tasks", "math500,humaneval",
            "--limit", "4", "--num_samples", "2", "--max_new_tokens", "32", "--output_dir", str(out),
            "--data_root", fixture_data_root, "--batch_size", "4"]
    assert evaluation.main(argv) == 0
    records = read_jsonl(out / "generations.jsonl")
    assert len(records) == (4 + 3) * 2  # math500 limited to 4 problems; the humaneval fixture has 3
    assert all(set(r) == RECORD_FIELDS for r in records)
    assert {r["task"] for r in records} == {"math500", "humaneval"}
    assert all(0 < r["num_tokens"] <= 32 and r["finish_reason"] in ("stop", "length") for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["checkpoint"] == tiny_eval_checkpoint
    assert summary["settings"]["temperature"] == evaluation.DEFAULT_TEMPERATURE
    for name in ("math500", "humaneval"):
        task = summary["tasks"][name]
        assert 0.0 <= task["pass@1"] <= task["pass@2"] <= 1.0
    table = (out / "summary.md").read_text()
    assert table.startswith("| task | problems | samples | pass@1 | pass@2 |")
    assert "| math500 | 4 | 2 |" in table and "| humaneval | 3 | 2 |" in table and "macro average" in table


def test_config_file_overrides_and_plain_flags(tmp_path):
    config_file = os.path.join(REPO_ROOT, "experiments", "configs", "eval.py")
    config = evaluation.parse_command_line(
        ["prog", f"--config={config_file}:aime24,aime25", "--config.num_samples=8",
         "--config.prompt.enable_thinking=False", "--top_p", "0.5"])
    assert (config.tasks, config.num_samples, config.prompt.enable_thinking, config.top_p) == (
        "aime24,aime25", 8, False, 0.5)
    defaults = evaluation.parse_command_line(["prog", "--config.top_k=5"])
    assert (defaults.top_k, defaults.temperature, defaults.tasks) == (5, 0.6, "math500")
    settings = evaluation.EvalSettings.from_config(defaults)
    assert settings.top_k == 5 and settings.rewards.num_workers == 2 and settings.prompt.max_prompt_tokens is None
    assert evaluation.evaluate_options(defaults) == settings
    with pytest.raises(ValueError, match="checkpoint=''"):
        evaluation.run(defaults)


def test_module_entry_point_prints_usage():
    result = subprocess.run([sys.executable, "-m", "g2rpo_jax.eval", "--help"], capture_output=True,
                            text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--checkpoint DIR --tasks" in result.stdout and "num_samples" in result.stdout


def test_module_entry_point_shows_progress_on_stderr(tiny_eval_checkpoint, tmp_path):
    """Under `python -m` the progress lines (problems, rows, rows/s, ETA) reach stderr."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "g2rpo_jax.eval", "--checkpoint", tiny_eval_checkpoint,
               "--tasks", f"file:{FIXTURES}/math500_style.jsonl:math", "--limit", "2", "--num_samples", "2",
               "--batch_size", "2", "--max_new_tokens", "4", "--output_dir", str(out),
               "--config.rewards.num_workers=0"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    progress = re.findall(r"g2rpo_jax\.eval: eval math500_style: (\d)/2 problems, (\d)/4 rows \(\d+%\), "
                          r"[\d.]+ rows/s, \S+ elapsed, ETA \S+", result.stderr)
    assert progress == [("1", "2"), ("2", "4")], result.stderr
    assert "| math500_style | 2 | 2 |" in result.stdout and "rows/s" not in result.stdout


def test_progress_line_counts_problems_rows_rate_and_eta():
    line = evaluation.progress_line("math500", 3, 10, 14, 40, 7.0)
    assert line == "eval math500: 3/10 problems, 14/40 rows (35%), 2.00 rows/s, 7s elapsed, ETA 13s"
    assert evaluation.progress_line("t", 0, 1, 0, 4, 0.0).endswith("0.00 rows/s, 0s elapsed, ETA ?")
    assert [evaluation.format_duration(s) for s in (0.4, 59, 61, 3599, 3600 * 2 + 5 * 60)] == [
        "0s", "59s", "1m01s", "59m59s", "2h05m"]


def test_eval_settings_from_the_config_and_their_errors():
    config = evaluation.get_default_config()
    assert evaluation.EvalSettings.from_config(config) == evaluation.EvalSettings()
    config.update({"pass_k": "4,1", "limit": 0, "data_root": ""})
    config.prompt.update({"system": "Be brief.", "max_prompt_tokens": 0, "enable_thinking": False})
    settings = evaluation.EvalSettings.from_config(config)
    assert (settings.pass_k, settings.limit, settings.data_root) == ((4, 1), None, None)
    assert settings.prompt == data.PromptSettings(system="Be brief.", enable_thinking=False)
    assert evaluation.EvalSettings(pass_k="2") == evaluation.EvalSettings(pass_k=[2])
    config.prompt.template = "jinja"
    with pytest.raises(ValueError, match="eval.prompt.template='jinja' is unknown"):
        evaluation.EvalSettings.from_config(config, "eval")
    config.prompt.template, config.num_samples = "chat", 0
    with pytest.raises(ValueError, match="eval.num_samples=0 must be >= 1"):
        evaluation.EvalSettings.from_config(config, "eval")
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        evaluation.EvalSettings(batch_size=0)


def test_training_loops_periodic_eval_follows_the_eval_section(tiny_model, fixture_data_root, tmp_path):
    from g2rpo_jax import train  # noqa: PLC0415 (only this test needs the training loop)

    cfg_model, params, tokenizer = tiny_model
    cfg = ml_collections.ConfigDict({"eval": evaluation.get_default_config()})
    # The sampler shapes of test_sampling_is_reproducible_per_seed: its compiled program is reused.
    cfg.eval.update({"num_samples": 2, "max_new_tokens": 8, "batch_size": 8})
    cfg.eval.rewards.num_workers = 0
    tasks = [evaluation.load_task("math500", fixture_data_root, limit=3)]
    settings = evaluation.EvalSettings.from_config(cfg.eval, "eval")  # as the loop builds it at start-up
    flat = train.periodic_eval(settings, cfg_model, params, tokenizer, tasks, None, None, 5, str(tmp_path))
    assert flat["eval/math500/num_problems"] == 3 and 0 <= flat["eval/average/pass@1"] <= 1
    records = read_jsonl(tmp_path / "eval" / "step_5" / "generations.jsonl")
    assert len(records) == 6 and all(r["step"] == 5 and r["num_tokens"] <= 8 for r in records)

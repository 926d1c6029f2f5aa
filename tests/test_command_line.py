"""Mistakes in --config flags end in one line naming the flag as typed, the cause and the fix."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import ml_collections
import pytest

from g2rpo_jax import command_line
from g2rpo_jax.eval import cli as eval_cli
from tests.stand_in import CHAR_TOKENIZER, REPO


def chained(*errors: BaseException) -> BaseException:
    """errors[0] raised while handling errors[1], ... (the last one is the first cause)."""
    for outer, inner in zip(errors, errors[1:]):
        outer.__context__ = inner
    return errors[0]


def test_message_names_the_unknown_key_as_typed_and_the_nearest_one():
    error = chained(AttributeError('\'alpah\'\nDid you mean "alpha" instead of "alpah"?'),
                    KeyError('\'alpah\'\nDid you mean "alpha" instead of "alpah"?'), KeyError("alpah"))
    argv = ["prog", "--config=x.py:demo", "--config.run.seed=3", "--config.guidance.alpah=0.5"]
    config = ml_collections.ConfigDict({"run": {"seed": 0}, "guidance": {"alpha": 0.5, "delta": 4}})
    assert command_line.flag_error_message("prog", error, argv, config) == (
        'prog: --config.guidance.alpah: the config has no key \'alpah\'; did you mean "alpha"?; valid keys of '
        "guidance: alpha, delta")
    section = chained(KeyError("'guidanse'\nDid you mean \"guidance\" instead of \"guidanse\"?"))
    message = command_line.flag_error_message("prog", section, ["prog", "--config.guidanse.alpha=1"], config)
    assert message == ('prog: --config.guidanse.alpha: the config has no key \'guidanse\'; did you mean "guidance"?; '
                       "valid keys of the config: guidance, run")


def test_message_keeps_the_flag_and_the_innermost_cause():
    error = chained(ValueError("flag --config=x.py:demox: Error whilst parsing config file:\nTraceback ..."),
                    ValueError("config preset 'demox' is unknown; valid: ['demo']"))
    assert command_line.flag_error_message("prog", error, []) == (
        "prog: --config=x.py:demox: config preset 'demox' is unknown; valid: ['demo']")


def test_evaluation_command_line_names_a_misspelled_key():
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.parse_command_line(["g2rpo_jax.eval", "--checkpoint", "x", "--config.temperatur=0.5"])
    assert str(exit_info.value).startswith(
        'python -m g2rpo_jax.eval: --config.temperatur: the config has no key \'temperatur\'; did you mean '
        '"temperature"?; valid keys of the config: batch_size, checkpoint,')


def test_training_command_line_prints_one_line_and_exits_2():
    result = subprocess.run(
        [sys.executable, "-m", "g2rpo_jax.train", "--config=experiments/configs/g2rpo.py:demo",
         "--config.guidance.alpah=0.5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        'python -m g2rpo_jax.train: --config.guidance.alpah: the config has no key \'alpah\'; did you mean "alpha"?; '
        "valid keys of guidance: alpha, delta, initial_length, length_unit, max_length, min_length, mode, "
        "per_problem, placement, reward_source, step_delimiter, total_steps, trigger, update_every, window")
    assert "Traceback" not in result.stderr


def test_help_lists_the_presets_of_the_config_files(capsys, tmp_path):
    training = command_line.config_file_help("usage: train")
    assert training.startswith("usage: train\n\nTraining configs:")
    assert all(name in training for name in ("qwen3_1_7b_math,g2rpo_a", "demo", "linear_decay", "clip_higher"))
    assert command_line.config_file_help("usage", str(tmp_path / "absent.py")) == "usage"
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.parse_command_line(["g2rpo_jax.eval", "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "paper_math" in printed and "--num_samples INT     completions per problem" in printed
    # The default config one key per line, a section's keys indented below it.
    lines = printed.splitlines()
    config = lines[lines.index("the default config (g2rpo_jax/eval/settings.py):") + 1:]
    assert config[:2] == ["  batch_size: 64", "  checkpoint: ''"]
    assert "  rewards:" in config and "    code:" in config and "      timeout_s: 10.0" in config
    assert max(len(line) for line in config) < 80


def test_training_help_exits_0_and_keeps_the_tables_as_written():
    result = subprocess.run([sys.executable, "-m", "g2rpo_jax.train", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("usage: python -m g2rpo_jax.train --config=experiments/configs/<file>.py:<preset>")
    # The training module's and the config file's docstrings, each as written (not rewrapped).
    from g2rpo_jax import train  # noqa: PLC0415

    assert train.__doc__.strip() in result.stdout
    assert command_line.config_file_help("").strip() in result.stdout
    assert "  model   qwen3_0_6b | qwen3_1_7b | qwen3_8b   mesh, micro-batch, remat, dtype (MODELS)" in lines
    assert "  config.json             the config of the run's first start; each resume from step S adds" in lines


@pytest.mark.parametrize("overrides", [(), ("--config.run.total_steps=1",)])
def test_a_relative_config_path_from_another_folder_names_the_working_directory(tmp_path, overrides):
    result = subprocess.run([sys.executable, "-m", "g2rpo_jax.train", "--config=experiments/configs/g2rpo.py:demo",
                             *overrides],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"python -m g2rpo_jax.train: no such file 'experiments/configs/g2rpo.py' (looked for relative to the "
        f"working directory {tmp_path}: run from the folder the path is relative to, e.g. the repository root, or "
        f"give an absolute path)")


def test_a_bad_value_found_at_start_up_prints_its_message_alone(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "g2rpo_jax.train", "--config=experiments/configs/g2rpo.py:demo",
         "--config.step.group_size=0", f"--config.run.workdir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "python -m g2rpo_jax.train: step.group_size=0 is not valid; valid: an integer >= 1")
    assert not (tmp_path / "run").exists()


def test_evaluation_and_sampling_print_a_bad_input_alone_and_exit_2(tmp_path, capsys):
    from g2rpo_jax import sample  # noqa: PLC0415

    missing = str(tmp_path / "absent")
    expected = f"'{missing}' is not a Hugging Face model directory: {missing}/config.json is missing"
    assert sample.main(["--checkpoint", missing, "--prompt", "1+2="]) == 2
    assert capsys.readouterr().err.strip() == f"python -m g2rpo_jax.sample: {expected}"
    assert eval_cli.main(["g2rpo_jax.eval", "--checkpoint", missing, "--tasks", "math500",
                          "--output_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"python -m g2rpo_jax.eval: {expected}"


def test_evaluation_and_sampling_refuse_completions_beyond_the_model_positions(tmp_path, capsys):
    from g2rpo_jax import models, sample  # noqa: PLC0415

    tokenizer = models.load_tokenizer(CHAR_TOKENIZER)
    checkpoint = models.write_random_checkpoint(str(tmp_path / "model"), models.tiny_config_for(tokenizer),
                                                tokenizer_dir=CHAR_TOKENIZER)
    limit = models.read_config(checkpoint).max_position_embeddings
    assert sample.main(["--checkpoint", checkpoint, "--prompt", "1+2=", "--no_chat_template",
                        "--max_new_tokens", str(limit)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"python -m g2rpo_jax.sample: the prompt (4 tokens) + --max_new_tokens={limit} = {limit + 4} positions, more "
        f"than the model's max_position_embeddings={limit}; lower --max_new_tokens")
    (tmp_path / "task.jsonl").write_text('{"problem": "1+2=", "solution": "\\\\boxed{3}"}\n')
    assert eval_cli.main(["g2rpo_jax.eval", "--checkpoint", checkpoint, "--tasks", f"file:{tmp_path / 'task.jsonl'}:math",
                          "--max_new_tokens", str(limit), "--output_dir", str(tmp_path / "out"),
                          "--config.prompt.template=plain", "--config.prompt.instruction="]) == 2
    assert re.search(rf"the longest prompt \(\d+ tokens\) \+ max_new_tokens={limit} = \d+ positions, more than the "
                     rf"model's max_position_embeddings={limit}", capsys.readouterr().err)

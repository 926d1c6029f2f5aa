"""The command line: `python -m g2rpo_jax.eval --checkpoint DIR --tasks math500,aime24 --output_dir OUT`.

--config=FILE (an ml_collections config file, e.g. experiments/configs/eval.py[:ARG]) or the
defaults, then --config.KEY=VALUE overrides, then the plain flags below. Progress (problems and
rows done, rows/s, ETA) goes to stderr; the result table to stdout.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Sequence

from ml_collections import config_dict
from g2rpo_jax import command_line

from g2rpo_jax.eval.harness import evaluate
from g2rpo_jax.eval.report import logger, markdown_table, write_summary
from g2rpo_jax.eval.settings import EvalSettings, get_default_config
from g2rpo_jax.eval.tasks import TASKS, parse_task_list

PROGRAM = "python -m g2rpo_jax.eval"

# Plain flags that set the config key of the same name (after --config and its overrides).
_SHORTCUT_FLAGS = {
    "checkpoint": (str, "Hugging Face checkpoint directory"),
    "tasks": (str, "comma-separated tasks: " + ",".join(TASKS) + " or file:PATH:ADAPTER"),
    "output_dir": (str, "where generations.jsonl, summary.json and summary.md are written"),
    "data_root": (str, "folder of the benchmark files"),
    "dtype": (str, "float32 or bfloat16"),
    "pass_k": (str, "comma-separated k values for pass@k"),
    "limit": (int, "first N problems per task (0 = all)"),
    "num_samples": (int, "completions per problem"),
    "max_new_tokens": (int, "completion budget in tokens"),
    "batch_size": (int, "rows (problems x samples) per sampler call"),
    "top_k": (int, "top-k sampling (0 = off)"),
    "seed": (int, "sampling seed"),
    "temperature": (float, "sampling temperature"),
    "top_p": (float, "nucleus sampling mass"),
}


def _define_flags(argv: Sequence[str]):
    """The absl FlagValues of this command line: --config (a file when --config is given, else
    the defaults) and the shortcut flags."""
    from absl import flags  # noqa: PLC0415 (only the command line needs absl)
    from ml_collections import config_flags  # noqa: PLC0415

    flag_values = flags.FlagValues()
    if any(arg == "--config" or arg.startswith("--config=") for arg in argv[1:]):
        config_flags.DEFINE_config_file("config", None, "an ml_collections config file",
                                        flag_values=flag_values, sys_argv=list(argv))
    else:
        config_flags.DEFINE_config_dict("config", get_default_config(), "the eval config",
                                        flag_values=flag_values, sys_argv=list(argv))
    definers = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float}
    for name, (kind, text) in _SHORTCUT_FLAGS.items():
        definers[kind](name, None, text + " (sets --config." + name + ")", flag_values=flag_values)
    return flag_values


def help_text() -> str:
    """The usage, the presets of experiments/configs/eval.py, the flags and the default config
    (indented, one key per line), with their line breaks as written."""
    usage = (f"usage: {PROGRAM} --checkpoint DIR --tasks math500,humaneval --output_dir OUT "
             "[--config=FILE] [--config.KEY=VALUE ...]")
    presets = os.path.join(os.path.dirname(command_line.TRAINING_CONFIGS), "eval.py")
    kinds = {str: "", int: " INT", float: " FLOAT"}
    flags = [(f"--{name}{kinds[kind]}", text) for name, (kind, text) in _SHORTCUT_FLAGS.items()]
    flags += [("--config=FILE[:ARG]", "an ml_collections config file (default: the config below)"),
              ("--config.KEY=VALUE", "sets one key of the config, e.g. --config.prompt.enable_thinking=False")]
    width = max(len(flag) for flag, _ in flags)
    return "\n".join([
        command_line.config_file_help(usage, presets), "",
        "flags (a plain flag sets the config key of its name, after --config and its overrides):",
        *(f"  {flag:<{width}}  {text}" for flag, text in flags), "",
        "the default config (g2rpo_jax/eval/settings.py):",
        *command_line.config_lines(get_default_config()),
    ])


def parse_command_line(argv: Sequence[str]) -> config_dict.ConfigDict:
    """--config=FILE (else the defaults), --config.KEY=VALUE overrides, then the plain flags.

    argv[0] is the program name. --help prints the usage and exits 0; a bad flag exits with its error.
    """
    from absl import flags  # noqa: PLC0415

    argv = list(argv)
    try:  # overrides of the default config are checked as the flags are defined
        flag_values = _define_flags(argv)
    except (KeyError, AttributeError, ValueError, OSError) as error:
        defaults = None if any(a.startswith("--config=") for a in argv) else get_default_config()
        raise SystemExit(command_line.flag_error_message(PROGRAM, error, argv, defaults)) from None
    if command_line.wants_help(argv):
        print(help_text())
        raise SystemExit(0)
    try:
        rest = flag_values(argv)
    except (flags.Error, KeyError, AttributeError, ValueError) as error:
        raise SystemExit(command_line.flag_error_message(PROGRAM, error, argv)) from None
    if len(rest) > 1:
        raise SystemExit(f"{PROGRAM}: unexpected arguments {rest[1:]}")
    config = flag_values.config
    for name in _SHORTCUT_FLAGS:
        value = flag_values[name].value
        if value is not None:
            config[name] = value
    return config


def run(config: config_dict.ConfigDict) -> dict[str, Any]:
    """Loads the checkpoint named by the config and evaluates it; returns the summary.

    Raises ValueError for a missing checkpoint or output_dir, a bad task or setting, before the
    model is loaded.
    """
    from g2rpo_jax import models  # noqa: PLC0415 (the library part of this package needs no loader)

    if not config.checkpoint:
        raise ValueError("checkpoint='' : give the Hugging Face checkpoint directory (--checkpoint DIR)")
    if not config.output_dir:
        raise ValueError("output_dir='' : give the folder for the results (--output_dir DIR)")
    tasks = parse_task_list(config.tasks)
    settings = EvalSettings.from_config(config)
    started = time.monotonic()
    cfg, params = models.load_hf(config.checkpoint, dtype=config.dtype)
    tokenizer = models.load_tokenizer(config.checkpoint)
    logger.info("loaded %s (%s) in %.1f s", config.checkpoint, config.dtype, time.monotonic() - started)
    summary = evaluate(cfg, params, tokenizer, tasks, settings, output_dir=config.output_dir)
    summary["settings"]["checkpoint"] = config.checkpoint
    write_summary(summary, config.output_dir)
    return summary


def show_progress_on_stderr() -> None:
    """INFO lines of the g2rpo_jax loggers (evaluation progress, reward sandbox) on stderr, with
    times; a root handler set up earlier is kept as it is."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("g2rpo_jax").setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (argv[0] is the program name; None = sys.argv); returns the exit status."""
    config = parse_command_line(sys.argv if argv is None else argv)
    show_progress_on_stderr()
    try:
        summary = run(config)
    except (ValueError, FileNotFoundError) as error:  # our messages name the flag or file and the fix
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return 2
    print(markdown_table(summary))
    print(f"generations: {summary['files']['generations']}\nsummary: {summary['files']['summary_json']}, "
          f"{summary['files']['summary_md']}")
    return 0

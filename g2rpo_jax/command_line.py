"""One-line messages for mistakes in `--config` flags (ml_collections config files and overrides).

A misspelled override such as `--config.guidance.alpah=0.5` or an unknown preset otherwise ends in
dozens of lines of chained tracebacks from absl and ml_collections; `flag_error_message` turns the
exception into the flag as typed, the cause, and the fix.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import re
import sys
from typing import Callable, Iterator, Sequence

from g2rpo_jax.paths import relative_hint


def _innermost(error: BaseException) -> BaseException:
    """The first exception of a chain (`raise ... from`, or raised while handling another)."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return error


def _unknown_key(error: BaseException) -> str | None:
    """The key ml_collections did not find ('alpah' from KeyError("'alpah'\\nDid you mean ...")), or None."""
    for link in (error, _innermost(error)):
        if isinstance(link, (KeyError, AttributeError)) and link.args:
            match = re.match(r"""^['"\\]*([\w.]+)""", str(link.args[0]))
            if match:
                return match.group(1)
    return None


def _suggestion(error: BaseException) -> str:
    text = str(error.args[0]) if error.args else ""
    match = re.search(r'Did you mean "([\w.]+)" instead of "([\w.]+)"', text.replace("\\", ""))
    return f'; did you mean "{match.group(1)}"?' if match else ""


def _config_from_argv(argv: Sequence[str]):
    """The config `--config=FILE[:ARG]` in argv names, built without overrides; None when absent or
    when it cannot be built (its own error is reported elsewhere)."""
    spec = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), None)
    if spec is None:
        return None
    path, _, config_arg = spec.partition(":")
    try:
        module_spec = importlib.util.spec_from_file_location("_config_for_keys", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(config_arg) if config_arg else module.get_config()
    except Exception:  # noqa: BLE001 -- only used to list keys
        return None


def _valid_keys(config, typed: str, key: str) -> str:
    """'; valid keys of guidance: alpha, delta, ...' for the section `typed` (--config.a.b.key) points
    into, or '' when the config or the section is unknown."""
    node = config
    for part in typed.removeprefix("--config.").split("."):
        if part == key or not hasattr(node, "keys") or part not in node:
            break
        node = node[part]
    if node is None or not hasattr(node, "keys"):
        return ""
    where = typed.removeprefix("--config.").rsplit(key, 1)[0].rstrip(".") or "the config"
    return f"; valid keys of {where}: {', '.join(sorted(node.keys()))}"


def flag_error_message(program: str, error: BaseException, argv: Sequence[str], config=None) -> str:
    """`program: <flag as typed>: <cause>` for an exception raised while parsing `argv`'s flags.
    `config`: the config being overridden (None = the one `--config=` in argv names), whose keys
    an unknown-key message lists."""
    key = _unknown_key(error)
    if key is not None:
        names = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")]
        typed = next((n for n in names if n.endswith(f".{key}") or f".{key}." in n), f"--config.<...>.{key}")
        keys = _valid_keys(config if config is not None else _config_from_argv(argv), typed, key)
        return f"{program}: {typed}: the config has no key {key!r}{_suggestion(error)}{keys}"
    innermost = _innermost(error)
    cause = str(innermost).strip().splitlines()
    last = cause[-1] if cause else type(error).__name__
    missing = re.search(r"No such file or directory: '([^']+)'", str(innermost))
    if missing:
        last = f"no such file {missing.group(1)!r}{relative_hint(missing.group(1))}"
    text = str(error)
    flag = text[len("flag "):text.find(": ")] if text.startswith("flag ") and ": " in text else ""
    return f"{program}: {flag + ': ' if flag else ''}{last}"


HELP_FLAGS = ("-h", "--help", "-help", "-?", "--helpshort", "--helpfull")


def wants_help(argv: Sequence[str]) -> bool:
    """Whether a command line (argv[0] is the program) asks for its help."""
    return any(arg in HELP_FLAGS for arg in argv[1:])


def config_flags_parser(program: str, help_text: str | None = None) -> Callable[[list[str]], list[str]]:
    """A `flags_parser` for `absl.app.run` that exits with status 2 and one line on stderr when the
    flags do not parse, instead of a traceback. With `help_text`, --help (or -h, --helpfull)
    prints it as written, line breaks and tables kept, and exits 0 (absl's own help rewraps
    every paragraph and exits 1)."""
    from absl import flags  # noqa: PLC0415 (absl is only needed by the command lines)

    def parse(argv: list[str]) -> list[str]:
        if help_text is not None and wants_help(argv):
            print(help_text)
            raise SystemExit(0)
        try:
            return flags.FLAGS(argv)
        except (flags.Error, KeyError, AttributeError, ValueError, OSError) as error:
            print(flag_error_message(program, error, argv), file=sys.stderr)
            raise SystemExit(2) from None

    return parse


def parse_config_args(program: str, args: Sequence[str]):
    """The config of `--config=FILE[:ARG] [--config.KEY=VALUE ...]` parsed as the train command
    parses it (locked, overrides type-checked), or None without --config; relative paths are taken
    from the working directory. Raises ValueError with `flag_error_message`'s one line for a bad
    file, preset, key or value."""
    from absl import flags  # noqa: PLC0415 (absl is only needed by the command lines)
    from ml_collections import config_flags  # noqa: PLC0415

    argv = [program, *args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "the training config", flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    try:
        flag_values(argv)
        config = flag_values.config
        if config is not None:
            config.keys()  # ml_collections reports a config file it could not read on first use
    except (flags.Error, KeyError, AttributeError, ValueError, OSError) as error:
        raise ValueError(flag_error_message(program, error, argv)) from None
    return config


@contextlib.contextmanager
def working_directory(path: str) -> Iterator[None]:
    """Runs the block from `path` (where a run's relative paths are meant), then returns to the
    previous working directory."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def config_lines(config, indent: str = "  ") -> list[str]:
    """`config` (a ConfigDict or dict) as indented `key: value` lines, a section's keys below it."""
    lines = []
    for key, value in config.items():
        if hasattr(value, "items"):
            lines += [f"{indent}{key}:", *config_lines(value, indent + "  ")]
        else:
            lines.append(f"{indent}{key}: {value!r}")
    return lines


# The training configs of a source checkout; their docstring lists the presets and methods.
TRAINING_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments", "configs", "g2rpo.py")


def config_file_help(usage: str, path: str = TRAINING_CONFIGS) -> str:
    """`usage`, followed by the docstring of the config file at `path` (its presets, methods and
    variants) when that file exists; read with `ast`, so nothing in it runs."""
    try:
        with open(path, encoding="utf-8") as f:
            docstring = ast.get_docstring(ast.parse(f.read()))
    except OSError:
        docstring = None
    return usage if not docstring else f"{usage}\n\n{docstring}"

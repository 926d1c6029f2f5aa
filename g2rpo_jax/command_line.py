"""One-line messages for mistakes in `--config` flags (ml_collections config files and overrides).

A misspelled override such as `--config.guidance.alpah=0.5` or an unknown preset otherwise ends in
dozens of lines of chained tracebacks from absl and ml_collections; `flag_error_message` turns the
exception into the flag as typed, the cause, and the fix.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from typing import Callable, Sequence

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


def flag_error_message(program: str, error: BaseException, argv: Sequence[str]) -> str:
    """`program: <flag as typed>: <cause>` for an exception raised while parsing `argv`'s flags."""
    key = _unknown_key(error)
    if key is not None:
        names = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")]
        typed = next((n for n in names if n.endswith(f".{key}") or f".{key}." in n), f"--config.<...>.{key}")
        return (f"{program}: {typed}: the config has no key {key!r}{_suggestion(error)} "
                f"(--helpfull lists every --config.* key of the preset)")
    innermost = _innermost(error)
    cause = str(innermost).strip().splitlines()
    last = cause[-1] if cause else type(error).__name__
    missing = re.search(r"No such file or directory: '([^']+)'", str(innermost))
    if missing:
        last = f"no such file {missing.group(1)!r}{relative_hint(missing.group(1))}"
    text = str(error)
    flag = text[len("flag "):text.find(": ")] if text.startswith("flag ") and ": " in text else ""
    return f"{program}: {flag + ': ' if flag else ''}{last}"


def config_flags_parser(program: str) -> Callable[[list[str]], list[str]]:
    """A `flags_parser` for `absl.app.run` that exits with status 2 and one line on stderr when the
    flags do not parse, instead of a traceback."""
    from absl import flags  # noqa: PLC0415 (absl is only needed by the command lines)

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except (flags.Error, KeyError, AttributeError, ValueError) as error:
            print(flag_error_message(program, error, argv), file=sys.stderr)
            raise SystemExit(2) from None

    return parse


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

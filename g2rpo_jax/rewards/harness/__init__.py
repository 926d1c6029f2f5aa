"""Scripts that run inside the code sandbox: the assert harness and the stdio runner.

Each script is written as modules of this package (standard library only, Python 3.10+, each
importing its siblings with relative imports) and shipped into the sandbox as one standalone
file, `script(entry)`: the modules it needs concatenated in import order, with those relative
imports removed, since the sandbox's interpreter (``python -I -S``) cannot import the package.
The library never imports the modules for their code; tests import them for their pure helpers
(nothing runs at import). Only this file runs on the host.

The assert harness (``harness.py``, entry `assert_main`). Files in the working directory:
solution.py (the program), tests.py (test code), check.py (``check(<entry point>)``, HumanEval
style; absent for MBPP style) and token. Descriptor 3 is the completion channel: the token is
written there once the last test line ran, so leaving early or crashing earns nothing.

Two processes, so that nothing the tests decide runs program code:

  judge    this process. Runs the tests, holds the token, never executes program code, and is
           made non-dumpable: a process of the same user (the program) can then neither trace
           it, read its memory nor open its descriptors through /proc.
  program  forked from the judge before the token and the tests are read (so its memory holds
           neither) and told to start only once they are deleted. It runs solution.py, then
           answers the judge's requests over a pair of pipes: call this, get that attribute,
           iterate, convert to str, ...

What crosses the pipes is plain data (see `codec.Codec`): builtin scalars and containers, a few
standard-library value types (Fraction, Counter, namedtuple, ...), named standard-library
classes, and references to objects that stay in the other process. The receiver rebuilds values
with its own classes, so every value the tests see is either built by the judge or a
`RemoteObject`, whose equality, ordering, hashing and membership are decided in the judge on
plain data. An object whose ``__eq__`` always says True, an int subclass, a callable instance or
a function made by ``exec``: whatever the program hands over, what it controls is what any
function controls, the plain values it returns.

The stdio runner (``runner.py``, entry `stdio_main`) runs the program as the __main__ module.
"""

from __future__ import annotations

import ast
import functools
import pathlib

_HERE = pathlib.Path(__file__).parent
# The modules each script is made of, in import order (a module after those it imports).
SCRIPTS = {
    "assert_main": ("runtime", "wire", "values", "codec", "program", "judge", "assert_main"),
    "stdio_main": ("runtime", "stdio_main"),
}


def _without_package_imports(source: str, name: str) -> str:
    """`source` without its top-level relative imports (the names they bring in are defined by
    the modules placed before it). A relative import anywhere else could not be removed."""
    tree = ast.parse(source, name)
    lines = source.splitlines(keepends=True)
    top_level = [node for node in tree.body if isinstance(node, ast.ImportFrom) and node.level]
    nested = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level
              and node not in top_level]
    if nested:
        raise ValueError(f"{name}:{nested[0].lineno}: a sandbox script module may import its "
                         "siblings only at its top level")
    for node in reversed(top_level):
        del lines[node.lineno - 1:node.end_lineno]
    return "".join(lines)


@functools.lru_cache(maxsize=None)
def script(entry: str) -> str:
    """The standalone source of the script whose entry module is `entry` (a key of SCRIPTS)."""
    if entry not in SCRIPTS:
        raise ValueError(f"entry={entry!r}; valid: {tuple(SCRIPTS)}")
    parts = []
    for module in SCRIPTS[entry]:
        name = f"{module}.py"
        parts.append(_without_package_imports((_HERE / name).read_text(encoding="utf-8"), name))
    return "\n\n".join(parts)

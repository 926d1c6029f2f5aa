"""What a program run inside the sandbox finds around it: `exit` and `quit` (which ``python -S``
leaves out, `site` defines them) and a module of its own to run in."""

import builtins
import os
import sys


class _Exit:
    """`exit` / `quit`, which `-S` leaves out (`site` defines them)."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"Use {self.name}() to exit"

    def __call__(self, code=None):
        raise SystemExit(code)


def install_exit_builtins():
    """Put `exit` and `quit` into builtins unless they are there already, so that programs
    ending with `exit()` behave as under a normal interpreter."""
    if not hasattr(builtins, "exit"):
        builtins.exit, builtins.quit = _Exit("exit"), _Exit("quit")


def run_as_module(source, filename, module_name):
    """Run `source` (read from `filename` in the working directory) as the module `module_name`,
    registered in sys.modules; the module."""
    module = type(sys)(module_name)
    module.__file__ = os.path.abspath(filename)
    module.__builtins__ = builtins
    sys.modules[module_name] = module
    exec(compile(source, filename, "exec"), module.__dict__)
    return module

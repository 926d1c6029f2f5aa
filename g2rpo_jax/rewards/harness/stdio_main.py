"""The stdio runner, run inside the sandbox as ``python -I -S -B runner.py``: the program
(main.py) runs as the __main__ module, like ``python main.py``, reading stdin and writing stdout
itself. Programs run without `site` by default (its processing dominates start-up time), so
`exit` and `quit` are put back first."""

import os
import sys

from .runtime import install_exit_builtins, run_as_module


def run_main_file():
    """Run main.py (deleted first) as the __main__ module."""
    with open("main.py", "rb") as f:
        source = f.read().decode("utf-8")
    os.unlink("main.py")
    sys.argv = ["main.py"]
    run_as_module(source, "main.py", "__main__")


if __name__ == "__main__":
    install_exit_builtins()
    run_main_file()

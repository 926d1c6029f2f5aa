"""What the TPU and GPU launchers share: their `--config` arguments (checked as the train command
checks them), the train command they run on every host, and a shell that either runs commands or,
with --dry_run, only prints them.

Standard library only, so a launcher runs with any python3 before the project's venv exists (the
config check then waits for the train command).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import threading
from typing import IO, Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PYTHON = ".venv/bin/python"  # relative to the repository root on every host
TRAIN_MODULE = "g2rpo_jax.train"
JAX_VERSION = "0.10.2"
DISTRIBUTED_KEY = "--config.mesh.distributed"
CONFIG_USAGE = ("--config=experiments/configs/g2rpo.py:<preset>[,<method>] [--config.KEY=VALUE ...], "
                "e.g. --config=experiments/configs/g2rpo.py:qwen3_1_7b_math,g2rpo_a "
                "--config.model.checkpoint=/ckpt/Qwen3-1.7B")


class LaunchError(SystemExit):
    """A mistake in the launcher's arguments or environment: exits with status 2 and the message
    (printed by `run_main`; a SystemExit with an integer code would exit without a word)."""

    def __init__(self, launcher: str, message: str):
        super().__init__(f"{launcher}: {message}")
        self.message = f"{launcher}: {message}"
        self.code = 2


def run_main(main) -> int:
    """A launcher's entry point: main()'s status, or 2 with the LaunchError's message on stderr."""
    try:
        return main()
    except LaunchError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- the train command

def split_config_args(launcher: str, extra: Sequence[str]) -> tuple[str, list[str]]:
    """(config, overrides) from the arguments the launcher's own parser left over.

    Exactly one `--config=FILE:ARG` and any number of `--config.KEY=VALUE`; anything else (a typo
    in a launcher flag, a `--config.KEY VALUE` without '=') is refused with the valid form."""
    configs, overrides = [], []
    for arg in extra:
        if arg.startswith("--config="):
            configs.append(arg.split("=", 1)[1])
        elif arg.startswith("--config.") and "=" in arg:
            overrides.append(arg)
        elif arg.startswith("--config"):
            raise LaunchError(launcher, f"{arg!r}: write the value after '=' ({CONFIG_USAGE})")
        else:
            raise LaunchError(launcher, f"unknown argument {arg!r}; launcher flags are listed by --help, and "
                                        f"the run is given as {CONFIG_USAGE}")
    if len(configs) != 1:
        found = "none" if not configs else f"{len(configs)}: {configs}"
        raise LaunchError(launcher, f"exactly one --config=... is needed, got {found}; {CONFIG_USAGE}")
    config = configs[0]
    path = config.split(":", 1)[0]
    if not (os.path.isfile(path) or os.path.isfile(os.path.join(REPO, path))):
        raise LaunchError(launcher, f"--config={config}: no config file {path!r} (paths are relative to the "
                                    f"repository root, e.g. experiments/configs/g2rpo.py)")
    if any(o.startswith(DISTRIBUTED_KEY + "=") for o in overrides):
        raise LaunchError(launcher, f"{DISTRIBUTED_KEY} is set by the launcher (True on a pod or several "
                                    "nodes); leave it out of the overrides")
    return config, overrides


def check_train_config(launcher: str, config: str, overrides: Sequence[str]) -> None:
    """Stops, before anything is run or printed, with the one-line error the train command would
    stop with for a bad config file, key or value (`g2rpo_jax.train.check_args`, paths from the
    repository root as on every host). The check needs the project's packages; under a python
    without them (before the venv exists) it is left to the train command, with a note on stderr."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    try:
        from g2rpo_jax import train  # noqa: PLC0415 (optional: the launcher itself needs only the stdlib)
    except ImportError as error:
        print(f"{launcher}: note: the config and its overrides were not checked here ({error}); the train "
              "command checks them when it starts", file=sys.stderr)
        return
    error = train.check_args(launcher, [f"--config={config}", *overrides], root=REPO)
    if error:
        raise LaunchError(launcher, error.removeprefix(f"{launcher}: "))


def train_command(config: str, overrides: Sequence[str], distributed: bool,
                  python: str = VENV_PYTHON) -> list[str]:
    """The command every host runs: the same config, overrides and distributed setting."""
    return [python, "-m", TRAIN_MODULE, f"--config={config}", f"{DISTRIBUTED_KEY}={distributed}", *overrides]


def setup_script(jax_extra: str, python: str = VENV_PYTHON) -> str:
    """Shell that creates the venv with JAX for the accelerator (`cuda12`, `tpu`) unless it exists."""
    pip = os.path.join(os.path.dirname(python), "pip")
    jax = shlex.quote(f"jax[{jax_extra}]=={JAX_VERSION}")
    return (f"(test -x {python} || (python3 -m venv {os.path.dirname(os.path.dirname(python))} && "
            f"{pip} install -q -r requirements.txt {jax} && {pip} install -q --no-deps -e .))")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry_run", action="store_true",
                        help="print every command (and file) the launch would run or write; run nothing")
    parser.add_argument("--no_setup", action="store_true",
                        help="skip creating the venv (it must exist already)")


# ----------------------------------------------------------------------------- running or printing

def require_tools(launcher: str, tools: Mapping[str, str]) -> None:
    """Stops with the missing tool's name and where to get it ({tool: hint})."""
    missing = [f"{tool} ({hint})" for tool, hint in tools.items() if shutil.which(tool) is None]
    if missing:
        raise LaunchError(launcher, f"not on PATH: {', '.join(missing)}; --dry_run prints the commands "
                                    "without running them")


class Shell:
    """Runs commands in the repository root, or only prints them (dry run). Every command is
    echoed as `+ <command>` first, so a real launch logs exactly what a dry run shows."""

    def __init__(self, launcher: str, dry_run: bool, out: IO[str] | None = None):
        self.launcher = launcher
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def echo(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self, command: Sequence[str], *, note: str = "", capture: bool = False,
            check: bool = True) -> subprocess.CompletedProcess | None:
        """Runs one command (None in a dry run); a failing one stops the launch unless check=False."""
        self.echo("+ " + shlex.join(command) + (f"    # {note}" if note else ""))
        if self.dry_run:
            return None
        result = subprocess.run(list(command), cwd=REPO, text=True, capture_output=capture)
        if check and result.returncode != 0:
            detail = f": {result.stderr.strip()[-500:]}" if capture and result.stderr else ""
            raise LaunchError(self.launcher, f"{command[0]} exited with status {result.returncode}{detail}")
        return result

    def write(self, path: str, text: str) -> None:
        """Writes a file (a dry run prints its path and content instead)."""
        self.echo(f"+ write {path}" + ("" if not self.dry_run else f"\n{text.rstrip()}\n+ end of {path}"))
        if not self.dry_run:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)

    def run_parallel(self, commands: Sequence[Sequence[str]], labels: Sequence[str],
                     log_paths: Sequence[str]) -> list[int]:
        """Runs the commands at once, streaming each line as `[label] line` and into its log file;
        returns their exit statuses (all zero in a dry run)."""
        for command, label in zip(commands, labels):
            self.echo(f"+ [{label}] " + shlex.join(command))
        if self.dry_run:
            return [0] * len(commands)
        lock = threading.Lock()

        def stream(process: subprocess.Popen, label: str, log: IO[str]) -> None:
            for line in process.stdout:
                log.write(line)
                log.flush()
                with lock:
                    self.echo(f"[{label}] {line.rstrip()}")

        threads, processes, logs = [], [], []
        for command, label, path in zip(commands, labels, log_paths):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            logs.append(open(path, "a", encoding="utf-8"))
            processes.append(subprocess.Popen(list(command), cwd=REPO, text=True, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT))
            threads.append(threading.Thread(target=stream, args=(processes[-1], label, logs[-1]), daemon=True))
            threads[-1].start()
        try:
            statuses = [process.wait() for process in processes]
        finally:
            for thread in threads:
                thread.join(timeout=5)
            for log in logs:
                log.close()
        return statuses

"""The spec of one execution: the marshal-ed dict `_launcher.py` reads (files, argv, environment,
rlimits, paths to hide or keep visible), built from `SandboxLimits` on the host."""

from __future__ import annotations

import functools
import importlib.util
import marshal
import os
import sys
from typing import Mapping

from g2rpo_jax.rewards.sandbox.limits import SandboxLimits

NAMESPACE_WORKDIR = "/tmp/sandbox"  # inside the sandbox's private /tmp


def _python_paths(python: str) -> list[str]:
    """Directories the interpreter needs at run time (kept visible inside hidden paths)."""
    if python == sys.executable:
        candidates = [sys.base_prefix, sys.prefix, sys.exec_prefix, os.path.dirname(python)]
    else:
        candidates = [os.path.dirname(os.path.dirname(os.path.realpath(python))),
                      os.path.dirname(python)]
    paths = sorted({os.path.realpath(p) for p in candidates} | set(candidates))
    # Binding a directory already bound through its parent is redundant.
    return [p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/")
                                        for q in paths)]


def _rlimits(limits: SandboxLimits) -> dict:
    cpu = limits.cpu_time_s or limits.timeout_s + 1.0
    cpu_s = max(1, int(cpu + 0.999))
    return {
        "RLIMIT_AS": limits.memory_mb << 20,
        "RLIMIT_CPU": [cpu_s, cpu_s + 1],  # SIGXCPU first, SIGKILL one second later
        "RLIMIT_NPROC": limits.max_processes,
        "RLIMIT_FSIZE": limits.max_file_mb << 20,
        "RLIMIT_NOFILE": limits.max_open_files,
        "RLIMIT_CORE": 0,
        "RLIMIT_MEMLOCK": 0,
    }


def _program_env(workdir: str, token: str) -> dict:
    """The program's whole environment: nothing is inherited from the host. `token` (rlimits
    mode only) lets the host find processes that left the process group."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    if token:
        env["G2RPO_SANDBOX_TOKEN"] = token
    return env


@functools.lru_cache(maxsize=8)
def _pyc_image(source: str, filename: str) -> bytes:
    """`source` compiled for this interpreter, as a .pyc file that `python file.pyc` runs
    (header: magic number, flags, and an unused source timestamp and size)."""
    code = compile(source, filename, "exec", dont_inherit=True)
    return importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(code)


def _precompile_main(files: Mapping[str, str], main_file: str,
                     python: str) -> tuple[dict, str]:
    """Ship a .py main file compiled when the sandbox runs this interpreter: compiling a large
    script (the assert harness) would otherwise cost every execution ~10 ms of CPU. Only for
    library code: a program is never compiled on the host."""
    files = dict(files)
    if python != sys.executable or not main_file.endswith(".py") or main_file + "c" in files:
        return files, main_file
    files[main_file + "c"] = _pyc_image(files.pop(main_file), main_file)
    return files, main_file + "c"


def build_spec(files: Mapping[str, str], main_file: str, limits: SandboxLimits,
               isolation: str, workdir: str, token: str, compile_main: bool = False) -> dict:
    """The launcher's spec for running `main_file` among `files` in `workdir` (its path as the
    program sees it) with a concrete `isolation` mode; see `run_python` for `compile_main`."""
    python = limits.python_executable or sys.executable
    if compile_main:
        files, main_file = _precompile_main(files, main_file, python)
    argv = [python, "-I", "-B"] + ([] if limits.site_packages else ["-S"]) + [main_file]
    hide = []
    home = os.path.expanduser("~")
    if limits.hide_home and home not in ("", "/") and os.path.isdir(home):
        hide.append(os.path.realpath(home))
    return {
        "isolation": isolation,
        "workdir": workdir,
        "files": dict(files),
        "argv": argv,
        "env": _program_env(workdir, token if isolation != "namespaces" else ""),
        "rlimits": _rlimits(limits),
        "sandbox_uid": limits.sandbox_uid,
        "sandbox_gid": limits.sandbox_uid,
        "hide_paths": hide,
        "keep_paths": _python_paths(python),
        "workdir_bytes": limits.workdir_mb << 20,
        "wall_limit_s": limits.timeout_s + limits.setup_timeout_s + 5.0,
    }

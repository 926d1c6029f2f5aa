"""Host side of the code sandbox: run an untrusted Python program in a separate process tree.

Each execution starts `_launcher.py` in a new session with an empty environment. With Linux
namespaces (used when the host allows them: root, or unprivileged user namespaces) the program
gets a fresh user namespace without capabilities (and a distinct unprivileged uid when the host
is root), no network (a new network namespace whose loopback is down), its own PID namespace
(every process it starts dies with it), a read-only view of the file system with a private
size-capped tmpfs as working directory, private /tmp and /dev/shm, the host user's home
directory hidden, no nested user namespaces, and rlimits (address space, CPU time, processes,
file size, open files). Without namespaces it falls back to rlimits, the scrubbed environment,
a private directory, no capabilities, and a subreaper plus an environment-token scan that kill
descendants; that fallback cannot block the network or writes elsewhere, and a root host ignores
RLIMIT_NPROC. `sandbox_protections()` reports what is active, as observed from inside a probe.

Modules, in import order: `limits` (SandboxLimits), `spec` (what the launcher is told),
`execute` (one run: pipes, caps, deadlines, killing the tree; see there for how the limits are
enforced), `protections` (which isolation works here, and what it protects); `_launcher.py` is
the script that builds the sandbox, never imported.
"""

from __future__ import annotations

from typing import Mapping

from g2rpo_jax.rewards.sandbox.execute import STDERR_KEEP_BYTES, ExecutionResult, execute
from g2rpo_jax.rewards.sandbox.limits import ISOLATION_MODES, SandboxLimits
from g2rpo_jax.rewards.sandbox.protections import (log_protections_once, resolve_isolation,
                                                   sandbox_protections)

__all__ = [
    "ISOLATION_MODES", "STDERR_KEEP_BYTES", "ExecutionResult", "SandboxLimits",
    "log_protections_once", "resolve_isolation", "run_python", "sandbox_protections",
]


def run_python(files: Mapping[str, str], main_file: str, *, limits: SandboxLimits,
               stdin: bytes = b"", result_channel: bool = False,
               compile_main: bool = False) -> ExecutionResult:
    """Run `python main_file` in a fresh sandbox whose working directory holds `files`.

    With `result_channel`, descriptor 3 of the program is a pipe whose bytes are returned in
    `ExecutionResult.result_channel` (used by the test harness to prove it ran to the end).
    `compile_main`: main_file is library code (a harness, never a program); it is compiled here
    once and shipped as bytecode when the sandbox runs this interpreter.
    """
    return execute(files, main_file, limits=resolve_isolation(limits.validate()), stdin=stdin,
                   result_channel=result_channel, compile_main=compile_main)

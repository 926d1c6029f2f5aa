"""What one sandboxed execution may use: `SandboxLimits`, the `code` rewards config section."""

from __future__ import annotations

import dataclasses

ISOLATION_MODES = ("auto", "namespaces", "rlimits")


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits of one execution. Every field is a config key of the `code` rewards section."""

    timeout_s: float = 10.0  # wall clock, from the moment the program starts
    memory_mb: int = 2048  # address-space limit (RLIMIT_AS) of each process
    cpu_time_s: float = 0.0  # RLIMIT_CPU; 0 means timeout_s + 1
    max_processes: int = 64  # RLIMIT_NPROC (threads count too)
    max_output_bytes: int = 1 << 20  # stdout; more kills the program (stderr is discarded)
    max_file_mb: int = 16  # RLIMIT_FSIZE
    max_open_files: int = 256  # RLIMIT_NOFILE
    workdir_mb: int = 64  # size of the private tmpfs working directory (namespaces mode)
    isolation: str = "auto"  # auto | namespaces | rlimits
    python_executable: str = ""  # "" means the interpreter running this code
    site_packages: bool = False  # let programs import installed packages (numpy, ...); slower
    sandbox_uid: int = 65534  # uid/gid the program runs as when the host is root
    setup_timeout_s: float = 20.0  # for the sandbox itself to start (load can slow it down)
    hide_home: bool = True  # hide the host user's home directory (namespaces mode)

    def validate(self) -> "SandboxLimits":
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"code.isolation={self.isolation!r}; valid: {ISOLATION_MODES}")
        for name in ("timeout_s", "memory_mb", "max_processes", "max_output_bytes",
                     "max_file_mb", "max_open_files", "workdir_mb", "setup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"code.{name}={getattr(self, name)!r}; must be > 0")
        if self.cpu_time_s < 0:
            raise ValueError(f"code.cpu_time_s={self.cpu_time_s!r}; must be >= 0 (0: auto)")
        return self

"""Which isolation works on this host, and what protections a program actually gets.

"auto" resolves to Linux namespaces when a probe program runs under them, else to the rlimits
fallback (once per process and setting). `sandbox_protections()` reports what is active as
observed from inside such a probe: uid, capabilities, network, PID namespace, writable mounts,
environment and rlimits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading

from g2rpo_jax.rewards.sandbox.execute import ExecutionResult, execute
from g2rpo_jax.rewards.sandbox.limits import SandboxLimits

logger = logging.getLogger(__name__)

_PROBE_PROGRAM = r'''
import json, os, resource, socket
facts = {"uid": os.getuid(), "pid": os.getpid()}
with open("/proc/self/status") as f:
    status = dict(line.split(":", 1) for line in f if ":" in line)
facts["capabilities_effective"] = status["CapEff"].strip()
facts["capabilities_bounding"] = status["CapBnd"].strip()
facts["no_new_privs"] = status.get("NoNewPrivs", "0").strip() == "1"
facts["network_interfaces"] = sorted(name for _, name in socket.if_nameindex())
facts["visible_processes"] = sum(entry.isdigit() for entry in os.listdir("/proc"))
writable = []
with open("/proc/self/mountinfo") as f:
    for line in f:
        fields = line.split()
        if "rw" in fields[5].split(","):
            writable.append(fields[4])
facts["writable_mounts"] = writable
facts["cwd"] = os.getcwd()
facts["env"] = sorted(os.environ)
names = ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_NOFILE"]
facts["rlimits"] = {n: resource.getrlimit(getattr(resource, n))[0] for n in names}
print(json.dumps(facts))
'''

_resolved_lock = threading.Lock()
_resolved_isolation: dict[tuple, str] = {}
_reports: dict[tuple, dict] = {}


def _probe_key(limits: SandboxLimits) -> tuple:
    """The settings a probe's verdict depends on: interpreter, site packages, uid, hidden home."""
    return (limits.python_executable, limits.site_packages, limits.sandbox_uid, limits.hide_home)


def _probe(limits: SandboxLimits, isolation: str) -> tuple[ExecutionResult, dict | None]:
    probe_limits = dataclasses.replace(limits, isolation=isolation, timeout_s=max(limits.timeout_s,
                                                                                 10.0))
    result = execute({"probe.py": _PROBE_PROGRAM}, "probe.py", limits=probe_limits)
    if not result.clean_exit:
        return result, None
    try:
        return result, json.loads(result.stdout)
    except ValueError:
        return result, None


def _describe(isolation: str, result: ExecutionResult, facts: dict, limits: SandboxLimits) -> dict:
    notes = result.notes.split()
    namespaced = isolation == "namespaces"
    host_root = os.geteuid() == 0
    report = {
        "isolation": isolation,
        "user_namespace": namespaced,
        "program_uid": facts["uid"] if not namespaced else (
            f"{limits.sandbox_uid} (distinct unprivileged user)" if host_root
            else "host user, as root of its own user namespace"),
        "capabilities": "none" if int(facts["capabilities_effective"], 16) == 0 else
                        facts["capabilities_effective"],
        "no_new_privs": facts["no_new_privs"],
        "network": ("isolated: own network namespace, interfaces " +
                    ",".join(facts["network_interfaces"]) + " (down)")
                   if namespaced and facts["network_interfaces"] == ["lo"] else "host network",
        "pid_namespace": namespaced and facts["pid"] == 2,
        "visible_processes": facts["visible_processes"],
        "writable_mounts": facts["writable_mounts"],
        "filesystem": ("read-only except the private working directory tmpfs and /dev/shm"
                       if namespaced and "root:read-only" in notes
                       else "host file system writable with the host user's permissions"),
        "hidden_paths": [n.split(":", 1)[1] for n in notes if n.startswith("hidden:")],
        "nested_user_namespaces": "blocked" if "nested_userns:blocked" in notes else "allowed",
        "environment": facts["env"],
        "rlimits": facts["rlimits"],
        "kill_whole_tree": ("PID namespace teardown + process group SIGKILL" if namespaced
                            else "process group SIGKILL + subreaper + token scan"),
        "wall_clock_timeout": "enforced by the host (SIGKILL)",
        "output_cap_bytes": limits.max_output_bytes,
    }
    return report


def resolve_isolation(limits: SandboxLimits) -> SandboxLimits:
    """Turn isolation="auto" into the strongest mode that works here (probed once per process)."""
    if limits.isolation != "auto":
        return limits
    key = _probe_key(limits)
    with _resolved_lock:
        if key not in _resolved_isolation:
            chosen = "rlimits"
            result, facts = _probe(limits, "namespaces")
            if facts is not None:
                chosen = "namespaces"
                _reports[key + (chosen,)] = _describe(chosen, result, facts, limits)
            else:
                logger.warning("sandbox: Linux namespaces unavailable (%s %s); falling back to "
                               "rlimits only: no network or file-system isolation",
                               result.status, (result.error or result.stderr[-300:]))
            _resolved_isolation[key] = chosen
    return dataclasses.replace(limits, isolation=_resolved_isolation[key])


_logged_keys: set[tuple] = set()


def log_protections_once(limits: SandboxLimits) -> None:
    """Log the active protections the first time code is scored with these limits."""
    key = (limits.isolation,) + _probe_key(limits)
    with _resolved_lock:
        if key in _logged_keys:
            return
        _logged_keys.add(key)
    sandbox_protections(limits, log=True)


def sandbox_protections(limits: SandboxLimits | None = None, *, log: bool = True) -> dict:
    """The protections active for `limits`, observed from inside a probe execution."""
    limits = (limits or SandboxLimits()).validate()
    resolved = resolve_isolation(limits)
    key = _probe_key(limits) + (resolved.isolation,)
    with _resolved_lock:
        report = _reports.get(key)
    if report is None:
        result, facts = _probe(resolved, resolved.isolation)
        if facts is None:
            raise RuntimeError(f"the sandbox cannot run programs ({result.status}): "
                               f"{result.error or result.stderr[-500:]!r}")
        report = _describe(resolved.isolation, result, facts, resolved)
        with _resolved_lock:
            _reports[key] = report
    if log:
        logger.info("sandbox protections: %s", json.dumps(report, sort_keys=True))
    return report

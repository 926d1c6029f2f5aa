"""Sandbox launcher: runs one untrusted program under the protections the host allows.

This file is executed as a standalone script (``python -I -S _launcher.py SPEC STATUS RESULT``)
by ``execute.py``; it must only import the standard library and must never be imported by the
library itself (it calls ``unshare``/``mount`` on the current process).

File descriptors given by the host:
  SPEC    a memfd holding the spec, a `marshal`-ed dict (files, argv, env, limits, isolation
          mode); marshal needs no import, and start-up time is paid on every execution.
  STATUS  a pipe the launcher writes protocol lines to: ``init <host pid of PID 1>``,
          ``ready <notes>``, ``exit <wait status>`` or ``error <message>``. The untrusted program
          never holds this descriptor.
  RESULT  a pipe handed to the program as descriptor 3 (the completion channel of the assert
          harness), or -1.

Process tree in "namespaces" mode:
  outer (host namespaces)       writes the uid/gid maps of the child's new user namespace
    -> holder (new user/mount/net/ipc/uts namespaces; its children get a new PID namespace)
      -> init (PID 1 of the new PID namespace): mounts, then supervises
        -> program (PID 2): rlimits, no capabilities, then exec
  When init exits the kernel kills every process left in the PID namespace, so nothing the
  program started (daemons included) can outlive the call. The host kills the whole tree by
  killing the outer process group, which contains outer, holder and init.
"""

import ctypes
import marshal
import os
import signal
import sys
import time

# Linux constants (stable kernel ABI).
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
SYS_MOUNT_SETATTR = 442  # same number on every architecture (new-style syscall table)
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# SECBIT_NOROOT | _LOCKED, SECBIT_NO_SETUID_FIXUP | _LOCKED, SECBIT_KEEP_CAPS_LOCKED,
# SECBIT_NO_CAP_AMBIENT_RAISE | _LOCKED: uid 0 never regains capabilities through execve.
SECUREBITS_LOCKED_DOWN = 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80
LINUX_CAPABILITY_VERSION_3 = 0x20080522

EXIT_SETUP_ERROR = 125

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _check(result, what):
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _encode(value):
    return None if value is None else os.fsencode(value)


def _mount(source, target, fstype, flags, data=None):
    _check(_libc.mount(_encode(source), _encode(target), _encode(fstype), flags, _encode(data)),
           f"mount {target}")


def _prctl(option, arg2=0, arg3=0, arg4=0, arg5=0):
    args = [ctypes.c_ulong(a) for a in (arg2, arg3, arg4, arg5)]
    return _check(_libc.prctl(option, *args), f"prctl {option}")


def _write_line(fd, text):
    if fd >= 0:
        try:
            os.write(fd, (text.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except OSError:
            pass


def _die_with_parent():
    # Die when the parent dies, so no part of the tree can be orphaned by a killed host.
    parent = os.getppid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(EXIT_SETUP_ERROR)


def _read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# ----------------------------------------------------------------------------------------------
# Mount namespace setup (runs as PID 1 of the new PID namespace, with capabilities in the new
# user namespace).

def _make_tree_read_only():
    attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
    result = _libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE,
                           ctypes.byref(attr), ctypes.sizeof(attr))
    if result == 0:
        return
    # Kernels before 5.12 lack mount_setattr: remount each mount read-only one by one.
    with open("/proc/self/mountinfo") as f:
        mount_points = [line.split()[4] for line in f]
    for mount_point in mount_points:
        mount_point = mount_point.encode().decode("unicode_escape")
        try:
            _mount(None, mount_point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
        except OSError:
            # Mounts with locked flags (nodev/noexec inherited) need those flags repeated.
            _mount(None, mount_point, None,
                   MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _mount_private_tmpfs(path, size_bytes, mode, keep_paths):
    """Replace `path` by an empty tmpfs; bind the `keep_paths` under it back in (e.g. the Python
    installation inside a hidden home directory)."""
    kept = [(keep, os.open(keep, os.O_PATH | os.O_DIRECTORY)) for keep in keep_paths
            if os.path.isdir(keep)]
    _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_bytes},mode={mode:o}")
    for keep, fd in kept:
        os.makedirs(keep, mode=0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", keep, None, MS_BIND | MS_REC)
        os.close(fd)


def _setup_mounts(spec, notes):
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    workdir = spec["workdir"]
    keep = spec.get("keep_paths", [])
    # A private /tmp (read-only once the tree is locked) holding the working directory.
    _mount_private_tmpfs("/tmp", 1 << 20, 0o755,
                         [k for k in keep if k.startswith("/tmp/")])
    os.makedirs(workdir, mode=0o755, exist_ok=True)
    for hidden in spec.get("hide_paths", []):
        if os.path.isdir(hidden) and hidden not in ("/", "/tmp"):
            _mount_private_tmpfs(hidden, 1 << 20, 0o755,
                                 [k for k in keep if k.startswith(hidden.rstrip("/") + "/")])
            notes.append(f"hidden:{hidden}")
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        notes.append("proc:private")
    except OSError as e:
        notes.append(f"proc:host({e.strerror})")
    try:
        # Forbid nested user namespaces: the program cannot regain capabilities anywhere.
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
        notes.append("nested_userns:blocked")
    except OSError:
        notes.append("nested_userns:allowed")
    _make_tree_read_only()
    notes.append("root:read-only")
    uid, gid = spec["sandbox_uid"], spec["sandbox_gid"]
    _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={spec['workdir_bytes']},mode=700,uid={uid},gid={gid}")
    if os.path.isdir("/dev/shm"):
        try:
            _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV,
                   f"size={spec['workdir_bytes']},mode=1777")
            notes.append("shm:private")
        except OSError:
            notes.append("shm:read-only")


def _write_files(spec):
    uid, gid = spec["sandbox_uid"], spec["sandbox_gid"]
    for name, content in spec["files"].items():
        path = os.path.join(spec["workdir"], name)
        if isinstance(content, str):
            content = content.encode("utf-8")
        with open(path, "wb") as f:
            f.write(content)
        os.chown(path, uid, gid)


# ----------------------------------------------------------------------------------------------
# Program process: limits, privileges, exec.

def _drop_all_capabilities():
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        _prctl(PR_CAPBSET_DROP, cap)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    _prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_DOWN)
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def _apply_rlimits(limits):
    import resource  # noqa: PLC0415 (imported late: only the program process needs it)
    for name, value in limits.items():
        which = getattr(resource, name)
        soft, hard = (value, value) if not isinstance(value, list) else value
        resource.setrlimit(which, (soft, hard))


def _become_program(spec, result_fd, exec_error_fd, switch_user):
    """In the forked child: never returns (execs the program or exits)."""
    import fcntl  # noqa: PLC0415
    channel = exec_error_fd
    try:
        # Park both channels above the low numbers first so the dup2s below cannot collide.
        error_high = fcntl.fcntl(exec_error_fd, fcntl.F_DUPFD, 64)
        if result_fd >= 0:
            result_high = fcntl.fcntl(result_fd, fcntl.F_DUPFD, 64)
        else:
            result_high = os.open("/dev/null", os.O_WRONLY)
        os.dup2(result_high, 3)  # descriptor 3: the completion channel (or /dev/null)
        os.dup2(error_high, 4, inheritable=False)  # closed by a successful exec
        channel = 4
        os.closerange(5, 2**31 - 1)  # status pipe, spec and everything else the host holds
        os.chdir(spec["workdir"])
        _apply_rlimits(spec["rlimits"])
        if switch_user:
            os.setgroups([])
            os.setresgid(spec["sandbox_gid"], spec["sandbox_gid"], spec["sandbox_gid"])
            os.setresuid(spec["sandbox_uid"], spec["sandbox_uid"], spec["sandbox_uid"])
        elif spec["isolation"] == "namespaces" or os.geteuid() == 0:
            # Inside the user namespace, or as root in the rlimits fallback: no capabilities.
            _drop_all_capabilities()
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.umask(0o077)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())  # execve keeps the signal mask
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except BaseException as e:  # noqa: BLE001 (report anything, then die)
        try:
            os.write(channel, f"{type(e).__name__}: {e}".encode("utf-8", "replace"))
        finally:
            os._exit(EXIT_SETUP_ERROR)


def _start_program(spec, result_fd, switch_user):
    """Fork the program; returns its pid once exec has succeeded, raises otherwise."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # see _wait_for
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _become_program(spec, result_fd, write_end, switch_user)
    os.close(write_end)
    message = _read_all(read_end)  # EOF without data: exec succeeded (close-on-exec)
    os.close(read_end)
    if message:
        os.waitpid(pid, 0)
        raise OSError(f"starting the program failed: {message.decode('utf-8', 'replace')}")
    return pid


def _wait_for(pid, wall_limit_s):
    """Reap every child (orphans are re-parented to us) until `pid` exits; its wait status, or
    None after `wall_limit_s` (a last resort: the host kills the tree long before).

    Waits on a blocked SIGCHLD instead of a SIGALRM handler: as PID 1 we would receive any
    signal we handle from the program itself, which could then end the supervisor early."""
    deadline = time.monotonic() + wall_limit_s
    while True:
        try:
            child, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return None
        if child == pid:
            return status
        if child == 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            signal.sigtimedwait({signal.SIGCHLD}, min(remaining, 1.0))


def _supervise(spec, status_fd, result_fd, switch_user, notes):
    pid = _start_program(spec, result_fd, switch_user)
    if result_fd >= 0:
        os.close(result_fd)
    _write_line(status_fd, "ready " + " ".join(notes))
    status = _wait_for(pid, spec["wall_limit_s"])
    _write_line(status_fd, f"exit {status}")


# ----------------------------------------------------------------------------------------------
# Modes.

def _run_init(spec, status_fd, result_fd, switch_user):
    """PID 1 of the new PID namespace."""
    try:
        _die_with_parent()
        notes = []
        _setup_mounts(spec, notes)
        _write_files(spec)
        try:
            os.sethostname("sandbox")
        except (OSError, AttributeError):
            pass
    except BaseException as e:  # noqa: BLE001
        _write_line(status_fd, f"error {type(e).__name__}: {e}")
        os._exit(EXIT_SETUP_ERROR)
    try:
        _supervise(spec, status_fd, result_fd, switch_user, notes)
    except BaseException as e:  # noqa: BLE001
        _write_line(status_fd, f"error {type(e).__name__}: {e}")
        os._exit(EXIT_SETUP_ERROR)
    os._exit(0)  # the kernel now kills whatever the program left behind in this namespace


def _write_id_maps(pid, host_uid, host_gid, sandbox_uid, sandbox_gid):
    """Root maps the sandbox id through unchanged (a distinct, unprivileged user); an ordinary
    user can only map itself (to root inside, which then loses every capability)."""
    if host_uid == 0:
        uid_map = f"0 0 1\n{sandbox_uid} {sandbox_uid} 1\n"
        gid_map = f"0 0 1\n{sandbox_gid} {sandbox_gid} 1\n"
    else:
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
        uid_map, gid_map = f"0 {host_uid} 1\n", f"0 {host_gid} 1\n"
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(uid_map)
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(gid_map)


def _run_namespaced(spec, status_fd, result_fd):
    host_uid, host_gid = os.geteuid(), os.getegid()
    switch_user = host_uid == 0
    if not switch_user:
        spec["sandbox_uid"] = spec["sandbox_gid"] = 0  # ourselves, as seen inside
    to_holder_r, to_holder_w = os.pipe()
    to_outer_r, to_outer_w = os.pipe()
    holder = os.fork()
    if holder == 0:
        os.close(to_holder_w)
        os.close(to_outer_r)
        try:
            _die_with_parent()
            flags = (CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
                     | CLONE_NEWPID)
            _check(_libc.unshare(flags), "unshare")
            os.write(to_outer_w, b"u")
            if os.read(to_holder_r, 1) != b"m":
                os._exit(EXIT_SETUP_ERROR)
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        except BaseException as e:  # noqa: BLE001
            _write_line(status_fd, f"error {type(e).__name__}: {e}")
            os._exit(EXIT_SETUP_ERROR)
        init = os.fork()
        if init == 0:
            _run_init(spec, status_fd, result_fd, switch_user)
        # Its pid as the host sees it: the host waits for it to be gone (which means the whole
        # PID namespace is gone) before it reports a killed execution as finished.
        _write_line(status_fd, f"init {init}")
        _, status = os.waitpid(init, 0)
        os._exit(0)
    os.close(to_holder_r)
    os.close(to_outer_w)
    if os.read(to_outer_r, 1) != b"u":
        os.waitpid(holder, 0)
        os._exit(EXIT_SETUP_ERROR)  # the holder has reported its error already
    try:
        _write_id_maps(holder, host_uid, host_gid, spec["sandbox_uid"], spec["sandbox_gid"])
    except OSError as e:
        _write_line(status_fd, f"error writing id maps: {e}")
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
        os._exit(EXIT_SETUP_ERROR)
    os.write(to_holder_w, b"m")
    os.waitpid(holder, 0)
    os._exit(0)


def _kill_descendants():
    """Kill and reap everything re-parented to us (we are a child subreaper)."""
    me = os.getpid()
    for _ in range(100):
        children = set()
        try:
            for task in os.listdir(f"/proc/{me}/task"):
                with open(f"/proc/{me}/task/{task}/children") as f:
                    children.update(int(p) for p in f.read().split())
        except OSError:
            pass
        if not children:
            return
        for child in children:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _child in children:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break


def _run_rlimited(spec, status_fd, result_fd):
    """Fallback without namespaces: rlimits, a scrubbed environment, a private directory and a
    subreaper that kills every descendant when the program ends."""
    try:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        _write_files(dict(spec, sandbox_uid=os.getuid(), sandbox_gid=os.getgid()))
        pid = _start_program(spec, result_fd, switch_user=False)
        if result_fd >= 0:
            os.close(result_fd)
        _write_line(status_fd, "ready rlimits-only")
        status = _wait_for(pid, spec["wall_limit_s"])
        _kill_descendants()
        _write_line(status_fd, f"exit {status}")
    except BaseException as e:  # noqa: BLE001
        _write_line(status_fd, f"error {type(e).__name__}: {e}")
        _kill_descendants()
        os._exit(EXIT_SETUP_ERROR)
    os._exit(0)


def main(argv):
    spec_fd, status_fd, result_fd = (int(a) for a in argv[1:4])
    spec = marshal.loads(_read_all(spec_fd))
    os.close(spec_fd)
    try:
        _die_with_parent()
    except OSError as e:
        _write_line(status_fd, f"error {e}")
        os._exit(EXIT_SETUP_ERROR)
    if spec["isolation"] == "namespaces":
        _run_namespaced(spec, status_fd, result_fd)
    else:
        _run_rlimited(spec, status_fd, result_fd)


if __name__ == "__main__":
    main(sys.argv)

"""The assert harness's entry: fork the program process, protect the judge, run the tests, and
write the token once their last line ran (see the package docstring)."""

import os
import sys

from .judge import Judge, fail
from .program import run_program_process
from .wire import Pipe


def make_undumpable():
    """prctl(PR_SET_DUMPABLE, 0): processes of the same user can no longer trace this one,
    read its memory or open its descriptors through /proc."""
    import ctypes  # noqa: PLC0415

    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:
        fail("prctl(PR_SET_DUMPABLE) failed; the judge cannot be protected")


def take(name):
    """The text of a file of the working directory, which is deleted."""
    with open(name, "rb") as f:
        data = f.read()
    os.unlink(name)
    return data.decode("utf-8")


def end_with_program(program_pid):
    """Fail as soon as the program process ends. Waiting for the channel to close is not enough:
    processes the program started hold its end open, and the judge would keep them alive."""
    import signal  # noqa: PLC0415

    def on_child_exit(signum, frame):
        try:
            ended = os.waitpid(program_pid, os.WNOHANG)[0] == program_pid
        except ChildProcessError:
            ended = True
        if ended:
            fail("the program process ended")

    signal.signal(signal.SIGCHLD, on_child_exit)
    on_child_exit(signal.SIGCHLD, None)  # in case it ended before the handler was installed


def main():
    source = take("solution.py")
    to_program, to_judge = os.pipe(), os.pipe()
    program_pid = os.fork()
    if program_pid == 0:
        os.close(to_program[1])
        os.close(to_judge[0])
        run_program_process(source, Pipe(to_program[0], to_judge[1]))
    os.close(to_program[0])
    os.close(to_judge[1])
    end_with_program(program_pid)
    make_undumpable()
    # Read and deleted only now: the forked program never had them in memory, and it starts
    # (the "run" request) only once they are gone from the disk.
    token = take("token").encode()
    stages = [("tests.py", take("tests.py"))]
    has_entry_point = os.path.exists("check.py")
    if has_entry_point:
        stages.append(("check.py", take("check.py")))
    judge = Judge(Pipe(to_judge[0], to_program[1]))
    namespace = judge.program_namespace(has_entry_point)
    for filename, test_source in stages:
        exec(compile(test_source, filename, "exec"), namespace)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(3, token)
    os._exit(0)


if __name__ == "__main__":
    main()

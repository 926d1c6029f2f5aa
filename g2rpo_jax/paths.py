"""Where a relative path was looked for: configs and flags name paths relative to the working
directory, so a command started from another folder misses them with no clue why."""

from __future__ import annotations

import os


def relative_hint(path: str) -> str:
    """'' for an absolute path; else ' (relative to the working directory D: run from ... or give
    an absolute path)', to append to a message about `path`."""
    if os.path.isabs(os.path.expanduser(str(path))):
        return ""
    return (f" (looked for relative to the working directory {os.getcwd()}: run from the folder the path is "
            "relative to, e.g. the repository root, or give an absolute path)")

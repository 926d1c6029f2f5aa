"""Finding host processes by a token in their command line (for sandbox clean-up tests)."""

import os


def processes_with(token: str) -> list[int]:
    """Host processes whose command line contains `token`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found

"""The channel between the judge and the program process: length-prefixed marshal messages,
exceptions as (builtin class name, message), and strict type checks on what arrives."""

import builtins
import marshal
import os

MAX_CHUNK = 1024  # items one iteration request may fetch (the first fetches one, then doubling)
MAX_MESSAGE_CHARS = 2000  # of an exception message


def expect(value, *kinds):
    """`value` if its exact type is one of `kinds`, else TypeError."""
    if type(value) not in kinds:
        expected = "/".join(kind.__name__ for kind in kinds)
        raise TypeError(f"expected {expected}, got {type(value).__name__}")
    return value


class Pipe:
    """Length-prefixed marshal messages over a pair of descriptors."""

    def __init__(self, read_fd, write_fd):
        self.read_fd, self.write_fd = read_fd, write_fd

    def send(self, message):
        data = marshal.dumps(message)
        view = memoryview(len(data).to_bytes(8, "little") + data)
        while view:
            view = view[os.write(self.write_fd, view):]

    def receive(self):
        """The next message; EOFError once the other process is gone."""
        size = int.from_bytes(self._read(8), "little")
        return marshal.loads(self._read(size))

    def _read(self, size):
        data = bytearray()
        while len(data) < size:
            chunk = os.read(self.read_fd, min(size - len(data), 1 << 20))
            if not chunk:
                raise EOFError("the other process closed the channel")
            data += chunk
        return bytes(data)


def error_reply(error):
    """("error", name, message): the exception as its first builtin class (what the tests'
    `except` clauses name), with its message."""
    name = next(cls.__name__ for cls in type(error).__mro__
                if getattr(builtins, cls.__name__, None) is cls)
    try:
        message = str(error)[:MAX_MESSAGE_CHARS]
    except Exception:  # noqa: BLE001 (the program's __str__ may raise)
        message = ""
    return ("error", name, message)


def rebuild_error(name, message):
    """The builtin exception `error_reply` named, or None when the name is not an Exception
    class of `builtins` (exits, interrupts and anything else are not sent)."""
    cls = getattr(builtins, name, None) if type(name) is str else None
    if not (isinstance(cls, type) and issubclass(cls, Exception)) or type(message) is not str:
        return None
    for base in cls.__mro__:  # some classes (UnicodeDecodeError) need more than a message
        try:
            return base(message)
        except TypeError:
            continue
    return None

"""Values <-> plain data (`Codec`), and one end of the request/reply channel (`Side`)."""

from .values import (named_node, rebuild_standard_value, standard_class, standard_module,
                     standard_value)
from .wire import expect

MAX_DEPTH = 200  # nesting of a value that can cross (deeper values are refused by the sender)
SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes, type(...)})
CONTAINER_TAGS = {list: "list", tuple: "tuple", set: "set", frozenset: "frozenset"}
CONTAINER_TYPES = {tag: kind for kind, tag in CONTAINER_TAGS.items()}
# Subclasses of these cross as their base value (an int subclass as its int): the tests compare
# the data, never the subclass's methods.
PLAIN_BASES = (int, float, complex, str, bytes, list, tuple, dict, set, frozenset)
# Arguments whose changes by the program are copied back into the tests' objects after a call
# (a function that sorts its argument in place).
MUTABLE_ARGUMENTS = (list, dict, set, bytearray)


class Codec:
    """Values <-> plain data. A node is a scalar (None, bool, int, float, complex, str, bytes,
    Ellipsis) or a tuple starting with a tag:
      ("list" | "tuple" | "set" | "frozenset", [nodes])    ("dict", [key, value, key, ...])
      ("value", kind, args node)   a standard-library value type (see `standard_value`)
      ("named", module, qualname)  a standard-library class      ("module", name)
      ("ref", "program" | "judge", index)   an object that stays in the process owning it
    A side decides how its own objects and the other side's references are sent and resolved
    (`encode_own`, `reference`, `resolve_reference`)."""

    def encode(self, value, depth=0):
        kind = type(value)
        if kind in SCALARS:
            return value
        if depth >= MAX_DEPTH:
            raise ValueError(f"a value nested more than {MAX_DEPTH} levels deep cannot be sent")
        if kind is dict:
            return ("dict", [self.encode(x, depth + 1) for item in value.items() for x in item])
        if kind in CONTAINER_TAGS:
            return (CONTAINER_TAGS[kind], [self.encode(item, depth + 1) for item in value])
        node = self.encode_own(value)
        if node is not None:
            return node
        described = standard_value(value)
        if described is not None:
            return ("value", described[0], self.encode(described[1], depth + 1))
        for base in PLAIN_BASES:
            if isinstance(value, base):
                return self.encode(base(value), depth)
        return named_node(value) or self.reference(value)

    def decode(self, node, depth=0):
        if type(node) in SCALARS:
            return node
        if type(node) is not tuple or len(node) < 2 or depth >= MAX_DEPTH:
            raise ValueError("malformed value")
        tag = node[0]
        if (tag in CONTAINER_TYPES or tag == "dict") and len(node) == 2:
            items = [self.decode(item, depth + 1) for item in expect(node[1], list)]
            if tag != "dict":
                return CONTAINER_TYPES[tag](items)
            if len(items) % 2:
                raise ValueError("malformed dict")
            return dict(zip(items[0::2], items[1::2]))
        if tag == "value" and len(node) == 3:
            return rebuild_standard_value(node[1], self.decode(node[2], depth + 1))
        if tag == "named" and len(node) == 3:
            return standard_class(node[1], node[2])
        if tag == "module" and len(node) == 2:
            return standard_module(node[1])
        if tag == "ref" and len(node) == 3 and type(node[2]) is int and node[2] >= 0:
            return self.resolve_reference(node[1], node[2])
        raise ValueError(f"malformed value (tag {tag!r})")

    # The three hooks below are abstract: `Judge` and `ProgramSide` each implement them for
    # their own end of the pipe.
    def encode_own(self, value):
        """A node for the other side's proxies and stubs held here; None for other values."""
        raise NotImplementedError

    def reference(self, value):
        """A ("ref", owner, index) node for a value of this side that must not be copied."""
        raise NotImplementedError

    def resolve_reference(self, owner, index):
        """The value a ("ref", owner, index) node stands for on this side."""
        raise NotImplementedError


class Side(Codec):
    """One end of the channel. While it waits for the reply to its request it serves the other
    side's requests: a call may call back (a lambda the tests passed), and that may call in."""

    def __init__(self, pipe):
        self.pipe = pipe

    def request(self, *message):
        """Send a request; the reply's payload (a node, not decoded)."""
        self.pipe.send(message)
        while True:
            reply = self.receive()
            if reply[0] == "ok" and len(reply) == 2:
                return reply[1]
            if reply[0] == "error" and len(reply) == 3:
                raise self.error_from(reply[1], reply[2])
            self.serve(reply)

    # Abstract, implemented by `Judge` and `ProgramSide`.
    def receive(self):
        """The next message from the other side."""
        raise NotImplementedError

    def serve(self, message):
        """Answers a request the other side made while this side waits for its own reply."""
        raise NotImplementedError

    def error_from(self, name, message):
        """The exception to raise here for an error the other side reported."""
        raise NotImplementedError

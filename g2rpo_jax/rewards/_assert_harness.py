"""Assert-test harness, run inside the sandbox as ``python -I -S -B harness.py``.

A standalone script (standard library only, Python 3.10+). The library ships it into the
sandbox (compiled, when the sandbox runs the host's interpreter) and never imports it; tests
import it for its pure helpers (nothing runs at import).

Files in the working directory: solution.py (the program), tests.py (test code), check.py
(``check(<entry point>)``, HumanEval style; absent for MBPP style) and token. Descriptor 3 is
the completion channel: the token is written there once the last test line ran, so leaving early
or crashing earns nothing.

Two processes, so that nothing the tests decide runs program code:

  judge    this process. Runs the tests, holds the token, never executes program code, and is
           made non-dumpable: a process of the same user (the program) can then neither trace
           it, read its memory nor open its descriptors through /proc.
  program  forked from the judge before the token and the tests are read (so its memory holds
           neither) and told to start only once they are deleted. It runs solution.py, then
           answers the judge's requests over a pair of pipes: call this, get that attribute,
           iterate, convert to str, ...

What crosses the pipes is plain data (see `Codec`): builtin scalars and containers, a few
standard-library value types (Fraction, Counter, namedtuple, ...), named standard-library
classes, and references to objects that stay in the other process. The receiver rebuilds values
with its own classes, so every value the tests see is either built by the judge or a
`RemoteObject`, whose equality, ordering, hashing and membership are decided in the judge on
plain data. An object whose ``__eq__`` always says True, an int subclass, a callable instance or
a function made by ``exec``: whatever the program hands over, what it controls is what any
function controls, the plain values it returns.
"""

import builtins
import marshal
import os
import sys

MAX_DEPTH = 200  # nesting of a value that can cross (deeper values are refused by the sender)
MAX_CHUNK = 1024  # items one iteration request may fetch (the first fetches one, then doubling)
MAX_MESSAGE_CHARS = 2000  # of an exception message
SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes, type(...)})
FUNCTION = type(lambda: None)
CONTAINER_TAGS = {list: "list", tuple: "tuple", set: "set", frozenset: "frozenset"}
CONTAINER_TYPES = {tag: kind for kind, tag in CONTAINER_TAGS.items()}
# Subclasses of these cross as their base value (an int subclass as its int): the tests compare
# the data, never the subclass's methods.
PLAIN_BASES = (int, float, complex, str, bytes, list, tuple, dict, set, frozenset)
# Arguments whose changes by the program are copied back into the tests' objects after a call
# (a function that sorts its argument in place).
MUTABLE_ARGUMENTS = (list, dict, set, bytearray)
DICT_VIEWS = {type({}.keys()): "keys", type({}.items()): "items", type({}.values()): "values"}
# Standard-library value types the receiver rebuilds itself; checked in this order (datetime
# before date, its base). A type counts only once its module is loaded.
STANDARD_CLASSES = (("fractions", "Fraction"), ("decimal", "Decimal"), ("collections", "Counter"),
                    ("collections", "OrderedDict"), ("collections", "defaultdict"),
                    ("collections", "deque"), ("datetime", "datetime"), ("datetime", "date"),
                    ("datetime", "time"), ("datetime", "timedelta"))
UNARY_OPERATIONS = ("len", "bool", "str", "repr", "iter", "int", "float", "index", "abs", "neg")


def fail(reason):
    """Judge only: the program broke the protocol or died. Exit without the token; nothing in
    the tests can catch this."""
    try:
        os.write(2, f"\nharness: {reason}\n".encode("utf-8", "replace"))
    finally:
        os._exit(1)


def expect(value, *kinds):
    """`value` if its exact type is one of `kinds`, else TypeError."""
    if type(value) not in kinds:
        expected = "/".join(kind.__name__ for kind in kinds)
        raise TypeError(f"expected {expected}, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------------------------
# Messages.

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


# ----------------------------------------------------------------------------------------------
# Values.

def is_standard_module(name):
    return type(name) is str and name.partition(".")[0] in sys.stdlib_module_names


def standard_module(name):
    if not is_standard_module(name):
        raise ValueError(f"{name!r} is not a standard-library module")
    __import__(name)
    return sys.modules[name]


def standard_class(module_name, qualname):
    """The class `module.qualname` of the standard library (or builtins)."""
    value = standard_module(module_name)
    for part in expect(qualname, str).split("."):
        value = getattr(value, part)
    if not isinstance(value, type):
        raise TypeError(f"{module_name}.{qualname} is not a class")
    return value


def named_node(value):
    """("named", module, qualname) for a standard-library class, ("module", name) for a
    standard-library module; None for anything else."""
    if isinstance(value, type(sys)):
        name = getattr(value, "__name__", None)
        is_standard = is_standard_module(name) and sys.modules.get(name) is value
        return ("module", name) if is_standard else None
    if isinstance(value, type):
        module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
        try:
            if standard_class(module, qualname) is value:
                return ("named", module, qualname)
        except Exception:  # noqa: BLE001 (not importable by that name: not a standard class)
            return None
    return None


def standard_value(value):
    """(kind, args) for a value of a standard-library value type, rebuilt by the receiver with
    its own class (see `rebuild_standard_value`); None for anything else."""
    kind = type(value)
    if isinstance(value, tuple) and isinstance(getattr(kind, "_fields", None), tuple):
        return "namedtuple", (kind.__name__, tuple(kind._fields), tuple(value))
    if isinstance(value, bytearray):
        return "bytearray", (bytes(value),)
    if kind is range:
        return "range", (value.start, value.stop, value.step)
    if kind in DICT_VIEWS:
        return DICT_VIEWS[kind], (list(value),)
    for module_name, class_name in STANDARD_CLASSES:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is not None and isinstance(value, cls):
            args = _standard_args(class_name, value)
            return None if args is None else (class_name, args)
    return None


def _standard_args(class_name, value):
    if class_name == "Fraction":
        return value.numerator, value.denominator
    if class_name == "Decimal":
        return (str(value),)
    if class_name in ("Counter", "OrderedDict"):
        return (dict(value),)
    if class_name == "defaultdict":
        return value.default_factory, dict(value)
    if class_name == "deque":
        return list(value), value.maxlen
    if class_name == "timedelta":
        return value.days, value.seconds, value.microseconds
    # date, time, datetime: naive ones only (a time zone is an object of its own).
    return (value.isoformat(),) if getattr(value, "tzinfo", None) is None else None


_namedtuple_classes = {}


def rebuild_standard_value(kind, args):
    """The value `standard_value` described, built with this process's own classes; raises on
    arguments of the wrong type (only a broken or hostile sender sends them)."""
    import collections  # noqa: PLC0415 (loaded on first use: most programs never need it)

    args = expect(args, tuple)
    if kind == "namedtuple":
        name, fields, items = args
        key = (expect(name, str), tuple(expect(f, str) for f in expect(fields, tuple)))
        if key not in _namedtuple_classes:
            _namedtuple_classes[key] = collections.namedtuple(*key, rename=True)
        return _namedtuple_classes[key](*expect(items, tuple))
    if kind == "bytearray":
        return bytearray(expect(args[0], bytes))
    if kind == "range":
        return range(*(expect(a, int) for a in args))
    if kind == "keys":
        return dict.fromkeys(expect(args[0], list)).keys()
    if kind == "items":
        return dict(expect(pair, tuple) for pair in expect(args[0], list)).items()
    if kind == "values":
        return dict(enumerate(expect(args[0], list))).values()
    if kind == "Fraction":
        return standard_module("fractions").Fraction(*(expect(a, int) for a in args))
    if kind == "Decimal":
        return standard_module("decimal").Decimal(expect(args[0], str))
    if kind in ("Counter", "OrderedDict"):
        return getattr(collections, kind)(expect(args[0], dict))
    if kind == "defaultdict":
        factory, items = args
        return collections.defaultdict(factory, expect(items, dict))
    if kind == "deque":
        items, maxlen = args
        return collections.deque(expect(items, list), expect(maxlen, int, type(None)))
    if kind == "timedelta":
        return standard_module("datetime").timedelta(*(expect(a, int) for a in args))
    if kind in ("datetime", "date", "time"):
        return getattr(standard_module("datetime"), kind).fromisoformat(expect(args[0], str))
    raise ValueError(f"unknown value kind {kind!r}")


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


# ----------------------------------------------------------------------------------------------
# The program process.

class JudgeObject:
    """A value of the tests that the program was handed and that stays in the judge (a lambda,
    an instance of a class of the tests): calling it runs it there."""

    __slots__ = ("side", "index")

    def __init__(self, side, index):
        self.side, self.index = side, index

    def __call__(self, *args, **kwargs):
        side = self.side
        return side.decode(side.request("call", self.index, side.encode(list(args)),
                                        side.encode(kwargs)))


class _Exit:
    """`exit` / `quit`, which `-S` leaves out (`site` defines them)."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"Use {self.name}() to exit"

    def __call__(self, code=None):
        raise SystemExit(code)


class ProgramSide(Side):
    """Runs the program and answers the judge. Everything here is within the program's reach,
    and nothing here needs to be trusted: the judge checks whatever arrives."""

    def __init__(self, pipe, source):
        super().__init__(pipe)
        self.source = source
        self.objects, self.indices = [], {}  # objects the judge holds references to
        self.stubs = {}  # index -> JudgeObject
        self.pending_errors = {}  # index -> error to raise at the next `next` request

    def serve_forever(self):
        while True:
            self.serve(self.receive())

    def receive(self):
        try:
            return self.pipe.receive()
        except EOFError:  # the judge is done (or gone)
            os._exit(0)

    def serve(self, message):
        try:
            reply = ("ok", self.answer(*message))
        except Exception as error:  # noqa: BLE001 (reported to the judge; exits propagate)
            reply = error_reply(error)
        self.pipe.send(reply)

    def error_from(self, name, message):
        return rebuild_error(name, message) or RuntimeError(message)

    def encode_own(self, value):
        return ("ref", "judge", value.index) if type(value) is JudgeObject else None

    def reference(self, value):
        index = self.indices.get(id(value))
        if index is None:
            index = self.indices[id(value)] = len(self.objects)
            self.objects.append(value)
        return ("ref", "program", index)

    def resolve_reference(self, owner, index):
        if owner == "program":
            return self.objects[index]
        if owner != "judge":
            raise ValueError(f"unknown owner {owner!r}")
        if index not in self.stubs:
            self.stubs[index] = JudgeObject(self, index)
        return self.stubs[index]

    def answer(self, operation, *args):
        if operation == "run":
            return self.run_program()
        target, *arguments = args
        value = self.objects[target]
        if operation == "call":
            return self.call(value, *arguments)
        arguments = [self.decode(argument) for argument in arguments]
        if operation == "getattr":
            return self.encode(getattr(value, *arguments))
        if operation == "setattr":
            return setattr(value, *arguments)
        if operation == "delattr":
            return delattr(value, *arguments)
        if operation == "getitem":
            return self.encode(value[arguments[0]])
        if operation == "setitem":
            value[arguments[0]] = arguments[1]
            return None
        if operation == "delitem":
            del value[arguments[0]]
            return None
        if operation == "unary" and arguments[0] in UNARY_OPERATIONS:
            return self.encode(self.unary(arguments[0], value))
        if operation == "format":
            return self.encode(format(value, *arguments))
        if operation == "next":
            return self.encode(self.next_items(target, value, *arguments))
        if operation == "type":
            return self.reference(type(value))[2]
        if operation == "fields":
            return self.encode((self.reference(type(value))[2], object_fields(value)))
        raise ValueError(f"unknown operation {operation!r}")

    def run_program(self):
        module = type(sys)("solution")
        module.__file__ = os.path.abspath("solution.py")
        module.__builtins__ = builtins
        sys.modules["solution"] = module
        exec(compile(self.source, "solution.py", "exec"), module.__dict__)
        names = []
        for name, value in list(vars(module).items()):
            if name.startswith("__") and name.endswith("__"):
                continue
            try:
                names.append(("tuple", [name, self.encode(value), type(value) is FUNCTION]))
            except Exception:  # noqa: BLE001 (a global that cannot cross is left out)
                continue
        return ("list", names)

    def call(self, function, args_node, kwargs_node):
        """(result node, [(argument position or name, its new value node)]) for the arguments
        the call changed."""
        args, kwargs = self.decode(args_node), self.decode(kwargs_node)
        result = self.encode(function(*args, **kwargs))
        sent = list(enumerate(args_node[1])) + list(zip(kwargs_node[1][0::2], kwargs_node[1][1::2]))
        received = list(enumerate(args)) + list(kwargs.items())
        changed = []
        for (key, node), (_, value) in zip(sent, received):
            if type(value) in MUTABLE_ARGUMENTS:
                new_node = self.encode(value)
                if new_node != node:
                    changed.append((key, new_node))
        return result, changed

    @staticmethod
    def unary(name, value):
        if name in ("index", "neg"):
            import operator  # noqa: PLC0415

            return getattr(operator, name)(value)
        return getattr(builtins, name)(value)

    def next_items(self, index, iterator, count):
        """Up to `count` items; an error after the first item is kept for the next request."""
        if index in self.pending_errors:
            raise self.pending_errors.pop(index)
        items = []
        for _ in range(min(expect(count, int), MAX_CHUNK)):
            try:
                items.append(next(iterator))
            except Exception as error:  # noqa: BLE001 (StopIteration included)
                if not items:
                    raise
                self.pending_errors[index] = error
                break
        return items


def object_fields(value):
    """The fields equality compares: a dataclass's compared fields, else the instance's
    __dict__ and slots; None for an object without any (compared by identity)."""
    kind = type(value)
    if isinstance(getattr(kind, "__dataclass_fields__", None), dict):
        import dataclasses  # noqa: PLC0415

        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.compare}
    fields = dict(vars(value)) if isinstance(getattr(value, "__dict__", None), dict) else {}
    for cls in kind.__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for slot in [slots] if isinstance(slots, str) else slots:
            if slot not in ("__dict__", "__weakref__") and hasattr(value, slot):
                fields[slot] = getattr(value, slot)
    return fields or None


# ----------------------------------------------------------------------------------------------
# The judge process.

class RemoteObject:
    """An object of the program, seen from the tests.

    Attributes, calls, items, iteration and the unary conversions (len, bool, str, repr,
    format, int, float, index, abs, neg) are answered by the program: each yields plain data,
    as a function's result would, and none shows the program a value of the tests to compare
    against. Equality, ordering, hashing and `in` are decided here: two references are equal
    when they are the same object, or objects of the same class with equal fields (dataclass
    semantics); a reference never equals a value built by the tests.
    """

    __slots__ = ("__judge", "__id", "__pending", "__chunk")

    def __init__(self, judge, remote_id):
        object.__setattr__(self, "_RemoteObject__judge", judge)
        object.__setattr__(self, "_RemoteObject__id", remote_id)
        object.__setattr__(self, "_RemoteObject__pending", [])  # fetched items, last first
        object.__setattr__(self, "_RemoteObject__chunk", 1)

    def __ask(self, operation, *args):
        return self.__judge.ask(operation, self.__id, *args)

    def __getattr__(self, name):
        if name.startswith("_RemoteObject__"):  # a copy made without __init__
            raise AttributeError(name)
        return self.__ask("getattr", name)

    def __setattr__(self, name, value):
        self.__ask("setattr", name, value)

    def __delattr__(self, name):
        self.__ask("delattr", name)

    def __call__(self, *args, **kwargs):
        return self.__judge.call(self.__id, args, kwargs)

    def __getitem__(self, key):
        return self.__ask("getitem", key)

    def __setitem__(self, key, value):
        self.__ask("setitem", key, value)

    def __delitem__(self, key):
        self.__ask("delitem", key)

    def __len__(self):
        return self.__ask("unary", "len")

    def __bool__(self):
        return self.__ask("unary", "bool")

    def __str__(self):
        return self.__ask("unary", "str")

    def __repr__(self):
        return self.__ask("unary", "repr")

    def __format__(self, spec):
        return self.__ask("format", spec)

    def __int__(self):
        return self.__ask("unary", "int")

    def __float__(self):
        return self.__ask("unary", "float")

    def __index__(self):
        return self.__ask("unary", "index")

    def __abs__(self):
        return self.__ask("unary", "abs")

    def __neg__(self):
        return self.__ask("unary", "neg")

    def __iter__(self):
        return self.__ask("unary", "iter")

    def __next__(self):
        pending = self.__pending
        if not pending:
            items = self.__ask("next", self.__chunk)
            if type(items) is not list or not items:
                fail("an iteration request returned no items")
            object.__setattr__(self, "_RemoteObject__chunk", min(2 * self.__chunk, MAX_CHUNK))
            pending.extend(reversed(items))
        return pending.pop()

    def __contains__(self, item):
        return any(value is item or value == item for value in self)

    def __eq__(self, other):
        if self is other:
            return True
        if type(other) is not RemoteObject:
            return NotImplemented
        mine, theirs = self.__judge.fields_of(self.__id), self.__judge.fields_of(other.__id)
        return mine[1] is not None and mine == theirs

    def __ne__(self, other):
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self):
        return hash(("RemoteObject", self.__ask("type")))

    def __order(self, other, compare):
        if type(other) is not RemoteObject:
            return NotImplemented
        mine, theirs = self.__judge.fields_of(self.__id), self.__judge.fields_of(other.__id)
        if mine[0] != theirs[0] or mine[1] is None or theirs[1] is None:
            return NotImplemented
        return compare(list(mine[1].values()), list(theirs[1].values()))

    def __lt__(self, other):
        return self.__order(other, list.__lt__)

    def __le__(self, other):
        return self.__order(other, list.__le__)

    def __gt__(self, other):
        return self.__order(other, list.__gt__)

    def __ge__(self, other):
        return self.__order(other, list.__ge__)


class Judge(Side):
    """Runs the tests against the program process; trusts nothing it receives."""

    def __init__(self, pipe):
        super().__init__(pipe)
        self.proxies = {}  # program object index -> RemoteObject
        self.exported, self.export_indices = [], {}  # values of the tests the program holds

    def receive(self):
        try:
            message = self.pipe.receive()
        except Exception as error:  # noqa: BLE001 (EOF, or bytes that are no message)
            fail(f"the program process ended or sent garbage ({type(error).__name__})")
        if type(message) is not tuple or not message or type(message[0]) is not str:
            fail("malformed message")
        return message

    def serve(self, message):
        """The program calls a value of the tests it was handed (nothing else is served)."""
        try:
            operation, index, args_node, kwargs_node = message
            if operation != "call" or type(index) is not int or index < 0:
                raise ValueError(f"unexpected request {operation!r}")
            function = self.exported[index]
            args, kwargs = self.decode(args_node), self.decode(kwargs_node)
            expect(args, list)
            if not all(type(key) is str for key in expect(kwargs, dict)):
                raise TypeError("keyword names must be strings")
        except Exception as error:  # noqa: BLE001
            fail(f"malformed request from the program: {error}")
        try:
            reply = ("ok", self.encode(function(*args, **kwargs)))
        except Exception as error:  # noqa: BLE001 (reported to the program, as a call would)
            reply = error_reply(error)
        self.pipe.send(reply)

    def error_from(self, name, message):
        return rebuild_error(name, message) or fail(f"the program sent an exception {name!r}")

    def encode_own(self, value):
        if type(value) is RemoteObject:
            return ("ref", "program", value._RemoteObject__id)
        return None

    def reference(self, value):
        index = self.export_indices.get(id(value))
        if index is None:
            index = self.export_indices[id(value)] = len(self.exported)
            self.exported.append(value)
        return ("ref", "judge", index)

    def resolve_reference(self, owner, index):
        if owner == "judge":
            return self.exported[index]
        if owner != "program":
            raise ValueError(f"unknown owner {owner!r}")
        if index not in self.proxies:
            self.proxies[index] = RemoteObject(self, index)
        return self.proxies[index]

    def decode_reply(self, node):
        try:
            return self.decode(node)
        except Exception as error:  # noqa: BLE001
            fail(f"the program sent a malformed value: {type(error).__name__}: {error}")

    def ask(self, operation, remote_id, *args):
        return self.decode_reply(self.request(operation, remote_id,
                                              *[self.encode(arg) for arg in args]))

    def call(self, remote_id, args, kwargs):
        payload = self.request("call", remote_id, self.encode(list(args)), self.encode(kwargs))
        try:
            result_node, changes = payload
            result = self.decode(result_node)
            for key, node in expect(changes, list):
                target = args[key] if type(key) is int else kwargs[expect(key, str)]
                replace_contents(target, self.decode(node))
        except Exception as error:  # noqa: BLE001
            fail(f"the program sent a malformed call result: {type(error).__name__}: {error}")
        return result

    def fields_of(self, remote_id):
        """(class index, fields dict or None) of a program object."""
        fields = self.ask("fields", remote_id)
        if not (type(fields) is tuple and len(fields) == 2 and type(fields[0]) is int
                and type(fields[1]) in (dict, type(None))):
            fail("malformed fields")
        return fields

    def program_namespace(self, has_entry_point):
        """Run the program; the tests' namespace with its names. Where the tests name an entry
        point (HumanEval) a program name shadowing a builtin is left out, so the tests' `abs` or
        `set` stay the builtins; without one (MBPP) a function may shadow one, since the task
        may ask for a function called `sum`."""
        names = self.decode_reply(self.request("run"))
        namespace = {"__name__": "tests", "__builtins__": builtins}
        for entry in expect(names, list):
            if not (type(entry) is tuple and len(entry) == 3 and type(entry[0]) is str
                    and type(entry[2]) is bool):
                fail("malformed program names")
            name, value, is_function = entry
            if not hasattr(builtins, name) or (is_function and not has_entry_point):
                namespace[name] = value
        return namespace


def replace_contents(target, new):
    """Copy a changed argument back into the tests' object, keeping its identity."""
    if type(target) not in MUTABLE_ARGUMENTS or type(new) is not type(target):
        raise TypeError("only a list, dict, set or bytearray argument can change")
    if isinstance(target, (dict, set)):
        target.clear()
        target.update(new)
    else:
        target[:] = new


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


def run_program_process(source, pipe):
    """The forked child: never returns."""
    try:
        os.close(3)  # the completion channel stays with the judge
    except OSError:
        pass
    if not hasattr(builtins, "exit"):
        builtins.exit, builtins.quit = _Exit("exit"), _Exit("quit")
    try:
        ProgramSide(pipe, source).serve_forever()
    finally:
        os._exit(1)  # an exit of the program (SystemExit, ...) ends this process only


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

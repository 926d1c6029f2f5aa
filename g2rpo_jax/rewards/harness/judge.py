"""The judge process: the tests' view of the program's objects (`RemoteObject`) and the side of
the channel that trusts nothing it receives (`Judge`)."""

import builtins
import os

from .codec import MUTABLE_ARGUMENTS, Side
from .wire import MAX_CHUNK, error_reply, expect, rebuild_error


def fail(reason):
    """Judge only: the program broke the protocol or died. Exit without the token; nothing in
    the tests can catch this."""
    try:
        os.write(2, f"\nharness: {reason}\n".encode("utf-8", "replace"))
    finally:
        os._exit(1)


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

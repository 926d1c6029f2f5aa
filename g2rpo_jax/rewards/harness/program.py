"""The program process: runs solution.py and answers the judge's requests about its objects.
Everything here is within the program's reach; nothing here needs to be trusted."""

import builtins
import os

from .codec import MUTABLE_ARGUMENTS, Side
from .runtime import install_exit_builtins, run_as_module
from .wire import MAX_CHUNK, error_reply, expect, rebuild_error

FUNCTION = type(lambda: None)
UNARY_OPERATIONS = ("len", "bool", "str", "repr", "iter", "int", "float", "index", "abs", "neg")


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
        module = run_as_module(self.source, "solution.py", "solution")
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


def run_program_process(source, pipe):
    """The forked child: never returns."""
    try:
        os.close(3)  # the completion channel stays with the judge
    except OSError:
        pass
    install_exit_builtins()
    try:
        ProgramSide(pipe, source).serve_forever()
    finally:
        os._exit(1)  # an exit of the program (SystemExit, ...) ends this process only

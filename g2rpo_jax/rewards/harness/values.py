"""Standard-library classes, modules and value types by name: what crosses the channel as plain
data and is rebuilt by the receiver with its own classes (Fraction, Counter, namedtuple, ...)."""

import sys

from .wire import expect

DICT_VIEWS = {type({}.keys()): "keys", type({}.items()): "items", type({}.values()): "values"}
# Standard-library value types the receiver rebuilds itself; checked in this order (datetime
# before date, its base). A type counts only once its module is loaded.
STANDARD_CLASSES = (("fractions", "Fraction"), ("decimal", "Decimal"), ("collections", "Counter"),
                    ("collections", "OrderedDict"), ("collections", "defaultdict"),
                    ("collections", "deque"), ("datetime", "datetime"), ("datetime", "date"),
                    ("datetime", "time"), ("datetime", "timedelta"))


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

"""Checked CEL expressions translated to Python functions: the fast path of evaluation.

A call into cel-expr-python costs 2.5-11 µs even for `tenant.tier == "pro"` (argument and
result conversion, the activation's first-touch conversion of each variable), several times
what the same test costs as Python bytecode. So once the engine has parsed and type-checked an
expression, this module translates its checked AST into Python source and compiles that: the
checker's types pick the plain Python operator where CEL and Python agree (`==` on two
strings, `+` on two doubles) and a helper that keeps CEL's rules where they differ (int64
overflow, truncating division, heterogeneous equality, errors absorbed by `&&`/`||`, errors
carried in a comprehension's accumulator, missing map keys).

What the translation does not cover (timestamps and durations, uint, `matches`, the string
extensions beyond `lowerAscii`/`upperAscii`, two-variable comprehensions, ...) makes
`translate` return None, and the engine evaluates that expression as before: one way to
decide, with the engine as the reference. `tests/unit/test_cel_native.py` holds both to the
same answers on random inputs.

Library calls with arguments from constants or request fields are memoised per activation,
as the hoisting of the engine path does (the same `pii.card(llm.prompt)` in three policies
scans once). Values are passed to library functions as Python values, never through the
engine's bridge, so nothing is retained (the leak `cel/hoist.py` works around does not exist
here, for comprehension variables too).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

INT_MIN = -(2**63)
INT_MAX = 2**63 - 1

NativeFunction = Callable[[Mapping[str, Any], dict[Any, Any]], Any]


class Unsupported(Exception):
    """A construct the translation leaves to the engine."""


class NativeError(Exception):
    """A CEL evaluation error raised by translated code, worded as the engine words it (with its
    status code first), so decision logs read the same whichever path evaluated."""


class Fallback(Exception):
    """A value the translation does not reproduce exactly: the engine evaluates this once."""


@dataclass(frozen=True)
class Native:
    """A translated expression: `run(values, memo)`; `roots` are the variables it reads."""

    run: NativeFunction
    roots: frozenset[str]
    source: str  # the generated Python, for debugging


# --- run-time helpers (the names the generated code calls) --------------------------------


class _Box:
    """An error held as a value: a comprehension's accumulator may be one until it is read."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Optional:
    """CEL's optional value."""

    __slots__ = ("value",)

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "optional.none()" if self is NONE else f"optional.of({self.value!r})"


NONE = Optional()


def _v(acc: Any) -> Any:
    if type(acc) is _Box:
        raise acc.error
    return acc


def _container_types() -> tuple[frozenset[type], frozenset[type]]:
    """The protobuf container classes (map and repeated fields) next to dict and list."""
    from google.protobuf import message_factory

    from policy_engine.cel.schema import descriptor_pool_for_env, full_name

    pool = descriptor_pool_for_env()

    def empty(name: str) -> Any:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name(name)))()

    tenant, llm, telemetry = empty("Tenant"), empty("Llm"), empty("Telemetry")
    maps: frozenset[type] = frozenset({dict, type(tenant.labels), type(telemetry.backends)})
    lists: frozenset[type] = frozenset({list, tuple, type(tenant.models), type(llm.messages)})
    return maps, lists


_MAPS, _LISTS = _container_types()


def _is_list(value: Any) -> bool:
    if type(value) in _LISTS:
        return True
    return isinstance(value, list | tuple) or (
        not isinstance(value, str | bytes | Mapping | Message | Optional)
        and hasattr(value, "__len__")
        and hasattr(value, "__getitem__")
        and not hasattr(value, "keys")
    )


def _is_map(value: Any) -> bool:
    if type(value) in _MAPS:
        return True
    return isinstance(value, Mapping) or (not isinstance(value, Message) and hasattr(value, "keys"))


def _kind(value: Any) -> str:
    if value is None:
        return "null_type"
    t = type(value)
    if t is bool:
        return "bool"
    if t is int:
        return "int64"
    if t is float:
        return "double"
    if t is str:
        return "string"
    if t is bytes:
        return "bytes"
    if isinstance(value, Optional):
        return "optional_type"
    if isinstance(value, Message):
        return str(value.DESCRIPTOR.full_name)
    if _is_map(value):
        return "map"
    if _is_list(value):
        return "list"
    return t.__name__


def _no_overload(function: str, *args: Any) -> NativeError:
    kinds = ", ".join(_kind(a) for a in args)
    return NativeError(f"UNKNOWN: No matching overloads found : {function}({kinds})")


def _bool(value: Any, function: str) -> bool:
    if value is True or value is False:
        return value
    raise _no_overload(function, value)


def _short(left: Callable[[], Any], right: Callable[[], Any], decisive: bool, function: str) -> bool:
    """`&&` (decisive False) and `||` (decisive True): the decisive value on either side wins
    over an error on the other; otherwise an error stands."""
    try:
        a = _bool(left(), function)
    except Exception as error:
        if _bool(right(), function) is decisive:
            return decisive
        raise error from None
    if a is decisive:
        return decisive
    return _bool(right(), function)


def _not(value: Any) -> bool:
    return not _bool(value, "!_")


def _nsf(operand: Callable[[], Any]) -> bool:
    """@not_strictly_false: true unless the operand is false (errors count as true)."""
    try:
        value = operand()
    except Exception:
        return True
    return value is not False


def _cond(value: Any) -> bool:
    return _bool(value, "_?_:_")


def _num_eq(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return float(a) == float(b)  # cel-cpp compares an int with a double as doubles
    return bool(a == b)


def _eq(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    ta, tb = type(a), type(b)
    if ta is bool or tb is bool:
        return ta is tb and a == b
    if ta in (int, float):
        return tb in (int, float) and _num_eq(a, b)
    if ta is str or tb is str:
        return ta is tb and a == b
    if ta is bytes or tb is bytes:
        return ta is tb and a == b
    if isinstance(a, Optional) or isinstance(b, Optional):
        if not (isinstance(a, Optional) and isinstance(b, Optional)):
            return False
        if a is NONE or b is NONE:
            return a is b
        return _eq(a.value, b.value)
    if _is_object(a) or _is_object(b):
        if ta is tb and hasattr(a, "__dataclass_fields__"):
            return bool(a == b)  # two values of one schema message as the same dataclass
        raise Fallback("equality of a message held as a Python object")
    if isinstance(a, Message) or isinstance(b, Message):
        a, b = _message_value(a), _message_value(b)
        if isinstance(a, Message) or isinstance(b, Message):
            return type(a) is type(b) and bool(a == b)
        return _eq(a, b)
    if _is_map(a):
        if not _is_map(b) or len(a) != len(b):
            return False
        for key in a:
            found, other = _lookup(b, key)
            if not found or not _eq(a[key], other):
                return False
        return True
    if _is_list(a):
        if not _is_list(b) or len(a) != len(b):
            return False
        return all(_eq(x, y) for x, y in zip(a, b, strict=True))
    return False


def _ne(a: Any, b: Any) -> bool:
    return not _eq(a, b)


_ORDERED = {
    (int, int),
    (int, float),
    (float, int),
    (float, float),
    (str, str),
    (bytes, bytes),
    (bool, bool),
}


def _ordered(a: Any, b: Any, function: str) -> None:
    if (type(a), type(b)) not in _ORDERED:
        raise _no_overload(function, a, b)


def _numbers(a: Any, b: Any) -> tuple[Any, Any]:
    if type(a) is not type(b):
        return float(a), float(b)  # int against double: as doubles, like cel-cpp
    return a, b


def _lt(a: Any, b: Any) -> bool:
    _ordered(a, b, "_<_")
    a, b = _numbers(a, b)
    return bool(a < b)


def _le(a: Any, b: Any) -> bool:
    _ordered(a, b, "_<=_")
    a, b = _numbers(a, b)
    return bool(a <= b)


def _gt(a: Any, b: Any) -> bool:
    _ordered(a, b, "_>_")
    a, b = _numbers(a, b)
    return bool(a > b)


def _ge(a: Any, b: Any) -> bool:
    _ordered(a, b, "_>=_")
    a, b = _numbers(a, b)
    return bool(a >= b)


def _int(value: int) -> int:
    if INT_MIN <= value <= INT_MAX:
        return value
    raise NativeError("OUT_OF_RANGE: integer overflow")


def _addi(a: int, b: int) -> int:
    return _int(a + b)


def _subi(a: int, b: int) -> int:
    return _int(a - b)


def _muli(a: int, b: int) -> int:
    return _int(a * b)


def _divi(a: int, b: int) -> int:
    if b == 0:
        raise NativeError("INVALID_ARGUMENT: divide by zero")
    quotient = abs(a) // abs(b)
    return _int(quotient if (a < 0) == (b < 0) else -quotient)


def _modi(a: int, b: int) -> int:
    if b == 0:
        raise NativeError("INVALID_ARGUMENT: modulus by zero")
    if a == INT_MIN and b == -1:
        raise NativeError("OUT_OF_RANGE: integer overflow")
    remainder = abs(a) % abs(b)
    return remainder if a >= 0 else -remainder


def _negi(a: int) -> int:
    return _int(-a)


def _divd(a: float, b: float) -> float:
    try:
        return a / b
    except ZeroDivisionError:
        if a != a or a == 0:
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _pair(a: Any, b: Any, function: str) -> type:
    ta, tb = type(a), type(b)
    if ta is tb and ta in (int, float, str, bytes):
        return ta
    if _is_list(a) and _is_list(b):
        return list
    raise _no_overload(function, a, b)


def _concat(a: Any, b: Any) -> list[Any]:
    return [*a, *b]


# Per operator, the operand type (both operands the same) → implementation, for dyn operands.
_ARITHMETIC: dict[str, dict[type, Callable[[Any, Any], Any]]] = {
    "_+_": {int: _addi, float: operator.add, str: operator.add, bytes: operator.add, list: _concat},
    "_-_": {int: _subi, float: operator.sub},
    "_*_": {int: _muli, float: operator.mul},
    "_/_": {int: _divi, float: _divd},
    "_%_": {int: _modi},
}


def _arith(function: str, a: Any, b: Any) -> Any:
    implementation = _ARITHMETIC[function].get(_pair(a, b, function))
    if implementation is None:
        raise _no_overload(function, a, b)
    return implementation(a, b)


def _neg(a: Any) -> Any:
    if type(a) is int:
        return _negi(a)
    if type(a) is float:
        return -a
    raise _no_overload("-_", a)


_JSON_TYPES = frozenset({"google.protobuf.Value", "google.protobuf.Struct", "google.protobuf.ListValue"})


def _json_value(value: Any) -> Any:
    name = value.DESCRIPTOR.full_name
    if name == "google.protobuf.Struct":
        return {k: _json_value(v) for k, v in value.fields.items()}
    if name == "google.protobuf.ListValue":
        return [_json_value(v) for v in value.values]
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind in ("struct_value", "list_value"):
        return _json_value(getattr(value, kind))
    return getattr(value, kind)  # number_value (NaN and infinities included), string, bool


def _message_value(value: Any) -> Any:
    """A protobuf Value/Struct/ListValue read from a message, as the Python value CEL sees;
    timestamps and durations are left to the engine."""
    if isinstance(value, Message):
        name = value.DESCRIPTOR.full_name
        if name in _JSON_TYPES:
            return _json_value(value)
        if name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
            raise Fallback(name)
    return value


def _field(message: Any, name: str) -> Any:
    """A dyn-typed field of a message (request.body): the JSON value, null when unset."""
    if isinstance(message, Message):
        if not message.HasField(name):
            return None
        return _message_value(getattr(message, name))
    value = getattr(message, name)
    if isinstance(value, Message):
        return _message_value(value)
    return value


def _lookup(container: Any, key: Any) -> tuple[bool, Any]:
    kind = type(key)
    if kind is str:
        if key in container:
            return True, container[key]
        return False, None
    if kind is float:
        if not (key == key and key.is_integer()):
            return False, None
        key, kind = int(key), int  # heterogeneous map keys: 1.0 finds 1
    if kind is not int and kind is not bool:
        raise _no_overload("_[_]", container, key)
    # Python has True == 1 and one hash for both; CEL keeps bool and int keys apart.
    for stored in container:
        if type(stored) is kind and stored == key:
            return True, container[stored]
    return False, None


def _not_found(key: Any) -> NativeError:
    shown = f'"{key}"' if isinstance(key, str) else str(key).lower() if isinstance(key, bool) else str(key)
    return NativeError(f"NOT_FOUND: Key not found in map : {shown}")


def _is_object(value: Any) -> bool:
    """A value of one of the schema's messages held as a Python object (see decide/activation.py)."""
    kind = type(value)
    return hasattr(kind, "__dataclass_fields__") or (
        hasattr(kind, "__slots__") and kind is not Optional and kind is not _Box
    )


def _is_field(operand: Any, name: str) -> bool:
    """A field of the message a Python object stands for: never a Python attribute."""
    return not name.startswith("_") and hasattr(operand, name) and not callable(getattr(operand, name))


def _select(operand: Any, name: str) -> Any:
    """`x.f` on a map or a dyn value."""
    if isinstance(operand, Optional):
        return _optsel(operand, name)
    if _is_map(operand):
        if name in operand:
            return operand[name]
        raise _not_found(name)
    if isinstance(operand, Message):
        if name not in operand.DESCRIPTOR.fields_by_name:
            raise NativeError(f"NOT_FOUND: no_such_field : {name}")
        return (
            _message_value(getattr(operand, name))
            if _field_is_message(operand, name)
            else getattr(operand, name)
        )
    if _is_object(operand):
        if not _is_field(operand, name):
            raise NativeError(f"NOT_FOUND: no_such_field : {name}")
        value = getattr(operand, name)
        if value is None:
            raise Fallback("an unset message field through dyn")  # the engine knows its default
        plain = isinstance(value, str | int | float | bool) or _is_object(value)
        if not (plain or _is_list(value) or _is_map(value)):
            raise Fallback("a timestamp through dyn")
        return value
    raise NativeError("INVALID_ARGUMENT: Applying SELECT to non-message type")


def _field_is_message(message: Any, name: str) -> bool:
    field = message.DESCRIPTOR.fields_by_name[name]
    return field.message_type is not None and not field.is_repeated


def _set(value: Any) -> bool:
    """Proto3 presence of a scalar: any value but the default (-0.0 is not the default)."""
    if type(value) is float:
        return value != 0 or math.copysign(1.0, value) < 0
    return bool(value)


def _has(operand: Any, name: str) -> bool:
    """has(x.f): a map's key, a message field set (proto3: not the default value)."""
    if _is_map(operand):
        return name in operand
    if isinstance(operand, Message):
        if name not in operand.DESCRIPTOR.fields_by_name:
            raise NativeError(f"NOT_FOUND: no_such_field : {name}")
        field = operand.DESCRIPTOR.fields_by_name[name]
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if field.message_type is not None and not is_map and not field.is_repeated:
            return bool(operand.HasField(name))
        value = getattr(operand, name)
        return len(value) > 0 if not isinstance(value, str | bytes | int | float) else _set(value)
    if _is_object(operand):
        if not _is_field(operand, name):
            raise NativeError(f"NOT_FOUND: no_such_field : {name}")
        value = getattr(operand, name)
        if value is None:
            return False
        if name in getattr(type(operand), "_cel_presence", ()):
            return True  # a message field (request.body, request.time): set, even if empty
        if isinstance(value, str | bytes | int | float | bool):
            return _set(value)
        if _is_list(value) or _is_map(value):
            return len(value) > 0
        if _is_object(value) or isinstance(value, Message):
            return True
        raise Fallback("presence of a timestamp field")  # the engine knows whether it was set
    raise NativeError("INVALID_ARGUMENT: Applying SELECT to non-message type")


def _index(container: Any, key: Any) -> Any:
    if isinstance(container, Optional):
        return _optindex(container, key)
    if _is_map(container):
        found, value = _lookup(container, key)
        if found:
            return value
        raise _not_found(key)
    if _is_list(container):
        if type(key) is float and key.is_integer():
            key = int(key)
        if type(key) is not int:
            raise _no_overload("_[_]", container, key)
        if 0 <= key < len(container):
            return container[key]
        raise NativeError(f"UNKNOWN: Index error: index={key} size={len(container)}")
    raise _no_overload("_[_]", container, key)


def _haskey(container: Any, key: str) -> bool:
    """`key in map` where the checker knows a string-keyed map and a string key; never fails."""
    try:
        return key in container
    except UnicodeEncodeError:  # a protobuf map cannot hold a key that is not valid UTF-8
        return False


def _key(container: Any, key: str) -> Any:
    """`map[key]` where the checker knows a string-keyed map and a string key."""
    if _haskey(container, key):
        return container[key]
    raise _not_found(key)


def _optkey(container: Any, key: str) -> Optional:
    """`map[?key]` where the checker knows a string-keyed map and a string key; never fails."""
    return Optional(container[key]) if _haskey(container, key) else NONE


def _present(value: Any) -> tuple[bool, Any]:
    """An optional operand chains: none stays none, a present value is unwrapped."""
    if isinstance(value, Optional):
        return value is not NONE, value.value
    return True, value


def _optindex(container: Any, key: Any) -> Optional:
    present, container = _present(container)
    if not present:
        return NONE
    if _is_map(container):
        found, value = _lookup(container, key)
        return Optional(value) if found else NONE
    if _is_list(container):
        if type(key) is not int:
            raise _no_overload("_[?_]", container, key)
        return Optional(container[key]) if 0 <= key < len(container) else NONE
    raise _no_overload("_[?_]", container, key)


def _optsel(operand: Any, name: str) -> Optional:
    present, operand = _present(operand)
    if not present:
        return NONE
    if _is_map(operand):
        return Optional(operand[name]) if name in operand else NONE
    if _has(operand, name):
        return Optional(_select(operand, name))
    return NONE


def _opt(value: Any, function: str) -> Optional:
    if isinstance(value, Optional):
        return value
    raise _no_overload(function, value)


def _or_value(optional: Any, default: Any) -> Any:
    opt = _opt(optional, "orValue")
    return default if opt is NONE else opt.value


def _or_value_lazy(optional: Any, default: Callable[[], Any]) -> Any:
    """`orValue` whose default can fail: CEL evaluates it only for an empty optional."""
    opt = _opt(optional, "orValue")
    return default() if opt is NONE else opt.value


def _or_optional(optional: Any, other: Callable[[], Any]) -> Any:
    opt = _opt(optional, "or")
    return _opt(other(), "or") if opt is NONE else opt


def _has_value(optional: Any) -> bool:
    return _opt(optional, "hasValue") is not NONE


def _value(optional: Any) -> Any:
    opt = _opt(optional, "value")
    if opt is NONE:
        raise NativeError("INVALID_ARGUMENT: optional.none() dereference")
    return opt.value


def _of_non_zero(value: Any) -> Optional:
    if isinstance(value, Message):
        return NONE if value.ByteSize() == 0 else Optional(value)
    if _is_object(value):
        raise Fallback("optional.ofNonZeroValue of a message held as a Python object")
    if value is None or value is False or (not isinstance(value, bool) and value in (0, 0.0, "", b"")):
        return NONE
    if (_is_list(value) or _is_map(value)) and len(value) == 0:
        return NONE
    return Optional(value)


def _in(item: Any, container: Any) -> bool:
    if _is_map(container):
        if type(item) not in (str, int, bool, float):
            raise _no_overload("@in", item, container)
        return _lookup(container, item)[0]
    if _is_list(container):
        return any(_eq(item, element) for element in container)
    raise _no_overload("@in", item, container)


def _size(value: Any) -> int:
    if isinstance(value, str | bytes) or _is_list(value) or _is_map(value):
        return len(value)
    raise _no_overload("size", value)


_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _to_double(value: Any) -> float:
    if type(value) is int or type(value) is float:
        return float(value)
    if type(value) is str:
        if _DECIMAL.fullmatch(value):
            return float(value)
        raise Fallback("double() of a non-decimal string")  # the engine's own parser decides
    raise _no_overload("double", value)


_INTEGER = re.compile(r"[+-]?[0-9]+")


def _to_int(value: Any) -> int:
    if type(value) is int:
        return value
    if type(value) is bool:
        return int(value)
    if type(value) is float:
        if value != value or not -9.223372036854775808e18 < value < 9.223372036854775808e18:
            raise NativeError("OUT_OF_RANGE: double out of int64 range")
        return int(value)
    if type(value) is str:
        if _INTEGER.fullmatch(value):
            return _int(int(value))
        raise Fallback("int() of a string with more than digits")  # the engine's parser decides
    raise _no_overload("int", value)


def _to_string(value: Any) -> str:
    if type(value) is str:
        return value
    if type(value) is int:
        return str(value)
    if type(value) is bool:
        return "true" if value else "false"
    if type(value) is bytes:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise NativeError("invalid UTF-8 in bytes") from None
    raise Unsupported("string() of this type")  # the engine formats doubles its own way


_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _str_method(value: Any, function: str) -> str:
    if type(value) is str:
        return value
    raise _no_overload(function, value)


def _starts(value: Any, prefix: Any) -> bool:
    return _str_method(value, "startsWith").startswith(_str_method(prefix, "startsWith"))


def _ends(value: Any, suffix: Any) -> bool:
    return _str_method(value, "endsWith").endswith(_str_method(suffix, "endsWith"))


def _contains(value: Any, part: Any) -> bool:
    return _str_method(part, "contains") in _str_method(value, "contains")


def _lower_ascii(value: Any) -> str:
    return _str_method(value, "lowerAscii").translate(_LOWER)


def _upper_ascii(value: Any) -> str:
    return _str_method(value, "upperAscii").translate(_UPPER)


def _plain(value: Any) -> Any:
    """A library function's argument as the engine's bridge would pass it."""
    if type(value) is str:
        return value
    if type(value) is tuple:  # a tenant's models: no ABC checks on the way to the list case
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | bytes | int | float | bool | list | dict):
        return value
    if isinstance(value, Message):
        return _message_value(value)
    if _is_map(value):
        return {k: _plain(value[k]) for k in value}
    if _is_list(value):
        return [_plain(v) for v in value]
    return value


_PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "int": (int,),
    "double": (float,),
    "bool": (bool,),
}


def _typed(value: Any, param: str, function: str) -> Any:
    """A dyn argument of a library function: the declared parameter type, or no overload."""
    if param in _PARAM_TYPES:
        if type(value) in _PARAM_TYPES[param]:
            return value
    elif (param.startswith("list<") and _is_list(value)) or (param.startswith("map<") and _is_map(value)):
        return value
    raise _no_overload(function, value)


def _library(name: str, impl: Callable[..., Any], *args: Any) -> Any:
    try:
        return impl(*[a if type(a) is str else _plain(a) for a in args])
    except NativeError:
        raise
    except Exception as error:
        raise NativeError(f"{name}: {error}") from None


_MISSING = object()


def _memo(memo: dict[Any, Any], key: str, name: str, impl: Callable[..., Any], *args: Any) -> Any:
    result = memo.get(key, _MISSING)
    if result is _MISSING:
        # _library's body, inlined: this is the path of every scan of the prompt.
        try:
            result = impl(*[a if type(a) is str else _plain(a) for a in args])
        except NativeError:
            raise
        except Exception as error:
            raise NativeError(f"{name}: {error}") from None
        memo[key] = result
    return result


def _bind(init: Callable[[], Any], body: Callable[[Any], Any], boxed: Callable[[Any], Any]) -> Any:
    """cel.bind(name, init, body): a comprehension over nothing, its accumulator the name."""
    try:
        value = init()
    except Exception as error:  # an error only if the body reads it
        return boxed(_Box(error))
    return body(value)


def _engine_result(value: Any) -> Any:
    """A result holding a message as a Python object goes back to the engine, so that callers
    get one representation (protobuf) whichever path evaluated."""
    if _is_object(value) or isinstance(value, Message):
        raise Fallback("a message result")
    if type(value) in (list, tuple):
        for item in value:
            _engine_result(item)
    elif type(value) is dict:
        for item in value.values():
            _engine_result(item)
    return value


def _map_literal(entries: Sequence[tuple[Any, Any]]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for key, value in entries:
        if type(key) not in (str, int, bool):
            raise NativeError(f"INVALID_ARGUMENT: unsupported map key type: {_kind(key)}")
        if key in out:
            if type(key) is not str and not any(type(k) is type(key) and k == key for k in out):
                raise Fallback("a map with both bool and int keys")  # one Python key, two CEL keys
            raise NativeError("ALREADY_EXISTS: duplicate key in map")
        out[key] = value
    return out


def _comprehension(
    iter_range: Any,
    init: Callable[[], Any],
    condition: Callable[[Any, Any], Any],
    step: Callable[[Any, Any], Any],
    result: Callable[[Any], Any],
) -> Any:
    if isinstance(iter_range, Message) or not (_is_list(iter_range) or _is_map(iter_range)):
        raise NativeError(f"UNKNOWN: No matching overloads found : <iter_range>({_kind(iter_range)})")
    items = list(iter_range.keys()) if _is_map(iter_range) else iter_range
    try:
        acc = init()
    except Exception as error:
        acc = _Box(error)
    for item in items:
        go = condition(item, acc)
        if go is not True:
            if go is False:
                break
            raise _no_overload("<loop_condition>", go)
        try:
            acc = step(item, acc)
        except Exception as error:
            acc = _Box(error)
    return result(acc)


HELPERS: dict[str, Any] = {
    name: value
    for name, value in globals().items()
    if name.startswith("_") and callable(value) and not name.startswith("__")
}
HELPERS.update(NONE=NONE, Optional=Optional, NativeError=NativeError, Fallback=Fallback)


# --- translation --------------------------------------------------------------------------

_PRIMITIVE = {1: "bool", 2: "int", 3: "uint", 4: "double", 5: "string", 6: "bytes"}


def _type_name(type_: Any) -> str:
    """A short name of a checked type: bool/int/double/string/bytes/list/map/message/dyn/..."""
    if type_ is None:
        return "dyn"
    which = type_.WhichOneof("type_kind")
    if which == "primitive":
        return _PRIMITIVE.get(type_.primitive, "other")
    if which in ("list_type", "map_type", "message_type", "dyn", "null"):
        return {"list_type": "list", "map_type": "map", "message_type": "message"}.get(which, str(which))
    if which == "abstract_type" and type_.abstract_type.name == "optional_type":
        return "optional"
    if which == "type_param":
        return "dyn"
    return "other"  # well_known (timestamp, duration, any), wrapper, type, error, function


_BINARY_SAME = {  # overload id → Python operator, when both operands have the named type
    "add_double": "+",
    "subtract_double": "-",
    "multiply_double": "*",
    "add_string": "+",
    "add_bytes": "+",
}
_INT_OPS = {
    "add_int64": "_addi",
    "subtract_int64": "_subi",
    "multiply_int64": "_muli",
    "divide_int64": "_divi",
    "modulo_int64": "_modi",
}
_ARITHMETIC_OPERATORS = frozenset(_ARITHMETIC)
_COMPARE = {"_<_": ("<", "_lt"), "_<=_": ("<=", "_le"), "_>_": (">", "_gt"), "_>=_": (">=", "_ge")}
_COMPARABLE = {"int", "double", "string", "bytes", "bool"}
_NUMBER = {"int", "double"}
_SIMPLE_EQ = {"bool", "int", "string", "bytes"}  # doubles too, but int/double mixes need _eq
_SCALAR_FIELD_TYPES = {  # protobuf field type → the checker's type of a value that fits as is
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_INT64: "int",
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_STRING: "string",
}
_STRING_TESTS = {
    "startsWith": "({0}).startswith({1})",
    "endsWith": "({0}).endswith({1})",
    "contains": "({0}).__contains__({1})",  # the receiver first, as CEL evaluates it
}
_SIMPLE = {  # function → (helper, arity counting the receiver)
    "startsWith": ("_starts", 2),
    "endsWith": ("_ends", 2),
    "contains": ("_contains", 2),
    "lowerAscii": ("_lower_ascii", 1),
    "upperAscii": ("_upper_ascii", 1),
    "hasValue": ("_has_value", 1),
    "value": ("_value", 1),
    "optional.of": ("Optional", 1),
    "optional.ofNonZeroValue": ("_of_non_zero", 1),
}
_SCALAR_KINDS = {
    "int64_value": int,
    "double_value": float,
    "string_value": str,
    "bytes_value": bytes,
    "bool_value": bool,
}


# name, impl, member, params, total
LibraryOverload = tuple[str, Callable[..., Any], bool, tuple[str, ...], bool]


@dataclass
class _Code:
    text: str
    may_error: bool


def _plain_type(type_: Any) -> bool:
    """Primitives and lists or maps of them: a result that can hold no message."""
    if type_ is None:
        return False
    which = type_.WhichOneof("type_kind")
    if which in ("primitive", "null"):
        return True
    if which == "list_type":
        return _plain_type(type_.list_type.elem_type)
    if which == "map_type":
        return _plain_type(type_.map_type.value_type)
    return False


def _is_bind(comp: Any) -> bool:
    """cel.bind's shape: no elements, a false loop condition, the accumulator as the step."""
    rng, cond, step = comp.iter_range, comp.loop_condition, comp.loop_step
    return (
        rng.WhichOneof("expr_kind") == "list_expr"
        and not len(rng.list_expr.elements)
        and cond.WhichOneof("expr_kind") == "const_expr"
        and cond.const_expr.WhichOneof("constant_kind") == "bool_value"
        and not cond.const_expr.bool_value
        and step.WhichOneof("expr_kind") == "ident_expr"
        and step.ident_expr.name == comp.accu_var
    )


class _Translator:
    def __init__(
        self,
        checked: Any,
        library: Mapping[str, LibraryOverload],
        roots: frozenset[str],
        messages: Mapping[str, type[Message]],
    ) -> None:
        self._types = checked.type_map
        self._refs = checked.reference_map
        self._library = library  # overload id → (function name, impl, member, parameter types)
        self._roots = roots
        self._messages = messages
        self.constants: dict[str, Any] = {}
        self.used_roots: set[str] = set()
        self._comprehensions = 0

    def _constant(self, value: Any) -> str:
        name = f"K{len(self.constants)}"
        self.constants[name] = value
        return name

    def type_of(self, expr: Any) -> str:
        return _type_name(self._types.get(expr.id))

    def translate(self, expr: Any, scope: Mapping[str, tuple[str, bool]]) -> _Code:
        if self.type_of(expr) in ("other", "uint"):
            raise Unsupported(f"type of node {expr.id}")
        kind = expr.WhichOneof("expr_kind")
        handler = getattr(self, f"_{kind}", None)
        if handler is None:
            raise Unsupported(kind or "empty expression")
        result: _Code = handler(expr, scope)
        return result

    # leaves

    def _const_expr(self, expr: Any, scope: Mapping[str, tuple[str, bool]]) -> _Code:
        const = expr.const_expr
        which = const.WhichOneof("constant_kind")
        if which == "null_value":
            return _Code("None", False)
        if which not in _SCALAR_KINDS:
            raise Unsupported(f"constant {which}")
        return _Code(repr(getattr(const, which)), False)

    def _ident_expr(self, expr: Any, scope: Mapping[str, tuple[str, bool]]) -> _Code:
        name = expr.ident_expr.name
        reference = self._refs.get(expr.id)
        if name in scope:
            python, boxed = scope[name]
            return _Code(f"_v({python})", True) if boxed else _Code(python, False)
        if reference is not None and reference.name:
            name = reference.name
        if reference is not None and reference.HasField("value"):
            raise Unsupported("enum constant")
        if name not in self._roots:
            raise Unsupported(f"identifier {name}")
        self.used_roots.add(name)
        return _Code(f"V[{name!r}]", False)

    def _select_expr(self, expr: Any, scope: Mapping[str, tuple[str, bool]]) -> _Code:
        select = expr.select_expr
        reference = self._refs.get(expr.id)
        if reference is not None and reference.name and not select.test_only:
            # A qualified identifier the checker resolved (e.g. a declared `a.b`).
            if reference.name not in self._roots:
                raise Unsupported(f"identifier {reference.name}")
            self.used_roots.add(reference.name)
            return _Code(f"V[{reference.name!r}]", False)
        operand = self.translate(select.operand, scope)
        operand_type = self.type_of(select.operand)
        field = select.field
        if select.test_only:
            return _Code(f"_has({operand.text}, {field!r})", True)
        if operand_type == "message" and field.isidentifier() and self.type_of(expr) != "dyn":
            return _Code(f"{operand.text}.{field}", operand.may_error)
        if operand_type == "message":
            return _Code(f"_field({operand.text}, {field!r})", operand.may_error)
        return _Code(f"_select({operand.text}, {field!r})", True)

    def _list_expr(self, expr: Any, scope: Mapping[str, tuple[str, bool]]) -> _Code:
        if len(expr.list_expr.optional_indices):
            raise Unsupported("optional list elements")
        parts = [self.translate(e, scope) for e in expr.list_expr.elements]
        text = "[" + ", ".join(p.text for p in parts) + "]"
        return _Code(text, any(p.may_error for p in parts))

    def _struct_expr(self, expr: Any, scope: Mapping[str, tuple[str, bool]]) -> _Code:
        struct = expr.struct_expr
        if any(e.optional_entry for e in struct.entries):
            raise Unsupported("optional entries")
        if struct.message_name:
            cls = self._messages.get(struct.message_name)
            if cls is None:
                raise Unsupported(f"message {struct.message_name}")
            fields = []
            for entry in struct.entries:
                value = self.translate(entry.value, scope)
                fields.append(f"{entry.field_key}={value.text}")
            if not all(e.field_key.isidentifier() for e in struct.entries):
                raise Unsupported("field name")
            # Scalar fields only: nested messages, maps and lists would need conversion.
            descriptor = cls.DESCRIPTOR
            for entry in struct.entries:
                field = descriptor.fields_by_name.get(entry.field_key)
                if field is None or field.message_type is not None or field.is_repeated:
                    raise Unsupported("message literal with a non-scalar field")
                if _SCALAR_FIELD_TYPES.get(field.type) != self.type_of(entry.value):
                    raise Unsupported("message literal field of another static type")  # e.g. dyn
            return _Code(f"{self._constant(cls)}({', '.join(fields)})", True)
        entries = []
        for entry in struct.entries:
            key = self.translate(entry.map_key, scope)
            value = self.translate(entry.value, scope)
            entries.append(f"({key.text}, {value.text})")
        return _Code(f"_map_literal([{', '.join(entries)}])", True)

    def _comprehension_expr(self, expr: Any, scope: Mapping[str, tuple[str, bool]]) -> _Code:
        comp = expr.comprehension_expr
        if getattr(comp, "iter_var2", ""):
            raise Unsupported("two-variable comprehension")
        number = self._comprehensions
        self._comprehensions += 1
        item, acc = f"c{number}_item", f"c{number}_acc"
        if _is_bind(comp):
            init = self.translate(comp.accu_init, scope)
            body = self.translate(comp.result, {**scope, comp.accu_var: (acc, False)})
            if not init.may_error:
                return _Code(f"(lambda {acc}: {body.text})({init.text})", body.may_error)
            # Two bodies: the usual one reads the value directly; the other reads an error that
            # only an absorbing `&&`/`||` may drop.
            boxed = self.translate(comp.result, {**scope, comp.accu_var: (acc, True)})
            return _Code(
                f"_bind(lambda: {init.text}, lambda {acc}: {body.text}, lambda {acc}: {boxed.text})", True
            )
        iter_range = self.translate(comp.iter_range, scope)
        init = self.translate(comp.accu_init, scope)
        inner = {**scope, comp.iter_var: (item, False), comp.accu_var: (acc, True)}
        condition = self.translate(comp.loop_condition, inner)
        step = self.translate(comp.loop_step, inner)
        result = self.translate(comp.result, {**scope, comp.accu_var: (acc, True)})
        text = (
            f"_comprehension({iter_range.text}, lambda: {init.text}, "
            f"lambda {item}, {acc}: {condition.text}, lambda {item}, {acc}: {step.text}, "
            f"lambda {acc}: {result.text})"
        )
        return _Code(text, True)

    # calls

    def _call_expr(self, expr: Any, scope: Mapping[str, tuple[str, bool]]) -> _Code:
        call = expr.call_expr
        function = call.function
        reference = self._refs.get(expr.id)
        overloads = tuple(reference.overload_id) if reference is not None else ()
        target = call.target if call.HasField("target") else None
        args = list(call.args)

        if function in ("_&&_", "_||_"):
            return self._logical(function, args, scope)
        if function == "@not_strictly_false":
            operand = self.translate(args[0], scope)
            return _Code(f"_nsf(lambda: {operand.text})", False)
        if function == "_?_:_":
            cond, then, other = (self.translate(a, scope) for a in args)
            test = cond.text if self.type_of(args[0]) == "bool" else f"_cond({cond.text})"
            may = cond.may_error or then.may_error or other.may_error or self.type_of(args[0]) != "bool"
            return _Code(f"({then.text} if {test} else {other.text})", may)
        if function == "orValue" and target is not None and len(args) == 1:
            optional, default = self.translate(target, scope), self.translate(args[0], scope)
            # An optional always answers orValue (only a dyn operand may be something else).
            may = optional.may_error or default.may_error or self.type_of(target) != "optional"
            if default.may_error:  # evaluated only when needed, as the engine does
                return _Code(f"_or_value_lazy({optional.text}, lambda: {default.text})", may)
            return _Code(f"_or_value({optional.text}, {default.text})", may)
        if function == "or" and target is not None and len(args) == 1:
            left = self.translate(target, scope)
            right = self.translate(args[0], scope)
            return _Code(f"_or_optional({left.text}, lambda: {right.text})", True)

        library = [self._library[o] for o in overloads if o in self._library]
        if library:
            return self._library_call(expr, overloads, target, args, scope)

        operands = ([target] if target is not None else []) + args
        parts = [self.translate(a, scope) for a in operands]
        texts = [p.text for p in parts]
        may = any(p.may_error for p in parts)
        types = [self.type_of(a) for a in operands]
        if function in ("_[_]", "_[?_]", "@in") and len(operands) == 2:
            # A string key of a string-keyed map: Python's own lookups on every map type the
            # values can have (dict, protobuf map), without the run-time type dispatch.
            map_index = 1 if function == "@in" else 0
            if self._string_keyed(operands[map_index]) and types[1 - map_index] == "string":
                container, key = texts[map_index], texts[1 - map_index]
                if function == "@in":
                    return _Code(f"_haskey({container}, {key})", may)
                if function == "_[?_]":
                    return _Code(f"_optkey({container}, {key})", may)
                return _Code(f"_key({container}, {key})", True)
        return self._standard(function, overloads, texts, types, may)

    def _string_keyed(self, expr: Any) -> bool:
        type_ = self._types.get(expr.id)
        if type_ is None or type_.WhichOneof("type_kind") != "map_type":
            return False
        key = type_.map_type.key_type
        return key.WhichOneof("type_kind") == "primitive" and _PRIMITIVE.get(key.primitive) == "string"

    def _logical(self, function: str, args: Sequence[Any], scope: Mapping[str, tuple[str, bool]]) -> _Code:
        left, right = (self.translate(a, scope) for a in args)
        word = "and" if function == "_&&_" else "or"
        if all(self.type_of(a) == "bool" for a in args) and not (left.may_error and right.may_error):
            # With at most one operand that can fail, Python's short circuit is CEL's rule when
            # the safe operand goes first: `false && error` is false, `true || error` is true,
            # and otherwise the result is the other operand's (its error included). CEL's
            # logical operators are commutative, so the order may change.
            first, second = (right, left) if left.may_error else (left, right)
            # ...but not a library call (a scan of the prompt) in front of a cheap operand that
            # would often have decided alone: then CEL's form below keeps the written order.
            scan_moved_first = first is right and "_memo(" in right.text and "_memo(" not in left.text
            if not scan_moved_first:
                return _Code(f"({first.text} {word} {second.text})", second.may_error)
        decisive = function == "_||_"
        return _Code(f"_short(lambda: {left.text}, lambda: {right.text}, {decisive}, {function!r})", True)

    def _library_call(
        self,
        expr: Any,
        overloads: Sequence[str],
        target: Any,
        args: Sequence[Any],
        scope: Mapping[str, tuple[str, bool]],
    ) -> _Code:
        if len(overloads) != 1:
            raise Unsupported("library call with several candidate overloads")
        name, impl, member, params, total = self._library[overloads[0]]
        operands = ([target] if target is not None else []) + list(args)
        if member != (target is not None) or len(params) != len(operands):
            raise Unsupported("library call form")
        parts = [self.translate(a, scope) for a in operands]
        for index, (operand, param) in enumerate(zip(operands, params, strict=True)):
            if self.type_of(operand) == "dyn":
                parts[index] = _Code(f"_typed({parts[index].text}, {param!r}, {name!r})", True)
        impl_name = self._constant(impl)
        arguments = ", ".join(p.text for p in parts)
        pure = all(self._is_request_data(a, scope) for a in operands)
        if pure:
            key = overloads[0] + "(" + ", ".join(self._describe(a) for a in operands) + ")"
            may_error = not total or any(p.may_error for p in parts)
            return _Code(f"_memo(M, {key!r}, {name!r}, {impl_name}, {arguments})", may_error)
        return _Code(f"_library({name!r}, {impl_name}, {arguments})", True)

    def _is_request_data(self, expr: Any, scope: Mapping[str, tuple[str, bool]]) -> bool:
        """Constants and field paths of declared variables: the same in one activation."""
        kind = expr.WhichOneof("expr_kind")
        if kind == "const_expr":
            return True
        if kind == "list_expr":
            return all(self._is_request_data(e, scope) for e in expr.list_expr.elements)
        if kind == "ident_expr":
            return expr.ident_expr.name not in scope and expr.ident_expr.name in self._roots
        if kind == "select_expr" and not expr.select_expr.test_only:
            return self._is_request_data(expr.select_expr.operand, scope)
        return False

    def _describe(self, expr: Any) -> str:
        kind = expr.WhichOneof("expr_kind")
        if kind == "const_expr":
            which = expr.const_expr.WhichOneof("constant_kind")
            return repr(getattr(expr.const_expr, which)) if which else "null"
        if kind == "list_expr":
            return "[" + ", ".join(self._describe(e) for e in expr.list_expr.elements) + "]"
        if kind == "ident_expr":
            return str(expr.ident_expr.name)
        return self._describe(expr.select_expr.operand) + "." + str(expr.select_expr.field)

    def _standard(
        self, function: str, overloads: Sequence[str], args: list[str], types: list[str], may: bool
    ) -> _Code:
        single = overloads[0] if len(overloads) == 1 else ""
        if function == "!_":
            if types[0] == "bool":
                return _Code(f"(not {args[0]})", may)
            return _Code(f"_not({args[0]})", True)
        if function == "-_":
            if single == "negate_double":
                return _Code(f"(-{args[0]})", may)
            return _Code(f"_neg({args[0]})", True)
        if function in ("_==_", "_!=_"):
            same = types[0] == types[1] and types[0] in _SIMPLE_EQ
            if same:
                op = "==" if function == "_==_" else "!="
                return _Code(f"({args[0]} {op} {args[1]})", may)
            helper = "_eq" if function == "_==_" else "_ne"
            return _Code(f"{helper}({args[0]}, {args[1]})", may)
        if function in _COMPARE:
            op, helper = _COMPARE[function]
            a, b = types
            if a == b and a in _COMPARABLE:
                return _Code(f"({args[0]} {op} {args[1]})", may)
            return _Code(f"{helper}({args[0]}, {args[1]})", may or not (a in _NUMBER and b in _NUMBER))
        if function in _ARITHMETIC_OPERATORS:
            # The overload names the operand types only when the checker knew them: a dyn
            # operand is checked at run time by the generic helper.
            operand_type = single.rsplit("_", 1)[-1] if single else ""
            static = {"double": "double", "int64": "int", "string": "string", "bytes": "bytes"}
            known = operand_type in static and types[0] == types[1] == static[operand_type]
            if known and single in _BINARY_SAME:
                return _Code(f"({args[0]} {_BINARY_SAME[single]} {args[1]})", may)
            if known and single in _INT_OPS:
                return _Code(f"{_INT_OPS[single]}({args[0]}, {args[1]})", True)
            if known and single == "divide_double":
                return _Code(f"_divd({args[0]}, {args[1]})", may)
            return _Code(f"_arith({function!r}, {args[0]}, {args[1]})", True)
        if function == "_[_]":
            return _Code(f"_index({args[0]}, {args[1]})", True)
        if function == "_[?_]":
            return _Code(f"_optindex({args[0]}, {args[1]})", True)
        if function == "_?._":
            return self._optional_select(args)
        if function == "@in":
            return _Code(f"_in({args[0]}, {args[1]})", True)
        if function == "size" and len(args) == 1:
            return _Code(f"_size({args[0]})", True)
        if function in _STRING_TESTS and types == ["string", "string"]:
            # Python's str methods are CEL's on two strings: code points both.
            return _Code(_STRING_TESTS[function].format(*args), may)
        if function in _SIMPLE and len(args) == _SIMPLE[function][1]:
            return _Code(f"{_SIMPLE[function][0]}({', '.join(args)})", True)
        if function == "optional.none" and not args:
            return _Code("NONE", False)
        if function == "dyn" and len(args) == 1:
            return _Code(args[0], may)
        if function == "double" and len(args) == 1:
            if single == "int64_to_double" and types[0] == "int":
                return _Code(f"float({args[0]})", may)
            if single == "double_to_double" and types[0] == "double":
                return _Code(args[0], may)
            if types[0] in ("int", "double", "string", "dyn"):
                return _Code(f"_to_double({args[0]})", True)
        if function == "int" and len(args) == 1 and types[0] in ("int", "double", "string", "bool", "dyn"):
            return _Code(f"_to_int({args[0]})", True)
        if function == "string" and len(args) == 1 and types[0] in ("string", "int", "bool", "bytes"):
            return _Code(f"_to_string({args[0]})", True)
        raise Unsupported(f"function {function} {list(overloads)}")

    def _optional_select(self, args: list[str]) -> _Code:
        return _Code(f"_optsel({args[0]}, {args[1]})", True)


def translate(
    checked: Any,
    library: Mapping[str, LibraryOverload],
    roots: frozenset[str],
    messages: Mapping[str, type[Message]],
) -> Native | None:
    """The checked expression as a Python function, or None when the engine must run it."""
    translator = _Translator(checked, library, roots, messages)
    try:
        if translator.type_of(checked.expr) == "bytes":
            raise Unsupported("bytes result")  # the engine hands bytes back as a list of ints
        code = translator.translate(checked.expr, {})
        if not _plain_type(checked.type_map.get(checked.expr.id)):
            code = _Code(f"_engine_result({code.text})", True)
    except Unsupported:
        return None
    source = f"lambda V, M: {code.text}"
    namespace = {**HELPERS, **translator.constants}
    try:
        run = eval(compile(source, "<cel>", "eval"), namespace)
    except (SyntaxError, RecursionError, MemoryError):
        return None
    return Native(run, frozenset(translator.used_roots), source)

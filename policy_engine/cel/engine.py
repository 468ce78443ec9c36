"""The one CEL engine adapter: compile once, evaluate many.

The engine is Google's C++ CEL runtime through `cel-expr-python` (chosen on measurements,
see docs/BENCHMARKS.md). Everything engine-specific stays in this module: the rest of the
project sees `Environment`, `Program`, `Activation` and the two error types.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cel_expr_python import cel
from cel_expr_python.ext import ext_bindings, ext_math, ext_optional, ext_strings
from google.api.expr.v1alpha1 import checked_pb2
from google.protobuf import any_pb2, message_factory
from google.protobuf.message import Message

from policy_engine.cel.cost import CostReport, estimate
from policy_engine.cel.hoist import HOISTED, BoundActivation, Calls, hoist
from policy_engine.cel.native import Fallback, Native, NativeError, translate
from policy_engine.cel.schema import (
    MESSAGES,
    VARIABLES,
    Variable,
    descriptor_pool_for_env,
    full_name,
)

Activation = BoundActivation  # opaque to callers

_POSITION = re.compile(r"<input>:(\d+):(\d+): (.*?)(?:\n|$)")
_UNDECLARED = re.compile(r"undeclared reference to '([^']+)'")


class CelError(Exception):
    """Base of the errors this adapter raises."""


class CelCompileError(CelError):
    """Parse or type error; line and column are 1-based within the expression."""

    def __init__(self, message: str, line: int = 1, column: int = 1, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column
        self.detail = detail


class CelEvalError(CelError):
    """The expression evaluated to an error (no such key, division by zero, ...)."""


@dataclass(frozen=True)
class Overload:
    id: str
    params: tuple[str, ...]
    returns: str
    impl: Callable[..., Any]
    member: bool = False
    # Never fails on arguments of its declared types: the translation may then use Python's
    # own `&&`/`||` around the call instead of CEL's error-absorbing form.
    total: bool = False


@dataclass(frozen=True)
class FunctionDef:
    """A custom function: `name` may be namespaced (`pii.any`)."""

    name: str
    overloads: tuple[Overload, ...]
    doc: str


def cel_type(type_name: str) -> Any:
    """Map the schema's type notation to an engine type."""
    scalar = {
        "string": cel.Type.STRING,
        "int": cel.Type.INT,
        "double": cel.Type.DOUBLE,
        "bool": cel.Type.BOOL,
        "timestamp": cel.Type.TIMESTAMP,
        "duration": cel.Type.DURATION,
        "dyn": cel.Type.DYN,
    }
    if type_name in scalar:
        return scalar[type_name]
    if type_name.startswith("list<"):
        return cel.Type.List(cel_type(type_name[5:-1]))
    if type_name.startswith("map<string,"):
        return cel.Type.Map(cel.Type.STRING, cel_type(type_name[len("map<string,") : -1]))
    return cel.Type(full_name(type_name))


_RESULT_KINDS: dict[str, frozenset[str]] = {
    "bool": frozenset({"bool"}),
    "string": frozenset({"string"}),
    "number": frozenset({"int", "uint", "double"}),
    "int": frozenset({"int", "uint"}),
    "list<string>": frozenset({"list(string)", "list"}),
    "any": frozenset(),
}


def _parse_engine_error(text: str) -> CelCompileError:
    match = _POSITION.search(text)
    if match is None:
        return CelCompileError(text.strip().removeprefix("INVALID_ARGUMENT: "), detail=text)
    message = match.group(3).removesuffix(" [INVALID_ARGUMENT]")
    return CelCompileError(message, int(match.group(1)), int(match.group(2)), detail=text)


def _located(error: CelCompileError, source: str) -> CelCompileError:
    """Point an undeclared dotted reference at its first character, not at a dot inside it."""
    match = _UNDECLARED.match(error.message)
    if match is None:
        return error
    name = match.group(1)
    error.message = f"undeclared reference to '{name}'"
    lines = source.split("\n")
    for number, line in enumerate(lines, start=1):
        column = line.find(name)
        if column >= 0:
            error.line, error.column = number, column + 1
            break
    return error


def _checked(compiled: Any) -> Any:
    wrapper = any_pb2.Any()
    wrapper.ParseFromString(compiled.serialize())
    checked = checked_pb2.CheckedExpr()
    checked.ParseFromString(wrapper.value)
    return checked


class Program:
    """A compiled, type-checked expression.

    It runs as translated Python when cel/native.py covers everything it uses, otherwise in
    the engine (`native` tells which).
    """

    __slots__ = ("_calls", "_checked", "_compiled", "_native", "result_type", "source")

    def __init__(
        self,
        source: str,
        compiled: Any,
        result_type: str,
        calls: Calls,
        checked: Any,
        native: Native | None = None,
    ) -> None:
        self.source = source
        self._compiled = compiled  # with library calls on request data hoisted (cel/hoist.py)
        self._calls = calls
        self._checked = checked  # the expression as written
        self._native = native
        self.result_type = result_type

    @property
    def native(self) -> bool:
        return self._native is not None

    def _run_native(self, native: Native, activation: Activation) -> Any:
        if not native.roots <= activation.names:
            missing = sorted(native.roots - activation.names)[0]
            raise CelEvalError(f'No value with name "{missing}" found in Activation')
        try:
            return native.run(activation.values, activation.memo)
        except NativeError as error:
            raise CelEvalError(str(error)) from None
        except Fallback:
            raise
        except RecursionError:
            raise CelEvalError("expression nested too deeply") from None
        except Exception as error:
            raise CelEvalError(f"{type(error).__name__}: {error}") from None

    def eval(self, activation: Activation) -> Any:
        native = self._native
        if native is not None:
            try:
                return self._run_native(native, activation)
            except Fallback:
                pass  # a value the translation does not reproduce: the engine decides
        self._calls.current = activation
        try:
            value = self._compiled.eval(activation.engine)
        except RuntimeError as error:  # engine limits (iteration budget) raise instead
            raise CelEvalError(str(error)) from None
        if value.type() == cel.Type.ERROR:
            raise CelEvalError(str(value.value()))
        return value.plain_value()

    def variables(self) -> frozenset[str]:
        """The declared variables the expression reads."""
        return frozenset(r.name for r in self._checked.reference_map.values() if not r.overload_id)

    def cost(self) -> CostReport:
        """Worst-case size of the values it builds and work it does (see cel/cost.py)."""
        return estimate(self._checked)

    def test(self, activation: Activation) -> bool:
        """A condition's value; CelEvalError for an error or a non-bool."""
        native = self._native
        if native is not None:
            try:
                result = self._run_native(native, activation)
            except Fallback:
                result = None  # the engine decides, below
            else:
                if result is True or result is False:
                    return result
                raise CelEvalError(f"expected a bool, got {_kind_name(result)}")
        self._calls.current = activation
        try:
            value = self._compiled.eval(activation.engine)
        except RuntimeError as error:
            raise CelEvalError(str(error)) from None
        result = value.value()
        if result is True or result is False:
            return result  # the hot path: one call into the engine, no type inspection
        if value.type() == cel.Type.ERROR:
            raise CelEvalError(str(result))
        raise CelEvalError(f"expected a bool, got {value.type().name().lower()}")


def _kind_name(value: Any) -> str:
    names = {str: "string", int: "int", float: "double", bytes: "bytes", type(None): "null_type"}
    if type(value) in names:
        return names[type(value)]
    return (
        "map" if isinstance(value, Mapping) else "list" if isinstance(value, list) else type(value).__name__
    )


class Environment:
    """Declared variables, message types and functions; compiles expressions against them."""

    def __init__(
        self,
        functions: Sequence[FunctionDef],
        variables: Sequence[Variable] = VARIABLES,
        hoist_slots: int = 0,
        native: bool = True,
    ) -> None:
        """`hoist_slots`: how many distinct library calls on request data may be hoisted
        (cel/hoist.py); each slot is a declared function, about 0.1 ms to create. `native`:
        translate expressions to Python where cel/native.py can (off: the engine runs all)."""
        pool = descriptor_pool_for_env()
        declared = {v.name: cel_type(v.type) for v in variables}
        self._roots = tuple(declared)
        self._calls = Calls(hoist_slots)
        self._overloads = {o.id: o.impl for f in functions for o in f.overloads if not o.member}
        self._function_names = {o.id: f.name for f in functions for o in f.overloads}
        self._library = {
            o.id: (f.name, o.impl, o.member, o.params, o.total) for f in functions for o in f.overloads
        }
        self._native = native
        self._message_types = {full_name(name): cls for name, cls in message_classes().items()}
        decls = [
            cel.FunctionDecl(
                f.name,
                [
                    cel.Overload(
                        o.id,
                        cel_type(o.returns),
                        [cel_type(p) for p in o.params],
                        is_member=o.member,
                        impl=o.impl,
                    )
                    for o in f.overloads
                ],
            )
            for f in functions
        ]
        decls.extend(
            cel.FunctionDecl(
                f"{HOISTED}{slot}",
                [cel.Overload(f"{HOISTED}{slot}_", cel.Type.DYN, [], impl=self._calls.slot(slot))],
            )
            for slot in range(hoist_slots)
        )
        self._env = cel.NewEnv(
            descriptor_pool=pool,
            variables=declared,
            functions=decls,
            extensions=[
                ext_strings.ExtStrings(),
                ext_optional.ExtOptional(),
                ext_math.ExtMath(),
                ext_bindings.ExtBindings(),
            ],
        )

    def compile(self, source: str, result: str = "any") -> Program:
        """Parse and type-check; `result` is the kind of value the caller needs."""
        if HOISTED in source:
            raise CelCompileError(f"{HOISTED} is reserved", 1, source.index(HOISTED) + 1)
        try:
            compiled = self._env.compile(source)
        except RuntimeError as error:
            raise _located(_parse_engine_error(str(error)), source) from None
        type_name = compiled.return_type().name().lower()
        allowed = _RESULT_KINDS[result]
        if allowed and type_name not in allowed and type_name != "dyn":
            raise CelCompileError(f"expression must be {result}, but it is {type_name}")
        checked = _checked(compiled)
        runnable = compiled
        rewritten = source
        if self._calls.slots:
            names, roots = self._function_names, self._roots
            rewritten = hoist(source, checked, self._overloads, names, roots, self._calls)
        if rewritten != source:
            try:
                runnable = self._env.compile(rewritten)
            except RuntimeError:
                runnable = compiled  # never expected: the original still runs, through the bridge
        native = None
        if self._native and estimate(checked).problem is None:
            # Only expressions with a static bound on their work: the engine's iteration
            # budget stays the second line of defence for the rest.
            native = translate(checked, self._library, frozenset(self._roots), self._message_types)
        return Program(source, runnable, type_name, self._calls, checked, native)

    def pattern_error(self, pattern: str) -> str | None:
        """Why the engine's RE2 rejects a matches() pattern, or None: checked once at load."""
        literal = json.dumps(pattern).replace("\\/", "/")
        try:
            self.compile(f'"".matches({literal})', "bool").eval(self.activation({}))
        except CelError as error:
            return str(error).removeprefix("INVALID_ARGUMENT: ").removesuffix(" [INVALID_ARGUMENT]")
        return None

    def activation(
        self, values: Mapping[str, Any], engine_values: Callable[[], Mapping[str, Any]] | None = None
    ) -> Activation:
        """`values` as translated expressions read them; `engine_values`, when given, builds
        them as the engine needs them (protobuf messages), only if an expression needs it."""
        return BoundActivation(values, self._engine_activation, engine_values)

    def _engine_activation(self, values: Mapping[str, Any]) -> Any:
        return self._env.Activation(dict(values))


def message_classes() -> dict[str, type[Message]]:
    """Python classes of the environment's message types, by short name."""
    pool = descriptor_pool_for_env()
    return {
        m.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name(m.name)))
        for m in MESSAGES
    }

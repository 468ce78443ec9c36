"""Library calls on request data, evaluated in Python instead of through the engine's bridge.

cel-expr-python 0.1.3 keeps a reference to every argument it converts for a Python function
and never releases it: `pii.any(llm.prompt)` leaks the prompt's text on every evaluation (about
12 KB per decision over the example policies, found by bench/soak.py). So at compile time each
library call whose arguments are constants or fields of the declared variables
(`pii.card(llm.prompt)`, `net.in_cidr(source.address, ["10.0.0.0/8"])`) is replaced in the
source by `__pe_hoistedN()`, one of a pool of functions without arguments (the bridge also
keeps each call's argument tuple, and only the empty tuple is shared), and Python resolves the
arguments from the activation's own values. The pool is sized by the compiler from the policy
files; calls beyond it go through the bridge as written.

Evaluation stays lazy (a call that `&&` skips is never made), an exception in the function is
still an evaluation error, and one activation computes each distinct call once: the same
`pii.card(llm.prompt)` in three policies scans the prompt once. Calls on comprehension
variables (`llm.messages.exists(m, pii.any(m.content))`) cannot be resolved this way and still
go through the bridge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from policy_engine.cel.source_text import code_positions

HOISTED = "__pe_hoisted"

Arg = tuple[str, Any]  # ("const", value) or ("path", ("llm", "prompt"))

_SCALAR_KINDS = ("string_value", "int64_value", "uint64_value", "double_value", "bool_value")


class BoundActivation:
    """The values of one evaluation context, the calls made on them, and the engine's
    activation built from them on first need (translated programs never need it)."""

    __slots__ = ("_build", "_built", "_converted", "_engine_values", "memo", "names", "values")

    def __init__(
        self,
        values: Mapping[str, Any],
        build: Callable[[Mapping[str, Any]], Any],
        engine_values: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        """`engine_values`: the values in the engine's representation, when `values` are not
        (built on first need, like the engine activation itself)."""
        self.values = values
        self.memo: dict[Any, Any] = {}
        self.names = frozenset(values)
        self._build = build
        self._engine_values = engine_values
        self._converted: Mapping[str, Any] | None = None
        self._built: Any = None

    def engine_values(self) -> Mapping[str, Any]:
        if self._converted is None:
            self._converted = self.values if self._engine_values is None else self._engine_values()
        return self._converted

    @property
    def engine(self) -> Any:
        """The engine's own activation (cel-expr-python), for programs the translation left to it."""
        if self._built is None:
            self._built = self._build(self.engine_values())
        return self._built


@dataclass(frozen=True)
class CallSite:
    overload: str
    impl: Callable[..., Any]
    args: tuple[Arg, ...]


def _resolve(values: Mapping[str, Any], arg: Arg) -> Any:
    kind, value = arg
    if kind == "const":
        return list(value) if isinstance(value, tuple) else value
    current = values[value[0]]
    for name in value[1:]:
        current = current[name] if isinstance(current, Mapping) else getattr(current, name)
    if not isinstance(current, str | bytes | int | float | bool):
        current = list(current)  # a repeated field, as the engine would pass a list
    return current


class Calls:
    """The hoisted call sites of one environment and the activation being evaluated."""

    def __init__(self, slots: int = 0) -> None:
        self.slots = slots
        self._sites: list[CallSite] = []
        self._index: dict[tuple[str, tuple[Arg, ...]], int] = {}
        self.current: BoundActivation | None = None

    def register(self, site: CallSite) -> int | None:
        """The slot of this call, or None when the pool is full."""
        key = (site.overload, site.args)
        if key not in self._index:
            if len(self._sites) >= self.slots:
                return None
            self._index[key] = len(self._sites)
            self._sites.append(site)
        return self._index[key]

    def slot(self, index: int) -> Callable[[], Any]:
        return lambda: self.invoke(index)

    def invoke(self, index: int) -> Any:
        activation = self.current
        if activation is None:
            raise RuntimeError("a hoisted call was evaluated without an activation")
        memo = activation.memo
        if index in memo:
            return memo[index]
        site = self._sites[index]
        result = site.impl(*(_resolve(activation.values, arg) for arg in site.args))
        memo[index] = result
        return result


def _constant(expr: Any) -> tuple[bool, Any]:
    kind = expr.WhichOneof("expr_kind")
    if kind == "const_expr":
        which = expr.const_expr.WhichOneof("constant_kind")
        if which in _SCALAR_KINDS:
            return True, getattr(expr.const_expr, which)
        return False, None
    if kind == "list_expr":
        items = [_constant(e) for e in expr.list_expr.elements]
        if all(ok for ok, _ in items):
            return True, tuple(v for _, v in items)
    return False, None


def _plain_type(type_: Any) -> bool:
    """Types whose Python value from a protobuf field is what the engine would pass."""
    which = type_.WhichOneof("type_kind") if type_ is not None else None
    if which == "primitive":
        return True
    if which == "list_type":
        return bool(type_.list_type.elem_type.WhichOneof("type_kind") == "primitive")
    return False


class _Finder:
    def __init__(
        self, checked: Any, overloads: Mapping[str, Callable[..., Any]], roots: frozenset[str]
    ) -> None:
        self._types = checked.type_map
        self._refs = checked.reference_map
        self._overloads = overloads
        self._roots = roots
        self.found: list[tuple[int, CallSite]] = []  # (call node id, site)

    def _path(self, expr: Any, scope: frozenset[str]) -> tuple[str, ...] | None:
        fields: list[str] = []
        node = expr
        while node.WhichOneof("expr_kind") == "select_expr" and not node.select_expr.test_only:
            operand = node.select_expr.operand
            operand_type = self._types.get(operand.id)
            if operand_type is None or operand_type.WhichOneof("type_kind") != "message_type":
                return None
            fields.append(node.select_expr.field)
            node = operand
        if node.WhichOneof("expr_kind") != "ident_expr":
            return None
        root = node.ident_expr.name
        if root not in self._roots or root in scope:
            return None
        if not _plain_type(self._types.get(expr.id)):
            return None
        return (root, *reversed(fields))

    def _arg(self, expr: Any, scope: frozenset[str]) -> Arg | None:
        ok, value = _constant(expr)
        if ok:
            return ("const", value)
        path = self._path(expr, scope)
        return ("path", path) if path is not None else None

    def walk(self, expr: Any, scope: frozenset[str]) -> None:
        kind = expr.WhichOneof("expr_kind")
        if kind == "call_expr":
            call = expr.call_expr
            reference = self._refs.get(expr.id)
            overload = reference.overload_id[0] if reference is not None and reference.overload_id else ""
            if overload in self._overloads and not call.HasField("target"):
                args = [self._arg(a, scope) for a in call.args]
                if all(a is not None for a in args):
                    site = CallSite(overload, self._overloads[overload], tuple(a for a in args if a))
                    self.found.append((expr.id, site))
                    return
            if call.HasField("target"):
                self.walk(call.target, scope)
            for arg in call.args:
                self.walk(arg, scope)
        elif kind == "select_expr":
            self.walk(expr.select_expr.operand, scope)
        elif kind == "list_expr":
            for element in expr.list_expr.elements:
                self.walk(element, scope)
        elif kind == "struct_expr":
            for entry in expr.struct_expr.entries:
                if entry.HasField("map_key"):
                    self.walk(entry.map_key, scope)
                self.walk(entry.value, scope)
        elif kind == "comprehension_expr":
            comp = expr.comprehension_expr
            self.walk(comp.iter_range, scope)
            self.walk(comp.accu_init, scope)
            inner = scope | {comp.iter_var, comp.accu_var}
            if getattr(comp, "iter_var2", ""):
                inner |= {comp.iter_var2}
            for part in (comp.loop_condition, comp.loop_step, comp.result):
                self.walk(part, inner)


def _closing(source: str, open_at: int) -> int | None:
    """Index just past the parenthesis matching the one at `open_at`."""
    depth = 0
    for index in code_positions(source[open_at:]):
        char = source[open_at + index]
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return open_at + index + 1
    return None


def _span(source: str, position: int, function: str) -> tuple[int, int] | None:
    if not 0 <= position < len(source) or source[position] != "(":
        return None
    before = source[:position].rstrip()
    if not before.endswith(function):
        return None
    start = len(before) - len(function)
    if start > 0 and (source[start - 1].isalnum() or source[start - 1] in "._"):
        return None
    end = _closing(source, position)
    return None if end is None else (start, end)


def hoist(
    source: str,
    checked: Any,
    overloads: Mapping[str, Callable[..., Any]],
    functions: Mapping[str, str],
    roots: Sequence[str],
    calls: Calls,
) -> str:
    """The source with every hoistable library call replaced by `__pe_hoistedN()`.

    `overloads` maps overload ids to implementations, `functions` overload ids to the function
    name as written (`pii.any`), `roots` the declared variables.
    """
    finder = _Finder(checked, overloads, frozenset(roots))
    finder.walk(checked.expr, frozenset())
    replacements: list[tuple[int, int, str]] = []
    for node_id, site in finder.found:
        span = _span(source, checked.source_info.positions.get(node_id, -1), functions[site.overload])
        if span is None:
            continue
        slot = calls.register(site)
        if slot is not None:
            replacements.append((*span, f"{HOISTED}{slot}()"))
    for start, end, text in sorted(replacements, reverse=True):
        source = source[:start] + text + source[end:]
    return source

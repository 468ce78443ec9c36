"""A static worst-case cost bound of a checked CEL expression.

The engine bounds parse depth (32), source size (100,000 code points) and comprehension
iterations, and its RE2 regular expressions run in linear time. What it does not bound is how
big the values an expression builds can get: `cel.bind(x, llm.prompt, x + x)` nested a few
times, `s.replace("", llm.prompt)` or a `map` that copies the prompt once per message turn a
1 MiB request into gigabytes and hang a worker. So every expression gets, at load, an upper
bound of the largest value it can build and of the work it can do, for a request of `INPUT`
bytes, and is rejected when either is over the limit.

Bounds are plain numbers (bytes, or elements: a list of n elements counts n), computed for the
worst case: every request-derived string, list or map is `INPUT` long, and each element of such
a list is as large as the whole. A comprehension's work is the larger of (iterations times the work of
its body with the element taken as small) and (work of its body with the element as large as
the range): the elements of a list share its size, so a body that is linear in its element
costs no more than one pass over the list.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.api.expr.v1alpha1 import checked_pb2

INPUT = float(1 << 20)  # a request's bytes the pipeline reads (the default max body size)
SMALL = 1024.0  # values from policy files and telemetry (tenant, backends): bounded by config
SCALAR = 8.0
MAX_VALUE = 64 * INPUT  # the largest value an expression may build
MAX_WORK = 256 * INPUT  # the work one evaluation may do: a few hundred passes over the request
MAX_PATTERN = 2048  # characters of a matches() pattern

# Root variables whose strings, lists and maps come from the request (untrusted, large).
REQUEST_ROOTS = frozenset({"request", "llm", "source", "destination", "context"})


@dataclass(frozen=True)
class Bound:
    size: float  # bytes or elements of the value
    work: float  # steps to compute it, children included


@dataclass(frozen=True)
class CostReport:
    size: float
    work: float
    patterns: tuple[str, ...] = ()  # literal matches() patterns, to be compiled once at load
    dynamic_patterns: int = 0  # matches() whose pattern is computed (e.g. from the request)
    # (function, argument index, literal) of library calls given string literals, or lists of
    # them: checked once at load (a bad CIDR block or version range would fail every request).
    literals: tuple[tuple[str, int, str], ...] = ()

    @property
    def problem(self) -> str | None:
        if self.dynamic_patterns:
            return (
                "matches() needs a string literal pattern: a computed pattern is compiled on every "
                "evaluation and may come from the request"
            )
        long = [p for p in self.patterns if len(p) > MAX_PATTERN]
        if long:
            return f"matches() pattern of {len(long[0])} characters (limit {MAX_PATTERN})"
        if self.size > MAX_VALUE:
            return (
                f"expression can build a value of {_human(self.size)} from a {_human(INPUT)} request "
                f"(limit {_human(MAX_VALUE)}): avoid repeated concatenation or replace() with growing text"
            )
        if self.work > MAX_WORK:
            return (
                f"expression cost is too high: up to {self.work / INPUT:.3g} passes over a "
                f"{_human(INPUT)} request (limit {MAX_WORK / INPUT:.0f}); nested loops over request data, "
                "or a loop body that scans the whole request, grow with the square of its size"
            )
        return None


def _string_literals(expr: Any) -> list[str]:
    """The string literal `expr` is, or the ones a list literal holds."""
    kind = expr.WhichOneof("expr_kind")
    if kind == "const_expr" and expr.const_expr.WhichOneof("constant_kind") == "string_value":
        return [expr.const_expr.string_value]
    if kind == "list_expr":
        return [text for element in expr.list_expr.elements for text in _string_literals(element)]
    return []


def _human(value: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


_SIZED_PRIMITIVES = {checked_pb2.Type.STRING, checked_pb2.Type.BYTES}


class _Estimator:
    def __init__(self, checked: Any) -> None:
        self._types: Mapping[int, Any] = checked.type_map
        self.peak = 0.0  # the largest value built anywhere, not only the result
        self.patterns: list[str] = []
        self.dynamic_patterns = 0
        self.literals: list[tuple[str, int, str]] = []

    def bound(self, expr: Any, scope: Mapping[str, float]) -> Bound:
        result = self._bound(expr, scope)
        self.peak = max(self.peak, result.size)
        return result

    def _sized(self, node_id: int) -> bool:
        """True when the node's type has a size (string, bytes, list, map, message, dyn)."""
        kind = self._types.get(node_id)
        if kind is None:
            return True
        which = kind.WhichOneof("type_kind")
        if which == "primitive":
            return bool(kind.primitive in _SIZED_PRIMITIVES)
        return which not in ("well_known", "wrapper", "null")

    def _leaf(self, node_id: int, size: float) -> Bound:
        return Bound(size if self._sized(node_id) else SCALAR, 1.0)

    def _bound(self, expr: Any, scope: Mapping[str, float]) -> Bound:
        kind = expr.WhichOneof("expr_kind")
        if kind == "const_expr":
            const = expr.const_expr
            which = const.WhichOneof("constant_kind")
            if which == "string_value":
                return Bound(float(len(const.string_value)) or 1.0, 1.0)
            if which == "bytes_value":
                return Bound(float(len(const.bytes_value)) or 1.0, 1.0)
            return Bound(SCALAR, 1.0)
        if kind == "ident_expr":
            name = expr.ident_expr.name
            if name in scope:
                return self._leaf(expr.id, scope[name])
            root = name.split(".", 1)[0]
            return self._leaf(expr.id, INPUT if root in REQUEST_ROOTS else SMALL)
        if kind == "select_expr":
            operand = self.bound(expr.select_expr.operand, scope)
            if expr.select_expr.test_only:
                return Bound(SCALAR, operand.work + 1)
            return Bound(operand.size if self._sized(expr.id) else SCALAR, operand.work + 1)
        if kind == "list_expr":
            parts = [self.bound(e, scope) for e in expr.list_expr.elements]
            return Bound(sum(p.size for p in parts) + len(parts), sum(p.work for p in parts) + len(parts) + 1)
        if kind == "struct_expr":
            parts = []
            for entry in expr.struct_expr.entries:
                parts.append(self.bound(entry.value, scope))
                if entry.HasField("map_key"):
                    parts.append(self.bound(entry.map_key, scope))
            return Bound(sum(p.size for p in parts) + 1, sum(p.work for p in parts) + 1)
        if kind == "call_expr":
            return self._call(expr, scope)
        if kind == "comprehension_expr":
            return self._comprehension(expr.comprehension_expr, scope)
        return Bound(SCALAR, 1.0)

    def _call(self, expr: Any, scope: Mapping[str, float]) -> Bound:
        call = expr.call_expr
        target = self.bound(call.target, scope) if call.HasField("target") else None
        args = [self.bound(a, scope) for a in call.args]
        operands = ([target] if target else []) + args
        function = call.function
        if function in ("_==_", "_!=_") and len(operands) == 2:
            # Lengths first, then at most the shorter: `llm.model == "m"` is no pass over the
            # request, and a chain of them is no loop.
            work = sum(o.work for o in operands) + min(o.size for o in operands)
        else:
            work = sum(o.work for o in operands) + sum(o.size for o in operands)
        if function == "matches" and call.args:
            pattern = call.args[-1]
            if (
                pattern.WhichOneof("expr_kind") == "const_expr"
                and pattern.const_expr.WhichOneof("constant_kind") == "string_value"
            ):
                self.patterns.append(pattern.const_expr.string_value)
            else:
                self.dynamic_patterns += 1
        if "." in function and not call.HasField("target"):  # a namespaced library function
            for index, arg in enumerate(call.args):
                self.literals.extend((function, index, text) for text in _string_literals(arg))
        if not self._sized(expr.id):
            return Bound(SCALAR, work + 1)
        if function == "_+_" and len(args) == 2:
            size = args[0].size + args[1].size
        elif function == "replace" and target is not None and len(args) >= 2:
            # Each position of the text (an empty pattern matches between characters) may
            # become the replacement.
            size = target.size * (args[1].size + 1)
        elif function in ("join", "format") and target is not None:
            size = target.size * (1 + (args[0].size if args else 0)) + sum(a.size for a in args)
        elif function == "_?_:_" and len(args) == 3:
            size = max(args[1].size, args[2].size)
        else:
            # Accessors, indexing and string functions return at most what they were given.
            size = max((o.size for o in operands), default=SCALAR)
        return Bound(size, work + size)

    def _comprehension(self, comp: Any, scope: Mapping[str, float]) -> Bound:
        iter_range = self.bound(comp.iter_range, scope)
        init = self.bound(comp.accu_init, scope)
        is_bind = (
            comp.iter_range.WhichOneof("expr_kind") == "list_expr" and not comp.iter_range.list_expr.elements
        )
        if is_bind:  # cel.bind: no iterations, the accumulator is the bound value
            result = self.bound(comp.result, {**scope, comp.accu_var: init.size})
            return Bound(result.size, iter_range.work + init.work + result.work)
        count = iter_range.size
        loop_vars = [comp.iter_var, *([comp.iter_var2] if getattr(comp, "iter_var2", "") else [])]

        def step(element: float, accu: float) -> Bound:
            inner = {**scope, comp.accu_var: accu, **dict.fromkeys(loop_vars, element)}
            condition = self.bound(comp.loop_condition, inner)
            body = self.bound(comp.loop_step, inner)
            return Bound(body.size, condition.work + body.work)

        # The accumulator grows by one step's increment per iteration (map, filter) or stays a
        # scalar (all, exists). The engine appends to it in place, so a step's work is taken
        # with a small accumulator; its final size bounds the result.
        growth_small = max(step(SCALAR, init.size).size - init.size, 0.0)
        growth_large = max(step(iter_range.size, init.size).size - init.size, 0.0)
        accu = init.size + max(count * growth_small, growth_large)
        loop_work = max(count * step(SCALAR, SCALAR).work, step(iter_range.size, SCALAR).work)
        result = self.bound(comp.result, {**scope, comp.accu_var: accu})
        return Bound(result.size, iter_range.work + init.work + loop_work + result.work)


def estimate(checked: Any) -> CostReport:
    """Worst-case size and work of a `cel.expr.CheckedExpr`."""
    estimator = _Estimator(checked)
    bound = estimator.bound(checked.expr, {})
    return CostReport(
        size=estimator.peak,
        work=bound.work,
        patterns=tuple(estimator.patterns),
        dynamic_patterns=estimator.dynamic_patterns,
        literals=tuple(dict.fromkeys(estimator.literals)),
    )

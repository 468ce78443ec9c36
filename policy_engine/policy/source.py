"""YAML documents that remember where every value came from (file:line:col)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

Path = tuple[str | int, ...]


@dataclass(frozen=True, order=True)
class Position:
    file: str
    line: int  # 1-based
    column: int  # 1-based

    def __str__(self) -> str:
        # Line 0: the whole file or directory (a problem of what is missing, not of a line).
        return f"{self.file}:{self.line}:{self.column}" if self.line else self.file


@dataclass(frozen=True)
class Issue:
    """One problem in a policy directory, located for the author."""

    position: Position
    message: str
    policy: str = ""
    rule: str = ""

    def __str__(self) -> str:
        where = "/".join(part for part in (self.policy, self.rule) if part)
        return f"{self.position}: {where + ': ' if where else ''}{self.message}"


class SourceError(Exception):
    def __init__(self, issues: list[Issue]) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues


@dataclass
class Document:
    file: str
    index: int
    data: Any
    nodes: dict[Path, Node] = field(repr=False)
    text_lines: list[str] = field(repr=False)

    def position(self, path: Path) -> Position:
        """Where the value at `path` starts, or its nearest existing parent."""
        for end in range(len(path), -1, -1):
            node = self.nodes.get(path[:end])
            if node is not None:
                return Position(self.file, node.start_mark.line + 1, node.start_mark.column + 1)
        return Position(self.file, 1, 1)

    def key_position(self, path: Path) -> Position:
        """Where the key of the value at `path` is written (for unknown-field errors)."""
        node = self.nodes.get((*path, "<key>"))
        if node is not None:
            return Position(self.file, node.start_mark.line + 1, node.start_mark.column + 1)
        return self.position(path)

    def problem_position(self, path: Path, kind: str) -> Position:
        """Where a validation problem of pydantic's `kind` at `path` is: the key of a field
        the schema does not have, else the value."""
        return self.key_position(path) if kind == "extra_forbidden" else self.position(path)

    def expression_position(self, path: Path, line: int, column: int) -> Position:
        """Map a 1-based line:col inside a CEL string to the file, through YAML's folding."""
        node = self.nodes.get(path)
        if not isinstance(node, ScalarNode):
            return self.position(path)
        value_lines = str(node.value).split("\n")
        index = sum(len(text) + 1 for text in value_lines[: line - 1]) + column - 1
        literal = node.style == "|"
        previous_blank = 0
        segments = self._segments(node)
        for number, (row, start, text) in enumerate(segments):
            if not literal and not text.strip() and number > 0:
                previous_blank += 1
                continue
            if number > 0:
                index -= 1 if literal else max(1, previous_blank)
            previous_blank = 0
            length = _value_length(text, node.style)
            if index < length or number == len(segments) - 1:
                return Position(self.file, row + 1, start + _raw_offset(text, max(0, index), node.style) + 1)
            index -= length
        return self.position(path)

    def _segments(self, node: ScalarNode) -> list[tuple[int, int, str]]:
        """The raw text of a scalar line by line: (row, column where its content starts, content)."""
        start, end = node.start_mark, node.end_mark
        if node.style in ("|", ">"):
            rows = range(start.line + 1, min(end.line + 1, len(self.text_lines)))
            lines = [self.text_lines[row] for row in rows]
            # The first content line sets the block's indentation (the end mark may sit on
            # the next, less indented key).
            indents = [len(text) - len(text.lstrip(" ")) for text in lines if text.strip()]
            indent = indents[0] if indents else 0
            return [(row, indent, text[indent:]) for row, text in zip(rows, lines, strict=True)]
        quote = 1 if node.style in ('"', "'") else 0
        segments = []
        for row in range(start.line, min(end.line + 1, len(self.text_lines))):
            text = self.text_lines[row]
            begin = start.column + quote if row == start.line else len(text) - len(text.lstrip())
            segments.append((row, begin, text[begin:]))
        return segments


_ESCAPE_LENGTHS = {"x": 4, "u": 6, "U": 10}  # \xHH, \uHHHH, \UHHHHHHHH; any other escape is 2


def _raw_offset(text: str, index: int, style: str | None, raw: int = 0) -> int:
    """Where the value's `index`-th character (counted from `raw`) is written in a line of a
    quoted scalar: an escape (a backslash one in double quotes, `''` in single ones) is one
    character of the value and more of the file."""
    if style not in ('"', "'"):
        return raw + index
    for _ in range(index):
        if raw >= len(text):
            break
        if style == '"' and text[raw] == "\\":
            raw += _ESCAPE_LENGTHS.get(text[raw + 1 : raw + 2], 2)
        elif style == "'" and text.startswith("''", raw):
            raw += 2
        else:
            raw += 1
    return raw


def _value_length(text: str, style: str | None) -> int:
    """How many characters of the value a line of a (quoted) scalar holds."""
    if style not in ('"', "'"):
        return len(text)
    count = raw = 0
    while raw < len(text):
        raw = _raw_offset(text, 1, style, raw)
        count += 1
    return count


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so a rule named `no` or `on` stays a string."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _first in "tTfF":
    _Loader.yaml_implicit_resolvers.setdefault(_first, []).insert(
        0, ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"))
    )

_constructor = yaml.constructor.SafeConstructor()
# Far above any real policy file (the examples have ~1,000 values; a 260-rule policy ~3,000),
# far below what exhausts memory: a few lines of nested aliases expand to billions of values.
MAX_VALUES = 200_000
MAX_DEPTH = 64


class _TooLarge(Exception):
    def __init__(self, node: Node, message: str) -> None:
        super().__init__(message)
        self.node = node


def _convert(node: Node, path: Path, nodes: dict[Path, Node], issues: list[Issue], file: str) -> Any:
    if len(nodes) >= MAX_VALUES:
        raise _TooLarge(node, f"more than {MAX_VALUES} values in one document (aliases expanding?)")
    if len(path) > MAX_DEPTH:
        raise _TooLarge(node, f"nested deeper than {MAX_DEPTH} levels")
    nodes[path] = node
    if isinstance(node, ScalarNode):
        return _constructor.construct_object(node, deep=True)
    if isinstance(node, SequenceNode):
        return [_convert(child, (*path, i), nodes, issues, file) for i, child in enumerate(node.value)]
    if isinstance(node, MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _constructor.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) and key is not None:
                mark = key_node.start_mark
                issues.append(Issue(Position(file, mark.line + 1, mark.column + 1), "keys must be scalars"))
                continue
            if key in result:
                mark = key_node.start_mark
                issues.append(Issue(Position(file, mark.line + 1, mark.column + 1), f"duplicate key {key!r}"))
            nodes[(*path, str(key), "<key>")] = key_node
            result[key] = _convert(value_node, (*path, str(key)), nodes, issues, file)
        return result
    return None


def _yaml_message(error: yaml.YAMLError) -> str:
    """One line: PyYAML's own text repeats the position over several lines."""
    if isinstance(error, yaml.MarkedYAMLError) and (error.problem or error.context):
        return " ".join(" ".join(p for p in (error.context, error.problem) if p).split())
    return " ".join(str(error).split())


def decode(file: str, raw: bytes) -> str:
    """The file's text; SourceError at the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        # In characters, as every other column: the text before the byte, decoded.
        position = _position_after(file, raw[: error.start].decode("utf-8", "replace"))
        byte = raw[error.start : error.start + 1].hex()
        message = f"not UTF-8: byte 0x{byte} ({error.reason}); save the file as UTF-8"
        raise SourceError([Issue(position, message)]) from None


def _position_after(file: str, before: str) -> Position:
    """The position of the character that follows `before`, the file's text up to it."""
    return Position(file, before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1)


def parse_documents(file: str, text: str) -> Iterator[Document]:
    """Every YAML document of a file, with positions; SourceError on syntax errors."""
    lines = text.splitlines()
    try:
        composed = list(yaml.compose_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        position = Position(file, mark.line + 1, mark.column + 1) if mark else Position(file, 1, 1)
        raise SourceError([Issue(position, f"YAML syntax error: {_yaml_message(error)}")]) from None
    except yaml.reader.ReaderError as error:  # a character YAML forbids: located by its offset
        position = _position_after(file, text[: error.position])
        character = f"#x{error.character:04x}" if isinstance(error.character, int) else repr(error.character)
        message = f"YAML error: unacceptable character {character}: {error.reason}"
        raise SourceError([Issue(position, message)]) from None
    except yaml.YAMLError as error:
        message = " ".join(str(error).split())
        raise SourceError([Issue(Position(file, 1, 1), f"YAML error: {message}")]) from None
    except RecursionError:  # the YAML reader recurses once per level of nesting
        raise SourceError([Issue(Position(file, 1, 1), "YAML error: nested too deeply")]) from None
    issues: list[Issue] = []
    documents: list[Document] = []
    for index, root in enumerate(composed):
        if root is None:
            continue
        nodes: dict[Path, Node] = {}
        try:
            data = _convert(root, (), nodes, issues, file)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            position = Position(file, mark.line + 1, mark.column + 1) if mark else Position(file, 1, 1)
            issues.append(Issue(position, f"YAML error: {_yaml_message(error)}"))
            continue
        except _TooLarge as error:
            mark = error.node.start_mark
            issues.append(Issue(Position(file, mark.line + 1, mark.column + 1), f"YAML error: {error}"))
            continue
        documents.append(Document(file, index, data, nodes, lines))
    if issues:
        raise SourceError(issues)
    yield from documents

"""Reading CEL source text: what is code, and what is inside a string literal or a comment."""

from __future__ import annotations

from collections.abc import Iterator


def skip_string(source: str, i: int) -> int:
    """The index just past the string literal starting at `i` (raw, triple-quoted or not)."""
    raw = i > 0 and source[i - 1] in "rR"
    quote = source[i : i + 3] if source[i : i + 3] in ('"""', "'''") else source[i]
    i += len(quote)
    while i < len(source) and source[i : i + len(quote)] != quote:
        i += 2 if source[i] == "\\" and not raw else 1
    return i + len(quote)


def code_positions(source: str) -> Iterator[int]:
    """Indices of the characters outside string literals and `//` comments."""
    i, n = 0, len(source)
    while i < n:
        if source[i] in "\"'":
            i = skip_string(source, i)
        elif source.startswith("//", i):
            newline = source.find("\n", i)
            i = n if newline < 0 else newline
        else:
            yield i
            i += 1

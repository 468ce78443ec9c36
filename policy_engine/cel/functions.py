"""The CEL function library: names, signatures and docs, bound to `library` implementations.

Patterns are compiled once (module constants, named term lists at bundle load, inline term
lists in a bounded cache) because a per-evaluation `matches()` costs ~18 µs a message.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from functools import lru_cache

from policy_engine.cel import library
from policy_engine.cel.engine import FunctionDef, Overload

S, B, INT, D = "string", "bool", "int", "double"
LS = "list<string>"


@lru_cache(maxsize=256)
def _inline_matcher(terms: tuple[str, ...]) -> library.TermMatcher:
    return library.TermMatcher(terms)


@lru_cache(maxsize=1024)
def _glob_regex(pattern: str) -> Callable[[str], object]:
    import re

    return re.compile(fnmatch.translate(pattern)).match


def glob_match(pattern: str, value: str) -> bool:
    return _glob_regex(pattern)(value) is not None


def _named(term_lists: Mapping[str, library.TermMatcher], name: str) -> library.TermMatcher:
    matcher = term_lists.get(name)
    if matcher is None:
        raise ValueError(f"no term list named {name!r}")
    return matcher


def _single(
    name: str,
    doc: str,
    params: tuple[str, ...],
    returns: str,
    impl: Callable[..., object],
    total: bool = False,
) -> FunctionDef:
    overload_id = (
        name.replace(".", "_") + "_" + "_".join(p.replace("<", "_").replace(">", "") for p in params)
    )
    return FunctionDef(name, (Overload(overload_id, params, returns, impl, total=total),), doc)


def library_functions(term_lists: Mapping[str, library.TermMatcher]) -> list[FunctionDef]:
    """Every custom function, with the bundle's named term lists bound in."""

    def terms_any(text: str, name: str) -> bool:
        return _named(term_lists, name).any(text)

    def terms_find(text: str, name: str) -> list[str]:
        return _named(term_lists, name).find(text)

    return [
        _single(
            "pii.email",
            "Text contains an e-mail address.",
            (S,),
            B,
            lambda t: bool(library.find_emails(t)),
            total=True,
        ),
        _single(
            "pii.phone",
            "Text contains a phone number.",
            (S,),
            B,
            lambda t: bool(library.find_phones(t)),
            total=True,
        ),
        _single(
            "pii.card",
            "Text contains a payment card number (Luhn-checked).",
            (S,),
            B,
            lambda t: bool(library.find_cards(t)),
            total=True,
        ),
        _single(
            "pii.iban",
            "Text contains an IBAN (mod-97 checked).",
            (S,),
            B,
            lambda t: bool(library.find_ibans(t)),
            total=True,
        ),
        _single(
            "pii.ip",
            "Text contains an IPv4 or IPv6 address.",
            (S,),
            B,
            lambda t: bool(library.find_ips(t)),
            total=True,
        ),
        _single(
            "pii.any",
            "Text contains any kind of PII above.",
            (S,),
            B,
            lambda t: bool(library.pii_kinds(t)),
            total=True,
        ),
        _single(
            "pii.kinds",
            "Sorted kinds of PII found: card, email, iban, ip, phone.",
            (S,),
            LS,
            library.pii_kinds,
            total=True,
        ),
        FunctionDef(
            "terms.any",
            (
                Overload("terms_any_string_string", (S, S), B, terms_any),
                Overload(
                    "terms_any_string_list", (S, LS), B, lambda t, terms: _inline_matcher(tuple(terms)).any(t)
                ),
            ),
            "Text contains a term of the named term list (or of an inline list); case-insensitive, "
            "whole words, through invisible characters and fullwidth forms (NFKC).",
        ),
        FunctionDef(
            "terms.find",
            (
                Overload("terms_find_string_string", (S, S), LS, terms_find),
                Overload(
                    "terms_find_string_list",
                    (S, LS),
                    LS,
                    lambda t, terms: _inline_matcher(tuple(terms)).find(t),
                ),
            ),
            "The distinct terms found, lower-cased, in order of first appearance.",
        ),
        _single(
            "injection.score",
            "Prompt-injection likelihood 0..1 from heuristics.",
            (S,),
            D,
            library.injection_score,
            total=True,
        ),
        _single(
            "injection.detected",
            f"injection.score(text) >= {library.INJECTION_THRESHOLD}.",
            (S,),
            B,
            library.injection_detected,
            total=True,
        ),
        _single(
            "tokens.estimate",
            "Estimated token count of a text.",
            (S,),
            INT,
            library.estimate_tokens,
            total=True,
        ),
        FunctionDef(
            "net.in_cidr",
            (
                Overload("net_in_cidr_string_string", (S, S), B, library.in_cidr),
                Overload(
                    "net_in_cidr_string_list",
                    (S, LS),
                    B,
                    lambda ip, cidrs: any(library.in_cidr(ip, c) for c in cidrs),
                ),
            ),
            "IP address inside a CIDR block (or any of a list).",
        ),
        _single(
            "semver.compare", "-1, 0 or 1 by semantic-version order.", (S, S), INT, library.semver_compare
        ),
        _single(
            "semver.satisfies",
            "Version meets a constraint such as '>=1.2.0, <2.0.0'.",
            (S, S),
            B,
            library.semver_satisfies,
        ),
        FunctionDef(
            "globs.match",
            (
                Overload("globs_match_string_string", (S, S), B, glob_match),
                Overload(
                    "globs_match_list_string",
                    (LS, S),
                    B,
                    lambda patterns, v: any(glob_match(p, v) for p in patterns),
                ),
            ),
            "Shell-style glob match ('llama-3-*'); a list matches when any pattern does.",
        ),
    ]


def _version(text: str) -> object:
    return library.semver_compare(text, "0.0.0")


def _constraint(text: str) -> object:
    return library.semver_satisfies("0.0.0", text)


# Arguments that, given as a literal, can be checked once at load: a bad one would make every
# evaluation fail (and with on_error: deny, deny every request the rule sees).
_LITERAL_CHECKS: dict[tuple[str, int], Callable[[str], object]] = {
    ("net.in_cidr", 0): lambda text: library.in_cidr(text, "0.0.0.0/0"),
    ("net.in_cidr", 1): lambda text: library.in_cidr("0.0.0.0", text),
    ("semver.compare", 0): _version,
    ("semver.compare", 1): _version,
    ("semver.satisfies", 0): _version,
    ("semver.satisfies", 1): _constraint,
}


def literal_problem(function: str, index: int, text: str) -> str | None:
    """Why a library function would fail on this literal argument every time, or None."""
    check = _LITERAL_CHECKS.get((function, index))
    if check is None:
        return None
    try:
        check(text)
    except ValueError as error:
        return f"{function}(): {error}"
    return None

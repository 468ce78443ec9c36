"""Credentials a request carries, so that no error message, log line or span repeats them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key", "cookie", "set-cookie"}
)
CREDENTIAL_QUERY = frozenset({"key", "api_key", "api-key", "apikey", "access_token", "token", "auth"})
REDACTED = "<redacted>"
_MIN_LENGTH = 4  # shorter values would blank out ordinary words of a message


def credentials(
    headers: Mapping[str, str], query: Mapping[str, str], key_headers: Iterable[str] = ()
) -> list[str]:
    """The secret values of a request: credential headers (and the token after their scheme)
    and credential query parameters, longest first."""
    names = CREDENTIAL_HEADERS.union(key_headers)
    found: set[str] = set()
    for name, value in headers.items():
        if name in names:
            found.add(value)
            found.add(value.partition(" ")[2].strip())
    for name, value in query.items():
        if name.lower() in CREDENTIAL_QUERY:
            found.add(value)
    return sorted((v for v in found if len(v) >= _MIN_LENGTH), key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text

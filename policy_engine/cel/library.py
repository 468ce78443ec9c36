"""Pure-Python implementations of the custom CEL function library.

Every function here is deterministic, side-effect free and safe to call on arbitrary
(attacker-controlled) text: the patterns are written so that the regex engine cannot
backtrack catastrophically, and all numeric candidates are re-validated in Python
(Luhn, ISO 13616 mod-97, :mod:`ipaddress`) rather than trusted on shape alone.

The registration into the CEL engine lives elsewhere (:mod:`policy_engine.cel.functions`);
this module only knows about ``str``, ``int``, ``float``, ``bool`` and lists of strings so
that it stays independent of any CEL runtime.
"""

import functools
import hashlib
import ipaddress
import math
import re
import string
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Final, NamedTuple

__all__ = (
    "INJECTION_THRESHOLD",
    "TermMatcher",
    "estimate_tokens",
    "find_cards",
    "find_emails",
    "find_ibans",
    "find_ips",
    "find_phones",
    "iban_valid",
    "in_cidr",
    "injection_score",
    "injection_signals",
    "luhn_valid",
    "pii_kinds",
    "semver_compare",
    "semver_satisfies",
    "stable_bucket",
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# ---------------------------------------------------------------------------
# PII finders
# ---------------------------------------------------------------------------

# The look-behind stops the engine from retrying at every character of a long run of
# local-part characters, which keeps the scan linear. Domain labels cannot contain dots,
# so the label boundaries are fixed and the label loop cannot backtrack exponentially.
_EMAIL_RE: Final = re.compile(
    r"""
    (?<![\w.%+\-])
    [A-Za-z0-9_%+\-][A-Za-z0-9._%+\-]*
    @
    (?:[A-Za-z0-9\-]+\.)+
    [A-Za-z]{2,63}
    (?![\w\-])
    """,
    re.VERBOSE,
)

# Digit groups must be separated (except after "+CC" or "(area)"), otherwise a run of
# digits could be split into groups in exponentially many ways. The look-arounds refuse to
# start or stop in the middle of a longer numeric token, so a 16-digit card or a date-time
# is never cut down to a phone-sized piece of itself. ":" is refused afterwards to keep
# "2024-01-05 12:30" from turning into a phone number.
_PHONE_CANDIDATE_RE: Final = re.compile(
    r"""
    (?<![\w+/])(?<![0-9][ .\-])
    (?:
        \+[0-9]{7,15}
      |
        (?:\+[0-9]{1,4}[ .\-]?)?
        (?:\([0-9]{1,5}\)[ .\-]?)?
        [0-9]{1,8}
        (?:[ .\-][0-9]{1,8}){0,6}
    )
    (?![\w+/:]|[ .\-][0-9])
    """,
    re.VERBOSE,
)
_DIGITS_RE: Final = re.compile(r"[0-9]+")
_DOTTED_QUAD_RE: Final = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_YEAR_RE: Final = re.compile(r"(?:19|20)[0-9]{2}")

# A maximal run of digit groups separated by single spaces or dashes; card windows are
# then chosen on group boundaries in Python, where Luhn can arbitrate between them.
_DIGIT_RUN_RE: Final = re.compile(r"(?<!\w)[0-9]+(?:[ \-][0-9]+)*(?!\w)")

# Either the compact electronic form or the paper form in blocks of four. The paper form
# may swallow a following upper-case word ("... 7034 WITH"), which find_ibans trims off.
_IBAN_CANDIDATE_RE: Final = re.compile(
    r"""
    (?<![A-Za-z0-9])
    [A-Za-z]{2}[0-9]{2}
    (?:
        [A-Za-z0-9]{11,30}
      |
        (?:\ [A-Za-z0-9]{4}){2,7}(?:\ [A-Za-z0-9]{1,4})?
    )
    (?![A-Za-z0-9])
    """,
    re.VERBOSE,
)
_IBAN_COMPACT_RE: Final = re.compile(r"[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}")

# Lengths from the SWIFT IBAN registry; a wrong length for a known country is a far more
# common typo than one that mod-97 alone would catch.
_IBAN_LENGTHS: Final = MappingProxyType(
    {
        "AT": 20,
        "BE": 16,
        "CH": 21,
        "CZ": 24,
        "DE": 22,
        "DK": 18,
        "ES": 24,
        "FI": 18,
        "FR": 27,
        "GB": 22,
        "GR": 27,
        "HU": 28,
        "IE": 22,
        "IT": 27,
        "LU": 20,
        "NL": 18,
        "NO": 15,
        "PL": 28,
        "PT": 25,
        "RO": 24,
        "SE": 24,
        "SK": 24,
    }
)

# Look-arounds keep "1.2.3.4.5" (a version) and "v1.2.3.4" from yielding an address.
_IPV4_CANDIDATE_RE: Final = re.compile(r"(?<!\w)(?<![0-9]\.)[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?!\w|\.[0-9])")
# Deliberately loose (hex groups and colons, optional dotted-quad tail): ipaddress is the
# judge, the regex only has to find every plausible span.
_IPV6_CANDIDATE_RE: Final = re.compile(
    r"""
    (?<![\w:.])
    (?:[0-9A-Fa-f]{0,4}:){2,8}
    (?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9A-Fa-f]{1,4})?
    (?![\w:]|\.[0-9])
    """,
    re.VERBOSE,
)


def find_emails(text: str) -> list[str]:
    """E-mail addresses (pragmatic ASCII syntax, not full RFC 5322) in order of appearance."""
    return [match.group(0) for match in _EMAIL_RE.finditer(text)]


def luhn_valid(digits: str) -> bool:
    """Whether ``digits`` passes the Luhn (mod 10) check.

    Spaces and dashes are ignored so that a card can be checked as printed. Anything else
    that is not an ASCII digit, or fewer than two digits, makes the result ``False``.
    """
    compact = digits.replace(" ", "").replace("-", "")
    if len(compact) < 2 or not (compact.isascii() and compact.isdigit()):
        return False
    total = 0
    for index, char in enumerate(reversed(compact)):
        value = ord(char) - ord("0")
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _is_card_number(digits: str) -> bool:
    # A single repeated digit (e.g. all zeros) passes Luhn but is a placeholder, not a card.
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_valid(digits)


def find_cards(text: str) -> list[str]:
    """Payment card numbers: 13-19 digits, optionally grouped by spaces or dashes, Luhn-valid.

    Within a run of digit groups the leftmost, then longest, Luhn-valid window is reported.
    Every group but the last must have at least four digits, as in all real card layouts
    (4-4-4-4, 4-6-5, 4-6-4, 4-4-4-4-3); this keeps "order 12 4111 1111 1111 1111" from
    absorbing the "12".
    """
    found: list[str] = []
    for run in _DIGIT_RUN_RE.finditer(text):
        groups = [
            (run.start() + group.start(), run.start() + group.end())
            for group in _DIGITS_RE.finditer(run.group(0))
        ]
        index = 0
        while index < len(groups):
            best_end: int | None = None
            digits = ""
            for end in range(index, len(groups)):
                start_pos, end_pos = groups[end]
                digits += text[start_pos:end_pos]
                if len(digits) > 19:
                    break
                if _is_card_number(digits):
                    best_end = end
                if end_pos - start_pos < 4:
                    break
            if best_end is None:
                index += 1
                continue
            found.append(text[groups[index][0] : groups[best_end][1]])
            index = best_end + 1
    return found


def _looks_like_date(groups: list[str]) -> bool:
    if len(groups) != 3:
        return False
    first, second, third = (int(group) for group in groups)
    if len(groups[0]) == 4:
        return 1 <= second <= 12 and 1 <= third <= 31
    if len(groups[0]) <= 2 and len(groups[1]) <= 2 and len(groups[2]) in (2, 4):
        return 1 <= first <= 31 and 1 <= second <= 31
    return False


def _plausible_phone(candidate: str) -> bool:
    groups = _DIGITS_RE.findall(candidate)
    digits = "".join(groups)
    if not 7 <= len(digits) <= 15:
        return False
    if candidate.startswith("+") or "(" in candidate:
        # An explicit country or area code is a strong enough signal on its own.
        return True
    if len(groups) < 2:
        # A bare run of digits is more often an id, an amount or an order number.
        return False
    if any(len(group) == 1 for group in groups[1:]):
        # Single-digit groups after the first read like lists or versions ("1 2 3 4 5 6 7").
        return False
    if max(len(group) for group in groups) < 3 and len(groups) < 5:
        # Only the French-style "06 12 34 56 78" is all pairs; "10.30-11.45" is a time range.
        return False
    if _DOTTED_QUAD_RE.fullmatch(candidate):
        return False
    if _looks_like_date(groups) or all(_YEAR_RE.fullmatch(group) for group in groups):
        return False
    return not _is_card_number(digits)


def find_phones(text: str) -> list[str]:
    """Phone numbers: "+CC ..." international or separator-grouped national, 7-15 digits.

    This is a heuristic tuned against false positives: plain digit runs, years, dates,
    year ranges, dotted quads and Luhn-valid card-length numbers are not reported.
    """
    return [
        match.group(0) for match in _PHONE_CANDIDATE_RE.finditer(text) if _plausible_phone(match.group(0))
    ]


def iban_valid(s: str) -> bool:
    """Whether ``s`` is an IBAN per ISO 13616: shape, per-country length and mod-97 == 1.

    Whitespace anywhere is ignored and letters may be in either case. Countries without a
    known length must have 15-34 characters. Check digits 00, 01 and 99 are never issued
    and are rejected even though some of them satisfy the arithmetic.
    """
    compact = "".join(s.split())
    if not compact.isascii():
        return False
    compact = compact.upper()
    if not _IBAN_COMPACT_RE.fullmatch(compact):
        return False
    expected = _IBAN_LENGTHS.get(compact[:2])
    if expected is not None and len(compact) != expected:
        return False
    if compact[2:4] in ("00", "01", "99"):
        return False
    rearranged = compact[4:] + compact[:4]
    numeric = "".join(str(int(char, 36)) for char in rearranged)
    return int(numeric) % 97 == 1


def find_ibans(text: str) -> list[str]:
    """IBANs, compact or in space-separated blocks of four, validated by :func:`iban_valid`."""
    found: list[str] = []
    pos = 0
    while (match := _IBAN_CANDIDATE_RE.search(text, pos)) is not None:
        parts = match.group(0).split(" ")
        hit: str | None = None
        # The paper form may have swallowed a trailing word or the start of the next IBAN,
        # so shorter prefixes on block boundaries are tried as well.
        for count in range(len(parts), 0, -1):
            prefix = " ".join(parts[:count])
            if iban_valid(prefix):
                hit = prefix
                break
        if hit is None:
            # An IBAN could start inside a rejected candidate ("XX12 DE89 3704 ...").
            pos = match.start() + 1
            continue
        found.append(hit)
        pos = match.start() + len(hit)
    return found


def _ipv6_or_none(candidate: str) -> str | None:
    # The loose candidate regex can pick up a sentence's trailing colon ("at fe80::1: ...").
    options = [candidate]
    if candidate.endswith(":") and not candidate.endswith("::"):
        options.append(candidate[:-1])
    for option in options:
        if option == "::":
            # The unspecified address is almost always prose or code ("a :: b"), not PII.
            continue
        try:
            ipaddress.IPv6Address(option)
        except ValueError:
            continue
        return option
    return None


def find_ips(text: str) -> list[str]:
    """IPv4 and IPv6 addresses (validated by :mod:`ipaddress`) in order of appearance.

    An IPv4 address embedded in an IPv6 one ("::ffff:10.1.2.3") is reported once, as IPv6.
    """
    hits: list[tuple[int, str]] = []
    v6_spans: list[tuple[int, int]] = []
    for match in _IPV6_CANDIDATE_RE.finditer(text):
        address = _ipv6_or_none(match.group(0))
        if address is not None:
            hits.append((match.start(), address))
            v6_spans.append((match.start(), match.start() + len(address)))
    for match in _IPV4_CANDIDATE_RE.finditer(text):
        if any(start <= match.start() < end for start, end in v6_spans):
            continue
        try:
            ipaddress.IPv4Address(match.group(0))
        except ValueError:
            continue
        hits.append((match.start(), match.group(0)))
    hits.sort(key=lambda hit: hit[0])
    return [address for _, address in hits]


def pii_kinds(text: str) -> list[str]:
    """The sorted kinds of PII present: a subset of card, email, iban, ip, phone."""
    finders: tuple[tuple[str, Callable[[str], list[str]]], ...] = (
        ("card", find_cards),
        ("email", find_emails),
        ("iban", find_ibans),
        ("ip", find_ips),
        ("phone", find_phones),
    )
    return sorted(kind for kind, finder in finders if finder(text))


# ---------------------------------------------------------------------------
# Term lists
# ---------------------------------------------------------------------------


class TermMatcher:
    """Case-insensitive whole-word matcher for a fixed list of terms.

    Terms and text are compared after :meth:`str.casefold` so that, e.g., "STRASSE" finds
    "straße". A word boundary is only required at an end of a term that is a word
    character, so "kill" does not match "skill" while "c++" still matches "c++ code".
    Whitespace inside a term matches any run of whitespace. All terms share one compiled
    alternation, longest first, so that "credit card dump" wins over "credit card".
    """

    __slots__ = ("_display", "_pattern", "_terms")

    def __init__(self, terms: Sequence[str]) -> None:
        if isinstance(terms, str):
            # A bare string is a Sequence[str] too, but matching its characters is never meant.
            raise TypeError("TermMatcher expects a sequence of terms, not a single string")
        display: dict[str, str] = {}
        for term in terms:
            words = term.split()
            if not words:
                continue
            key = " ".join(words).casefold()
            display.setdefault(key, " ".join(words).lower())
        self._display: Final = MappingProxyType(display)
        self._terms: Final = tuple(display.values())
        self._pattern: Final = self._compile(tuple(display)) if display else None

    @staticmethod
    def _compile(keys: Sequence[str]) -> re.Pattern[str]:
        alternatives = []
        for key in sorted(keys, key=len, reverse=True):
            body = r"\s+".join(re.escape(word) for word in key.split(" "))
            head = r"(?<!\w)" if re.match(r"\w", key) else ""
            tail = r"(?!\w)" if re.search(r"\w\Z", key) else ""
            alternatives.append(head + body + tail)
        return re.compile("|".join(alternatives))

    @property
    def terms(self) -> tuple[str, ...]:
        """The distinct, whitespace-normalised, lower-cased terms."""
        return self._terms

    def any(self, text: str) -> bool:
        """Whether any term occurs in ``text``."""
        return self._pattern is not None and self._pattern.search(text.casefold()) is not None

    def find(self, text: str) -> list[str]:
        """The distinct terms found, lower-cased, in order of first appearance."""
        if self._pattern is None:
            return []
        found: dict[str, None] = {}
        for match in self._pattern.finditer(text.casefold()):
            key = " ".join(match.group(0).split())
            found.setdefault(self._display.get(key, key), None)
        return list(found)

    def __repr__(self) -> str:
        return f"TermMatcher({list(self._terms)!r})"


# ---------------------------------------------------------------------------
# Prompt-injection heuristics
# ---------------------------------------------------------------------------

INJECTION_THRESHOLD: Final[float] = 0.5

_IGNORE_INSTRUCTIONS_RE: Final = re.compile(
    r"""
    \b(?:ignore|disregard|forget|skip|override|bypass)\s+
    (?:
        (?:all\s+|any\s+|every\s+)?(?:of\s+)?(?:the\s+|your\s+|my\s+|these\s+|those\s+)?
        (?:previous|prior|above|earlier|preceding|foregoing|former|original|initial)\s+
        (?:instructions?|prompts?|rules|directions?|directives?|guidelines|commands?|context|messages?)\b
      |
        (?:all|everything)\s+(?:above|before|previously|you\s+(?:were|have\s+been)\s+told)\b
      |
        (?:all\s+)?your\s+(?:instructions|rules|guidelines|programming|system\s+prompt)\b
    )
    """,
    re.IGNORECASE | re.VERBOSE,
)
_ROLE_OVERRIDE_RE: Final = re.compile(
    r"""
    \byou\s+are\s+now\b
    | \bact\s+as\s+(?:if|though|an?|the|my)\b
    | \bpretend\s+(?:to\s+be|you\s+are|that\s+you)\b
    | \brole-?play\s+as\b
    | \bfrom\s+now\s+on,?\s+you\b
    | \byour\s+new\s+(?:role|task|instructions|persona)\s+(?:is|are)\b
    """,
    re.IGNORECASE | re.VERBOSE,
)
_PROMPT_REVEAL_RE: Final = re.compile(
    r"""
    \b(?:reveal|print|show|display|output|repeat|recite|dump|leak|expose|paste
        |tell\s+me|give\s+me|write\s+out|spell\s+out)\s+
    (?:me\s+)?(?:all\s+)?(?:of\s+)?
    (?:
        (?:your|the)\s+(?:(?:full|entire|exact|complete|original|initial|hidden|secret|internal)\s+)*
        (?:system\s+(?:prompt|message|instructions?)|(?:initial|original|hidden|secret)\s+(?:prompt|instructions))
      |
        your\s+(?:instructions|prompt|rules|guidelines)
    )\b
    | \bwhat\s+(?:is|was|are|were)\s+your\s+
      (?:system\s+(?:prompt|message|instructions)|(?:initial|original|hidden|secret)\s+(?:prompt|instructions))\b
    """,
    re.IGNORECASE | re.VERBOSE,
)
# "DAN" only counts in capitals: "Dan" is a name far more often than a jailbreak persona.
_JAILBREAK_RE: Final = re.compile(
    r"\bdeveloper\s+mode\b|\bjail-?break(?:s|ing|ed)?\b|\bdo\s+anything\s+now\b|(?-i:\bDAN\b)",
    re.IGNORECASE,
)
_ROLE_TAG_RE: Final = re.compile(
    r"""
    <\|(?:im_start|im_end|im_sep|endoftext|system|assistant|user)\|>
    | \[/?INST\]
    | <</?SYS>>
    | \#{2,}\s*(?:system|instructions?)\s*:
    """,
    re.IGNORECASE | re.VERBOSE,
)
# The look-behind lets the engine scan each run once instead of restarting inside it.
_BASE64_BLOB_RE: Final = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{200,}={0,2}")
_DELIMITER_RUN_RE: Final = re.compile(r"([=#*_~`\-<>|/\\])\1{3,}")
_DELIMITER_RUNS_MIN: Final = 5


def _has_base64_blob(text: str) -> bool:
    # Requiring all three character classes keeps long words, hex digests and runs of one
    # letter from counting; real base64 payloads of this length always mix them.
    for match in _BASE64_BLOB_RE.finditer(text):
        chars = set(match.group(0))
        classes = (string.ascii_uppercase, string.ascii_lowercase, string.digits)
        if all(not chars.isdisjoint(members) for members in classes):
            return True
    return False


def _has_many_delimiters(text: str) -> bool:
    for count, _ in enumerate(_DELIMITER_RUN_RE.finditer(text), start=1):
        if count >= _DELIMITER_RUNS_MIN:
            return True
    return False


def _regex_signal(pattern: re.Pattern[str]) -> Callable[[str], bool]:
    def detect(text: str) -> bool:
        return pattern.search(text) is not None

    return detect


class _Signal(NamedTuple):
    name: str
    weight: float
    detect: Callable[[str], bool]


# Weights >= INJECTION_THRESHOLD mark signals that are damning on their own; the weaker ones
# (benign phrasings exist: "act as a translator", a pasted image, a markdown table) only
# cross the threshold in combination.
_SIGNALS: Final = (
    _Signal("ignore_instructions", 0.8, _regex_signal(_IGNORE_INSTRUCTIONS_RE)),
    _Signal("role_tags", 0.7, _regex_signal(_ROLE_TAG_RE)),
    _Signal("system_prompt_reveal", 0.7, _regex_signal(_PROMPT_REVEAL_RE)),
    _Signal("jailbreak", 0.4, _regex_signal(_JAILBREAK_RE)),
    _Signal("role_override", 0.35, _regex_signal(_ROLE_OVERRIDE_RE)),
    _Signal("base64_blob", 0.3, _has_base64_blob),
    _Signal("repeated_delimiters", 0.2, _has_many_delimiters),
)


def injection_signals(text: str) -> list[str]:
    """Names of the heuristics that fired, strongest first, for decision explanations.

    Possible names: ignore_instructions, role_tags, system_prompt_reveal, jailbreak,
    role_override, base64_blob, repeated_delimiters.
    """
    return [signal.name for signal in _SIGNALS if signal.detect(text)]


def injection_score(text: str) -> float:
    """Prompt-injection likelihood in [0, 1].

    Signals are combined as a noisy-OR, ``1 - prod(1 - weight)``: each one that fires
    independently raises the score, the result can never exceed 1, and a single strong
    signal (weight >= :data:`INJECTION_THRESHOLD`) is enough to reach the threshold.
    """
    miss = 1.0
    for signal in _SIGNALS:
        if signal.detect(text):
            miss *= 1.0 - signal.weight
    return min(1.0, max(0.0, 1.0 - miss))


# ---------------------------------------------------------------------------
# Token estimate
# ---------------------------------------------------------------------------

_TOKEN_PIECE_RE: Final = re.compile(r"\d+|[^\W\d_]+|_+|[^\w\s]+")
# CJK, kana and Hangul start here; BPE vocabularies spend about a token per such character.
_WIDE_CHAR_START: Final = 0x2E80


def _piece_tokens(piece: str) -> int:
    if piece[0].isdigit():
        # cl100k/o200k split digit runs into groups of at most three.
        return math.ceil(len(piece) / 3)
    if piece[0] == "_" or not piece[0].isalpha():
        # Punctuation usually merges into short multi-character tokens ("...", "});").
        return math.ceil(len(piece) / 3)
    if piece.isascii():
        # Common English words are one token; long or rare ones split every ~8 characters.
        return 1 + (len(piece) - 1) // 8
    wide = sum(1 for char in piece if ord(char) >= _WIDE_CHAR_START)
    return wide + math.ceil((len(piece) - wide) / 3)


def estimate_tokens(text: str) -> int:
    """Cheap estimate of the token count under OpenAI's BPE tokenizers (cl100k/o200k).

    Two estimates are taken and the larger one wins, so the result errs slightly high,
    which is the safe side for quotas and context limits:

    * the classic "4 characters per token" rule, ``ceil(len(text) / 4)``;
    * a lexical count: one token per ordinary English word (plus one per further 8
      characters of long words), one per 3 digits, one per up-to-3 adjacent punctuation
      characters, and one per CJK/kana/Hangul character (other non-Latin scripts about
      one per 3 characters), because the character rule badly undercounts those.

    The empty string is 0 tokens; any other text is at least 1.
    """
    if not text:
        return 0
    lexical = sum(_piece_tokens(match.group(0)) for match in _TOKEN_PIECE_RE.finditer(text))
    return max(1, math.ceil(len(text) / 4), lexical)


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _parse_network(cidr: str) -> IPNetwork:
    # Policies reuse a handful of CIDR literals on every request; parsing dominates otherwise.
    try:
        return ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError:
        raise ValueError(f"invalid CIDR block: {cidr!r}") from None


def in_cidr(ip: str, cidr: str) -> bool:
    """Whether ``ip`` lies inside the ``cidr`` block.

    Host bits in the block are tolerated ("10.1.2.3/8" means 10.0.0.0/8), and a bare
    address is a single-host block. IPv4-mapped IPv6 addresses ("::ffff:10.1.2.3") match
    IPv4 blocks and plain IPv4 addresses match ``::ffff:0:0/96`` style blocks, because
    dual-stack proxies report the same client in either form. Otherwise an address of
    the other IP version is simply not inside.

    Raises:
        ValueError: ``ip`` is not an IP address or ``cidr`` is not a CIDR block.
    """
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        raise ValueError(f"invalid IP address: {ip!r}") from None
    network = _parse_network(cidr)
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    if mapped is not None and network.version == 4:
        return mapped in network
    if isinstance(address, ipaddress.IPv4Address) and network.version == 6:
        return ipaddress.IPv6Address(f"::ffff:{address}") in network
    return address in network


# ---------------------------------------------------------------------------
# Semantic versions
# ---------------------------------------------------------------------------

# The regex recommended by semver.org, with [0-9] and re.ASCII so that non-ASCII digits
# (which int() would happily accept) cannot make an invalid version look valid.
_SEMVER_RE: Final = re.compile(
    r"""
    [vV]?
    (0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)
    (?:-((?:0|[1-9][0-9]*|[0-9]*[A-Za-z\-][0-9A-Za-z\-]*)(?:\.(?:0|[1-9][0-9]*|[0-9]*[A-Za-z\-][0-9A-Za-z\-]*))*))?
    (?:\+[0-9A-Za-z\-]+(?:\.[0-9A-Za-z\-]+)*)?
    """,
    re.VERBOSE | re.ASCII,
)
_COMPARATOR_RE: Final = re.compile(r"(>=|<=|==|!=|>|<|=)?\s*(\S+)")


_OPERATORS: Final[MappingProxyType[str, Callable[[int], bool]]] = MappingProxyType(
    {
        ">=": lambda result: result >= 0,
        "<=": lambda result: result <= 0,
        ">": lambda result: result > 0,
        "<": lambda result: result < 0,
        "=": lambda result: result == 0,
        "==": lambda result: result == 0,
        "!=": lambda result: result != 0,
    }
)


class _Version(NamedTuple):
    core: tuple[int, int, int]
    prerelease: tuple[str, ...]


def _parse_semver(version: str) -> _Version:
    match = _SEMVER_RE.fullmatch(version.strip())
    if match is None:
        raise ValueError(f"invalid semantic version: {version!r}")
    major, minor, patch, prerelease = match.groups()
    return _Version(
        (int(major), int(minor), int(patch)),
        tuple(prerelease.split(".")) if prerelease else (),
    )


def _cmp(a: int, b: int) -> int:
    return (a > b) - (a < b)


def _compare_identifiers(a: str, b: str) -> int:
    a_numeric, b_numeric = a.isdigit(), b.isdigit()
    if a_numeric and b_numeric:
        return _cmp(int(a), int(b))
    if a_numeric != b_numeric:
        # Numeric identifiers always have lower precedence than alphanumeric ones.
        return -1 if a_numeric else 1
    # Alphanumeric identifiers compare in ASCII order, which is Python's str order here.
    return (a > b) - (a < b)


def _compare_versions(a: _Version, b: _Version) -> int:
    for left, right in zip(a.core, b.core, strict=True):
        if left != right:
            return _cmp(left, right)
    if not a.prerelease or not b.prerelease:
        # A release outranks any of its pre-releases.
        return _cmp(not a.prerelease, not b.prerelease)
    for left_id, right_id in zip(a.prerelease, b.prerelease, strict=False):
        result = _compare_identifiers(left_id, right_id)
        if result:
            return result
    return _cmp(len(a.prerelease), len(b.prerelease))


def semver_compare(a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` has lower, equal or higher precedence than ``b`` (SemVer 2.0.0).

    A leading "v" is accepted and build metadata ("+build.5") is ignored.

    Raises:
        ValueError: either string is not a semantic version; the message names it.
    """
    return _compare_versions(_parse_semver(a), _parse_semver(b))


def semver_satisfies(version: str, constraint: str) -> bool:
    """Whether ``version`` meets every comma-separated comparator of ``constraint``.

    Operators: ``>=``, ``<=``, ``>``, ``<``, ``=``, ``==`` (same as ``=``) and ``!=``; a
    comparator without an operator means ``=``. Example: ``">=1.2.0, <2.0.0"``. Ranges
    like ``^1.2`` or partial versions like ``>=1.2`` are not supported.

    Raises:
        ValueError: the version, or the constraint or one of its comparators, is invalid.
    """
    parsed = _parse_semver(version)
    if not constraint.strip():
        raise ValueError(f"empty version constraint: {constraint!r}")
    satisfied = True
    for part in constraint.split(","):
        match = _COMPARATOR_RE.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"invalid comparator {part.strip()!r} in constraint {constraint!r}")
        operator, bound = match.group(1) or "=", match.group(2)
        try:
            result = _compare_versions(parsed, _parse_semver(bound))
        except ValueError as error:
            raise ValueError(f"{error} in constraint {constraint!r}") from None
        # No early exit: every comparator is validated even when an earlier one fails.
        satisfied = satisfied and _OPERATORS[operator](result)
    return satisfied


# ---------------------------------------------------------------------------
# Canary buckets
# ---------------------------------------------------------------------------


def stable_bucket(key: str, buckets: int = 10000) -> int:
    """Deterministic bucket in ``[0, buckets)`` for sticky canary assignment.

    The bucket is the first 8 bytes of ``sha256(key)`` (UTF-8) read big-endian, modulo
    ``buckets``. Unlike :func:`hash`, which is salted per process (PYTHONHASHSEED) and may
    change between Python versions, this is stable across processes, hosts, restarts and
    Python versions, so a user stays in the same canary cohort everywhere. The modulo bias
    of a 64-bit value is negligible for any realistic bucket count.

    Raises:
        ValueError: ``buckets`` is smaller than 1.
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    # surrogatepass so that any Python str (even lone surrogates) hashes instead of raising.
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % buckets

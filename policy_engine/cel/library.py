"""Pure-Python implementations of the custom CEL function library.

Every function here is deterministic, side-effect free and safe to call on arbitrary
(attacker-controlled) text: the patterns are written so that the regex engine cannot
backtrack catastrophically, and all numeric candidates are re-validated in Python
(Luhn, ISO 13616 mod-97, :mod:`ipaddress`) rather than trusted on shape alone.

The registration into the CEL engine lives elsewhere (:mod:`policy_engine.cel.functions`);
this module only knows about ``str``, ``int``, ``float``, ``bool`` and lists of strings so
that it stays independent of any CEL runtime.
"""

import bisect
import functools
import hashlib
import ipaddress
import itertools
import math
import re
import string
import unicodedata
from collections.abc import Callable, Iterator, Sequence
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
# Shared prefilters
# ---------------------------------------------------------------------------
#
# These functions run on every request, usually over a few kilobytes of ordinary prose
# that contains nothing to find. In CPython the regex engine costs several nanoseconds per
# character even when a pattern fails at once, while ``in``/``find``/``count`` and
# ``bytes.translate`` are plain C loops (and ``in`` for a single character is a memchr).
# So every finder first rejects the common case with such operations, and the regexes
# below are only run where a hit is possible: on a window around a candidate, or from the
# first position where a match can start. The windows are chosen so that the results are
# exactly those of scanning the whole text with the same patterns.

_DIGITS: Final = "0123456789"


def _has_ascii_digit(text: str) -> bool:
    # A plain loop is twice as fast as any() over a generator for these ten memchr calls.
    for digit in _DIGITS:  # noqa: SIM110
        if digit in text:
            return True
    return False


def _class_table(classes: dict[str, str], default: str) -> bytes:
    table = bytearray(default.encode() * 256)
    for chars, code in classes.items():
        for char in chars:
            table[ord(char)] = ord(code)
    return bytes(table)


# One byte per character of the text (non-ASCII characters are encoded as "?", which is
# classed like any other symbol): d = ASCII digit, p = ".", s = one of " -()", a = ASCII
# letter, x = anything else. Patterns over this map can start with a literal byte, which
# the regex engine scans for faster than for a character class, and skip the look-behinds
# that keep the real patterns from starting inside a token.
_PII_MAP: Final = _class_table(
    {_DIGITS: "d", ".": "p", " -()": "s", string.ascii_letters: "a"},
    "x",
)


# The finders of one decision scan the same prompt (pii.card, pii.iban, pii.phone, pii.ip on
# llm.prompt): its derived forms are computed once. A few entries: texts are not kept long.
@functools.lru_cache(maxsize=4)
def _pii_map(text: str) -> bytes:
    return text.encode("ascii", "replace").translate(_PII_MAP)


@functools.lru_cache(maxsize=4)
def _lowered(text: str) -> str:
    return text.lower()


# Characters a model reads past and a term match would not: zero-width spaces and joiners, the
# soft hyphen, direction marks, the word joiner and invisible operators, variation selectors.
_INVISIBLE = re.compile("[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufe00-\ufe0f\ufeff]")


def fold(text: str) -> str:
    """Text as terms are matched in it: invisible characters removed, compatibility forms
    (fullwidth letters, ligatures) as their plain letters (NFKC), case folded."""
    return unicodedata.normalize("NFKC", _INVISIBLE.sub("", text)).casefold()


@functools.lru_cache(maxsize=4)
def _casefolded(text: str) -> str:
    # ASCII text casefolds as it lowers: the term lists then share the injection
    # heuristics' lower-cased copy (and lower() is twice as fast).
    return _lowered(text) if text.isascii() else fold(text)


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
_LOCAL_PART_RUN_RE: Final = re.compile(r"[A-Za-z0-9._%+\-]*")
# Past this many "@" in one text, one plain scan is cheaper than a window per "@".
_EMAIL_WINDOWS_MAX: Final = 32

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
# Over the PII map: chains of digits in which consecutive digits are at most two of
# " .-()" apart. _CHAIN7_RE and _CHAIN13_RE find the maximal chains with at least 7 or 13
# digits; every phone candidate and every card run lies inside one chain, since their
# separators are a subset of these, and needs that many digits. _CHAIN4_RE only tells
# whether any chain has the four digits that phones, cards and IPv4 addresses all need.
_CHAIN4_RE: Final = re.compile(rb"d(?:[ps]{0,2}d){3}")
_CHAIN7_RE: Final = re.compile(rb"d(?:[ps]{0,2}d){6,}")
_CHAIN13_RE: Final = re.compile(rb"d(?:[ps]{0,2}d){12,}")
_DIGITS_RE: Final = re.compile(r"[0-9]+")
_DOTTED_QUAD_RE: Final = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_YEAR_RE: Final = re.compile(r"(?:19|20)[0-9]{2}")

# A maximal run of digit groups separated by single spaces or dashes; card windows are
# then chosen on group boundaries in Python, where Luhn can arbitrate between them. (The
# first digit is matched before the look-behind so that the pattern starts with a
# character class, which the engine can scan for.) The look-ahead skips runs with fewer
# than 13 digits, which cannot hold a card; the digits after any later start in such a
# run are fewer still, so the runs found are exactly the long runs of a plain scan.
_DIGIT_RUN_RE: Final = re.compile(r"[0-9](?<!\w[0-9])(?=(?:[ \-]?[0-9]){12})[0-9]*(?:[ \-][0-9]+)*(?!\w)")
# Within a run: consecutive groups of four or more digits and the group after them, all
# the groups that a card window starting in the first one can reach.
_CARD_REGION_RE: Final = re.compile(r"[0-9](?<![0-9][0-9])[0-9]{3,}(?:[ \-][0-9]{4,})*(?:[ \-][0-9]+)?")
_CARD_GROUP_SEPARATOR_RE: Final = re.compile(r"[ \-]")
# Luhn: digit characters to their values, plain and doubled (minus 9 when above 9).
_LUHN_DOUBLED: Final = bytes.maketrans(b"0123456789", b"0246813579")
_DIGIT_VALUES: Final = bytes.maketrans(b"0123456789", bytes(range(10)))
_DIGIT_DOUBLED_VALUES: Final = _LUHN_DOUBLED.translate(_DIGIT_VALUES)

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
# Over the PII map: the two digits after two letters that every candidate starts with
# (searched for by the digits, which are rarer than letters).
_IBAN_SHAPE_RE: Final = re.compile(rb"dd(?<=aadd)")
_IBAN_COMPACT_RE: Final = re.compile(r"[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}")
# ISO 13616 reads every letter as a two-digit number: A = 10 ... Z = 35.
_IBAN_LETTER_VALUES: Final = str.maketrans(
    {letter: str(value) for value, letter in enumerate(string.ascii_uppercase, start=10)}
)

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

# Look-arounds keep "1.2.3.4.5" (a version) and "v1.2.3.4" from yielding an address. The
# first digit comes before the look-behinds so that the pattern starts with a character class.
_IPV4_CANDIDATE_RE: Final = re.compile(
    r"[0-9](?<!\w[0-9])(?<![0-9]\.[0-9])[0-9]{0,2}(?:\.[0-9]{1,3}){3}(?!\w|\.[0-9])"
)
# Over the PII map: the shape of a dotted quad, a necessary condition for an IPv4 candidate.
_QUAD_SHAPE_RE: Final = re.compile(rb"dd{0,2}pd{1,3}pd{1,3}pd{1,3}")
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
# The first colon of every IPv6 candidate: preceded by at most four hex digits that the
# candidate's look-behind accepts, and followed by at most four more and a second colon.
# The number of the group that matched (none for zero) is the count of those hex digits.
_IPV6_FIRST_COLON_RE: Final = re.compile(
    r"""
    :
    (?:
        (?<![\w:.]:)
      | (?<=(?<![\w:.])([0-9A-Fa-f]):)
      | (?<=(?<![\w:.])([0-9A-Fa-f]{2}):)
      | (?<=(?<![\w:.])([0-9A-Fa-f]{3}):)
      | (?<=(?<![\w:.])([0-9A-Fa-f]{4}):)
    )
    (?=[0-9A-Fa-f]{0,4}:)
    """,
    re.VERBOSE,
)


def _iter_emails(text: str) -> Iterator[str]:
    at = text.find("@")
    if at < 0:
        return
    # Every address contains exactly one "@", and can only start where the run of
    # local-part characters in front of that "@" starts (the look-behind refuses any later
    # start), so one anchored match per "@" finds what a scan of the whole text would.
    # ``pos`` is where such a scan would be: no address starts between it and ``at``.
    reverse = text[::-1]
    size = len(text)
    pos = 0
    for _ in range(_EMAIL_WINDOWS_MAX):
        run = _LOCAL_PART_RUN_RE.match(reverse, size - at)
        start = at - (run.end() - run.start()) if run is not None else at
        if pos <= start < at and (match := _EMAIL_RE.match(text, start)) is not None:
            yield match.group(0)
            pos = match.end()
        else:
            pos = at + 1
        at = text.find("@", pos)
        if at < 0:
            return
    for match in _EMAIL_RE.finditer(text, pos):
        yield match.group(0)


def find_emails(text: str) -> list[str]:
    """E-mail addresses (pragmatic ASCII syntax, not full RFC 5322) in order of appearance."""
    return list(_iter_emails(text))


def luhn_valid(digits: str) -> bool:
    """Whether ``digits`` passes the Luhn (mod 10) check.

    Spaces and dashes are ignored so that a card can be checked as printed. Anything else
    that is not an ASCII digit, or fewer than two digits, makes the result ``False``.
    """
    compact = digits.replace(" ", "").replace("-", "")
    if len(compact) < 2 or not (compact.isascii() and compact.isdigit()):
        return False
    return _luhn_checksum_ok(compact.encode())


def _luhn_checksum_ok(digits: bytes) -> bool:
    # From the right, every second digit is doubled (minus 9 when above 9); summing the
    # ASCII codes in C and subtracting "0" per digit avoids a Python loop over the digits.
    reverse = digits[::-1]
    total = sum(reverse[0::2]) + sum(reverse[1::2].translate(_LUHN_DOUBLED)) - ord("0") * len(digits)
    return total % 10 == 0


def _is_card_number(digits: str) -> bool:
    # A single repeated digit (e.g. all zeros) passes Luhn but is a placeholder, not a card.
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_valid(digits)


def _luhn_prefix_sums(digits: str) -> tuple[list[int], list[int]]:
    # From a window's last digit leftwards every second digit is doubled, so which digits
    # are doubled depends only on the parity of the last digit's index: sums[parity][i]
    # totals digits[:i] as seen by a window whose last digit has that parity, and
    # digits[start:stop] passes Luhn when sums[(stop - 1) % 2] grows by a multiple of 10.
    plain = digits.encode().translate(_DIGIT_VALUES)
    doubled = digits.encode().translate(_DIGIT_DOUBLED_VALUES)
    last_even, last_odd = bytearray(plain), bytearray(doubled)
    last_even[1::2], last_odd[1::2] = doubled[1::2], plain[1::2]
    return list(itertools.accumulate(last_even, initial=0)), list(itertools.accumulate(last_odd, initial=0))


def _cards_in_region(text: str, region: re.Match[str]) -> Iterator[str]:
    groups = _CARD_GROUP_SEPARATOR_RE.split(region.group(0))
    digits = "".join(groups)
    # offsets[g]: index in digits where group g starts. Groups are one separator apart,
    # and all but the last have at least four digits, so a window can end at any group.
    offsets = list(itertools.accumulate(map(len, groups), initial=0))
    sums = _luhn_prefix_sums(digits)
    region_start = region.start()
    index = 0
    while len(digits) - offsets[index] >= 13:
        start = offsets[index]
        # Windows of 13-19 digits end where offsets[end + 1] is in [start + 13, start + 19];
        # the longest valid one wins, so they are tried longest first.
        shortest = bisect.bisect_left(offsets, start + 13, index + 1)
        longest = bisect.bisect_right(offsets, start + 19, index + 1) - 1
        for stop_index in range(longest, shortest - 1, -1):
            stop = offsets[stop_index]
            totals = sums[(stop - 1) % 2]
            # A single repeated digit (e.g. all zeros) passes Luhn but is a placeholder.
            if (totals[stop] - totals[start]) % 10 == 0 and len(set(digits[start:stop])) > 1:
                yield text[region_start + start + index : region_start + stop + stop_index - 1]
                index = stop_index
                break
        else:
            index += 1


def _iter_cards(text: str, pii_map: bytes) -> Iterator[str]:
    for chain in _CHAIN13_RE.finditer(pii_map):
        # Runs in other chains end before this one starts, so scanning the chain alone
        # (plus the character after it, for the look-ahead) finds the runs a whole-text
        # scan would; a run with fewer than 13 digits cannot hold a card.
        for run in _DIGIT_RUN_RE.finditer(text, chain.start(), chain.end() + 1):
            # A window that does not start with a group of four or more digits is a
            # single group of fewer than 13, so only the regions can hold cards.
            for region in _CARD_REGION_RE.finditer(text, run.start(), run.end()):
                if region.end() - region.start() >= 13:
                    yield from _cards_in_region(text, region)


def find_cards(text: str) -> list[str]:
    """Payment card numbers: 13-19 digits, optionally grouped by spaces or dashes, Luhn-valid.

    Within a run of digit groups the leftmost, then longest, Luhn-valid window is reported.
    Every group but the last must have at least four digits, as in all real card layouts
    (4-4-4-4, 4-6-5, 4-6-4, 4-4-4-4-3); this keeps "order 12 4111 1111 1111 1111" from
    absorbing the "12".
    """
    if not _has_ascii_digit(text):
        return []
    return list(_iter_cards(text, _pii_map(text)))


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


def _iter_phones(text: str, pii_map: bytes) -> Iterator[str]:
    for chain in _CHAIN7_RE.finditer(pii_map):
        # A candidate starts at its first digit or at the "+" or "(" just before it, and
        # the look-ahead reads at most two characters past its last digit. Candidates in
        # other chains are too short to be phones and end before this chain starts.
        chain_start, chain_end = chain.span()
        window = _PHONE_CANDIDATE_RE.finditer(text, max(chain_start - 1, 0), chain_end + 2)
        for match in window:
            if match.start() >= chain_end:
                break
            if match.end() - match.start() >= 7 and _plausible_phone(match.group(0)):
                yield match.group(0)


def find_phones(text: str) -> list[str]:
    """Phone numbers: "+CC ..." international or separator-grouped national, 7-15 digits.

    This is a heuristic tuned against false positives: plain digit runs, years, dates,
    year ranges, dotted quads and Luhn-valid card-length numbers are not reported.
    """
    if not _has_ascii_digit(text):
        return []
    return list(_iter_phones(text, _pii_map(text)))


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
    return int(rearranged.translate(_IBAN_LETTER_VALUES)) % 97 == 1


def _iban_prefix(candidate: str) -> str | None:
    # The paper form may have swallowed a trailing word or the start of the next IBAN, so
    # shorter prefixes on block boundaries are tried as well, longest first. Only prefixes
    # of a length iban_valid can accept are tried at all.
    if candidate[2:4] in ("00", "01", "99"):
        return None
    if " " not in candidate:
        return candidate if iban_valid(candidate) else None
    # Blocks of four, the last one maybe shorter: k < n blocks are candidate[: 5k - 1],
    # with 4k characters; all n blocks have len(candidate) - (n - 1).
    blocks = len(candidate) // 5 + 1
    expected = _IBAN_LENGTHS.get(candidate[:2].upper())
    if expected is not None:
        # Lengths grow with the block count, so at most one prefix has the right one.
        if len(candidate) - (blocks - 1) == expected:
            return candidate if iban_valid(candidate) else None
        count = expected // 4
        if expected % 4 or count >= blocks:
            return None
        prefix = candidate[: 5 * count - 1]
        return prefix if iban_valid(prefix) else None
    for count in range(blocks, 0, -1):
        length = len(candidate) - (blocks - 1) if count == blocks else 4 * count
        if 15 <= length <= 34:
            prefix = candidate if count == blocks else candidate[: 5 * count - 1]
            if iban_valid(prefix):
                return prefix
    return None


def _iter_ibans(text: str, pii_map: bytes) -> Iterator[str]:
    # Every candidate starts with two ASCII letters and two digits ("aadd" on the map), so
    # the candidate pattern is only tried where that shape occurs.
    pos = 0
    while (shape := _IBAN_SHAPE_RE.search(pii_map, pos + 2)) is not None:
        start = shape.start() - 2
        match = _IBAN_CANDIDATE_RE.match(text, start)
        hit = _iban_prefix(match.group(0)) if match is not None else None
        if hit is None:
            # An IBAN could start inside a rejected candidate ("XX12 DE89 3704 ...").
            pos = start + 1
            continue
        yield hit
        pos = start + len(hit)


def find_ibans(text: str) -> list[str]:
    """IBANs, compact or in space-separated blocks of four, validated by :func:`iban_valid`."""
    if not _has_ascii_digit(text):
        return []
    return list(_iter_ibans(text, _pii_map(text)))


# ipaddress takes microseconds per address; texts (and attacks) tend to repeat addresses.
@functools.lru_cache(maxsize=1024)
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


def _iter_ipv6(text: str) -> Iterator[tuple[int, str]]:
    # A candidate can only start at the hex digits in front of its first colon, so it is
    # matched there, at each colon that can be a first one. ``pos`` is where a scan of the
    # whole text would be: just after the previous candidate.
    pos = 0
    search_from = 0
    while (colon := _IPV6_FIRST_COLON_RE.search(text, search_from)) is not None:
        start = colon.start() - (colon.lastindex or 0)
        search_from = colon.end()
        if start < pos or (match := _IPV6_CANDIDATE_RE.match(text, start)) is None:
            continue
        address = _ipv6_or_none(match.group(0))
        if address is not None:
            yield start, address
        pos = search_from = match.end()


@functools.lru_cache(maxsize=1024)
def _ipv4_valid(candidate: str) -> bool:
    try:
        ipaddress.IPv4Address(candidate)
    except ValueError:
        return False
    return True


def _iter_ipv4(text: str, pii_map: bytes) -> Iterator[tuple[int, str]]:
    # No candidate can start before the first dotted-quad shape on the map, so the scan
    # starts there.
    shape = _QUAD_SHAPE_RE.search(pii_map)
    if shape is None:
        return
    for match in _IPV4_CANDIDATE_RE.finditer(text, shape.start()):
        if _ipv4_valid(match.group(0)):
            yield match.start(), match.group(0)


def find_ips(text: str) -> list[str]:
    """IPv4 and IPv6 addresses (validated by :mod:`ipaddress`) in order of appearance.

    An IPv4 address embedded in an IPv6 one ("::ffff:10.1.2.3") is reported once, as IPv6.
    """
    hits: list[tuple[int, str]] = []
    v6_starts: list[int] = []
    v6_ends: list[int] = []
    if ":" in text:
        for start, address in _iter_ipv6(text):
            hits.append((start, address))
            v6_starts.append(start)
            v6_ends.append(start + len(address))
    if _has_ascii_digit(text):
        for start, address in _iter_ipv4(text, _pii_map(text)):
            # The IPv6 spans are disjoint and in order, so at most one can contain start.
            index = bisect.bisect_right(v6_starts, start) - 1
            if index >= 0 and start < v6_ends[index]:
                continue
            hits.append((start, address))
    hits.sort(key=lambda hit: hit[0])
    return [address for _, address in hits]


def pii_kinds(text: str) -> list[str]:
    """The sorted kinds of PII present: a subset of card, email, iban, ip, phone."""
    kinds: list[str] = []
    pii_map = _pii_map(text) if _has_ascii_digit(text) else None
    # Cards, phones and IPv4 addresses all need four digits at most two of " .-()" apart.
    clusters = pii_map is not None and _CHAIN4_RE.search(pii_map) is not None
    if clusters and pii_map is not None and next(_iter_cards(text, pii_map), None) is not None:
        kinds.append("card")
    if next(_iter_emails(text), None) is not None:
        kinds.append("email")
    if pii_map is not None and next(_iter_ibans(text, pii_map), None) is not None:
        kinds.append("iban")
    # An IPv4 address inside an IPv6 one only hides behind an address that counts anyway.
    if (":" in text and next(_iter_ipv6(text), None) is not None) or (
        clusters and pii_map is not None and next(_iter_ipv4(text, pii_map), None) is not None
    ):
        kinds.append("ip")
    if clusters and pii_map is not None and next(_iter_phones(text, pii_map), None) is not None:
        kinds.append("phone")
    return kinds


# ---------------------------------------------------------------------------
# Term lists
# ---------------------------------------------------------------------------

# Above this many gate words, checking each with ``in`` costs more than the one regex scan.
_TERM_GATES_MAX: Final = 8


class TermMatcher:
    """Case-insensitive whole-word matcher for a fixed list of terms.

    Terms and text are compared after :meth:`str.casefold` so that, e.g., "STRASSE" finds
    "straße". A word boundary is only required at an end of a term that is a word
    character, so "kill" does not match "skill" while "c++" still matches "c++ code".
    Whitespace inside a term matches any run of whitespace. All terms share one compiled
    alternation, longest first, so that "credit card dump" wins over "credit card".
    """

    __slots__ = ("_display", "_gates", "_pattern", "_terms")

    def __init__(self, terms: Sequence[str]) -> None:
        if isinstance(terms, str):
            # A bare string is a Sequence[str] too, but matching its characters is never meant.
            raise TypeError("TermMatcher expects a sequence of terms, not a single string")
        display: dict[str, str] = {}
        for term in terms:
            words = term.split()
            if not words:
                continue
            key = fold(" ".join(words))
            display.setdefault(key, " ".join(words).lower())
        self._display: Final = MappingProxyType(display)
        self._terms: Final = tuple(display.values())
        self._pattern: Final = self._compile(tuple(display)) if display else None
        self._gates: Final = self._gate_words(tuple(display))

    @staticmethod
    def _compile(keys: Sequence[str]) -> re.Pattern[str]:
        # Alternatives are grouped by their first character, which is matched before the
        # word-boundary look-behind: the pattern then starts with a literal (or a set of
        # them) that the engine scans for, instead of trying every alternative's
        # look-behind at every position. Longest-first order is kept within each group,
        # and alternatives with different first characters never compete at one position.
        groups: dict[str, list[str]] = {}
        for key in sorted(keys, key=len, reverse=True):
            words = key.split(" ")
            rest = r"\s+".join([re.escape(words[0][1:]), *(re.escape(word) for word in words[1:])])
            tail = r"(?!\w)" if re.search(r"\w\Z", key) else ""
            groups.setdefault(key[0], []).append(rest + tail)
        alternatives = []
        for first, rests in groups.items():
            head = re.escape(first)
            if re.match(r"\w", first):
                head += rf"(?<!\w{re.escape(first)})"
            alternatives.append(f"{head}(?:{'|'.join(rests)})")
        return re.compile("|".join(alternatives))

    @staticmethod
    def _gate_words(keys: Sequence[str]) -> tuple[str, ...] | None:
        # Every word of a term occurs verbatim in any casefolded text the term matches, so
        # a text containing none of the terms' longest words cannot match. Words containing
        # another gate word add nothing.
        longest = {max(key.split(" "), key=len) for key in keys}
        gates = tuple(sorted(word for word in longest if not any(o != word and o in word for o in longest)))
        return gates if len(gates) <= _TERM_GATES_MAX else None

    @property
    def terms(self) -> tuple[str, ...]:
        """The distinct, whitespace-normalised, lower-cased terms."""
        return self._terms

    def _folded_if_may_match(self, text: str) -> str | None:
        if self._pattern is None:
            return None
        folded = _casefolded(text)
        if self._gates is not None and not any(gate in folded for gate in self._gates):
            return None
        return folded

    def any(self, text: str) -> bool:
        """Whether any term occurs in ``text``."""
        folded = self._folded_if_may_match(text)
        return folded is not None and self._pattern is not None and self._pattern.search(folded) is not None

    def find(self, text: str) -> list[str]:
        """The distinct terms found, lower-cased, in order of first appearance."""
        folded = self._folded_if_may_match(text)
        if folded is None or self._pattern is None:
            return []
        found: dict[str, None] = {}
        seen: set[str] = set()
        for match in self._pattern.finditer(folded):
            matched = match.group(0)
            if matched not in seen:
                seen.add(matched)
                key = " ".join(matched.split())
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
# _PROMPT_REVEAL_RE spelled backwards, to be matched on the reversed text. Its matches all
# end with one of a few nouns, while they start with one of sixteen verbs; anchoring the
# reversed pattern at the nouns needs far fewer look-ups. Reversal keeps the language
# (word boundaries look the same in both directions), so a match exists in one exactly
# when it exists in the other; a test checks the two against each other.
_PROMPT_REVEAL_REVERSED_RE: Final = re.compile(
    r"""
    \b
    (?:
        (?:
            (?:tpmorp|egassem|s?noitcurtsni)\s+metsys
          | (?:tpmorp|snoitcurtsni)\s+(?:laitini|lanigiro|neddih|terces)
        )
        (?:\s+(?:lluf|eritne|tcaxe|etelpmoc|lanigiro|laitini|neddih|terces|lanretni))*
        \s+(?:ruoy|eht)
      |
        (?:snoitcurtsni|tpmorp|selur|senilediug)\s+ruoy
    )
    (?:\s+fo)?(?:\s+lla)?(?:\s+em)?
    \s+
    (?:laever|tnirp|wohs|yalpsid|tuptuo|taeper|eticer|pmud|kael|esopxe|etsap
        |em\s+llet|em\s+evig|tuo\s+etirw|tuo\s+lleps)
    \b
    | \b
      (?:(?:tpmorp|egassem|snoitcurtsni)\s+metsys|(?:tpmorp|snoitcurtsni)\s+(?:laitini|lanigiro|neddih|terces))
      \s+ruoy\s+(?:si|saw|era|erew)\s+tahw\b
    """,
    re.IGNORECASE | re.VERBOSE,
)
_PROMPT_REVEAL_NOUNS: Final = ("prompt", "message", "instruction", "rules", "guidelines")
# "DAN" only counts in capitals: "Dan" is a name far more often than a jailbreak persona.
_JAILBREAK_RE: Final = re.compile(
    r"\bdeveloper\s+mode\b|\bjail-?break(?:s|ing|ed)?\b|\bdo\s+anything\s+now\b|(?-i:\bDAN\b)",
    re.IGNORECASE,
)
# The first "#" of a run is matched before the look-behind, which refuses to start inside a
# run, and the rest of the run possessively: otherwise a long run of "#" is retried from
# every position and backtracked through every length, which is quadratic.
_ROLE_TAG_RE: Final = re.compile(
    r"""
    <\|(?:im_start|im_end|im_sep|endoftext|system|assistant|user)\|>
    | \[/?INST\]
    | <</?SYS>>
    | \#(?<!\#\#)\#++\s*(?:system|instructions?)\s*:
    """,
    re.IGNORECASE | re.VERBOSE,
)
# _ROLE_TAG_RE split by the first character of its alternatives.
_ROLE_TAGS_BY_FIRST_CHAR: Final = (
    ("<", re.compile(r"<(?:\|(?:im_start|im_end|im_sep|endoftext|system|assistant|user)\|>|</?SYS>>)", re.I)),
    ("[", re.compile(r"\[/?INST\]", re.I)),
    ("#", re.compile(r"\#(?<!\#\#)\#++\s*(?:system|instructions?)\s*:", re.I)),
)
# The look-behind lets the engine scan each run once instead of restarting inside it.
_BASE64_BLOB_RE: Final = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{200,}={0,2}")
_BASE64_BLOB_MIN: Final = 200
# Base64 characters become "b", everything else (non-ASCII encoded as "?") a space.
_BASE64_MAP: Final = _class_table({string.ascii_letters + _DIGITS + "+/": "b"}, " ")
_DELIMITER_RUN_RE: Final = re.compile(r"([=#*_~`\-<>|/\\])\1{3,}")
_DELIMITER_QUADS: Final = tuple((char, char * 4) for char in "=#*_~`-<>|/\\")
_DELIMITER_RUNS_MIN: Final = 5

# Characters that re.IGNORECASE equates with an ASCII letter although str.lower() maps
# them elsewhere: U+0130 dotted capital I, U+0131 dotless i and U+017F long s (found by
# checking every code point, see the tests). Any other character matches a letter
# case-insensitively only if its lower case is that letter, so a word matched by the
# patterns above appears verbatim, at the same offset, in text.lower() - unless one of
# these is present, or lower() changed the length.
_CASE_TRAPS: Final = ("\u0130", "\u0131", "\u017f")


def _lower_aligned(text: str) -> str | None:
    if text.isascii():
        return _lowered(text)
    if any(trap in text for trap in _CASE_TRAPS):
        return None
    lowered = text.lower()
    return lowered if len(lowered) == len(text) else None


# Every word looked up below, and its letters other than the most frequent ones in English
# (which any text of a few words has). Finding which of those letters a text contains
# costs a memchr each, and a word with a letter the text lacks needs no substring search.
_ANCHOR_WORDS: Final = (
    *("ignore", "disregard", "forget", "skip", "override", "bypass"),
    *("act", "pretend", "role", "roleplay", "role-play", "you", "from", "now", "new"),
    *_PROMPT_REVEAL_NOUNS,
    *("developer", "jail", "do", "anything"),
)
_WORD_LETTERS: Final = MappingProxyType({word: frozenset(word) - set("etaonsr-") for word in _ANCHOR_WORDS})
_ANCHOR_LETTERS: Final = "".join(sorted(set().union(*_WORD_LETTERS.values())))


class _Lowered(NamedTuple):
    text: str
    lowered: str  # text.lower(), offsets aligned with text
    letters: frozenset[str]  # the _ANCHOR_LETTERS in lowered

    @classmethod
    @functools.lru_cache(maxsize=4)
    def of(cls, text: str) -> "_Lowered | None":
        lowered = _lower_aligned(text)
        if lowered is None:
            return None
        return cls(text, lowered, frozenset([letter for letter in _ANCHOR_LETTERS if letter in lowered]))

    def has(self, word: str) -> bool:
        return _WORD_LETTERS[word] <= self.letters and word in self.lowered

    def matches_at(self, pattern: re.Pattern[str], anchors: Sequence[str]) -> bool:
        """For a pattern whose every match starts with one of ``anchors``: try it there only."""
        text, lowered = self.text, self.lowered
        for anchor in anchors:
            if not _WORD_LETTERS[anchor] <= self.letters:
                continue
            index = lowered.find(anchor)
            while index >= 0:
                if pattern.match(text, index) is not None:
                    return True
                index = lowered.find(anchor, index + 1)
        return False


def _ignores_instructions(view: _Lowered) -> bool:
    anchors = ("ignore", "disregard", "forget", "skip", "override", "bypass")
    return view.matches_at(_IGNORE_INSTRUCTIONS_RE, anchors)


def _has_role_tags(text: str) -> bool:
    # Each tag starts with one of three characters, looked for with memchr; the pattern
    # for that character then starts with it as a literal, which the engine scans fast.
    for first, pattern in _ROLE_TAGS_BY_FIRST_CHAR:
        if first in text and pattern.search(text) is not None:
            return True
    return False


def _reveals_prompt(view: _Lowered) -> bool:
    text, lowered = view.text, view.lowered
    size = len(text)
    reverse: str | None = None
    for noun in _PROMPT_REVEAL_NOUNS:
        if not _WORD_LETTERS[noun] <= view.letters:
            continue
        index = lowered.find(noun)
        while index >= 0:
            if reverse is None:
                reverse = text[::-1]
            end = index + len(noun)
            if _PROMPT_REVEAL_REVERSED_RE.match(reverse, size - end) is not None:
                return True
            # "instructions": the reversed match starts at the "s".
            if lowered.startswith("s", end) and _PROMPT_REVEAL_REVERSED_RE.match(reverse, size - end - 1):
                return True
            index = lowered.find(noun, index + 1)
    return False


def _jailbreak(view: _Lowered) -> bool:
    anchors = ["developer", "jail"]
    if view.has("anything") and view.has("now"):
        anchors.append("do")
    if view.matches_at(_JAILBREAK_RE, anchors):
        return True
    # The case-sensitive "DAN": anchored in the text itself.
    text = view.text
    if "D" not in text:
        return False
    index = text.find("DAN")
    while index >= 0:
        if _JAILBREAK_RE.match(text, index) is not None:
            return True
        index = text.find("DAN", index + 1)
    return False


def _role_override(view: _Lowered) -> bool:
    anchors = ["act", "pretend"]
    if _WORD_LETTERS["roleplay"] <= view.letters and view.has("role"):
        anchors += ("roleplay", "role-play")
    # "you are now", "from now on, you" and "your new role is" all need a "you".
    if view.has("you"):
        if view.has("now"):
            anchors += ("you", "from")
        elif view.has("new"):
            anchors.append("you")
    return view.matches_at(_ROLE_OVERRIDE_RE, anchors)


def _is_base64_blob(blob: str) -> bool:
    # Requiring all three character classes keeps long words, hex digests and runs of one
    # letter from counting; real base64 payloads of this length always mix them.
    chars = set(blob)
    classes = (string.ascii_uppercase, string.ascii_lowercase, string.digits)
    return all(not chars.isdisjoint(members) for members in classes)


def _has_base64_blob(text: str) -> bool:
    if len(text) < _BASE64_BLOB_MIN or not _has_ascii_digit(text):
        return False
    # Each maximal run of base64 characters is one candidate; they are found on a map of
    # the text where a run of 200 is a plain substring search.
    base64_map = text.encode("ascii", "replace").translate(_BASE64_MAP)
    needle = b"b" * _BASE64_BLOB_MIN
    pos = 0
    while (start := base64_map.find(needle, pos)) >= 0:
        # pos is never inside a run, so the first hit is a run's start, where the pattern
        # matches the whole run.
        match = _BASE64_BLOB_RE.match(text, start)
        if match is not None and _is_base64_blob(match.group(0)):
            return True
        pos = match.end() if match is not None else start + _BASE64_BLOB_MIN
    return False


def _has_many_delimiters(text: str) -> bool:
    # Each run needs four of the same delimiter in a row.
    for char, quad in _DELIMITER_QUADS:
        if char in text and quad in text:
            break
    else:
        return False
    for count, _ in enumerate(_DELIMITER_RUN_RE.finditer(text), start=1):
        if count >= _DELIMITER_RUNS_MIN:
            return True
    return False


def _scan_signal(pattern: re.Pattern[str]) -> Callable[[str], bool]:
    def detect(text: str) -> bool:
        return pattern.search(text) is not None

    return detect


class _Signal(NamedTuple):
    name: str
    weight: float
    # The reference detector: scans the whole text. The fast path must agree with it.
    scan: Callable[[str], bool]


# Weights >= INJECTION_THRESHOLD mark signals that are damning on their own; the weaker ones
# (benign phrasings exist: "act as a translator", a pasted image, a markdown table) only
# cross the threshold in combination.
_SIGNALS: Final = (
    _Signal("ignore_instructions", 0.8, _scan_signal(_IGNORE_INSTRUCTIONS_RE)),
    _Signal("role_tags", 0.7, _scan_signal(_ROLE_TAG_RE)),
    _Signal("system_prompt_reveal", 0.7, _scan_signal(_PROMPT_REVEAL_RE)),
    _Signal("jailbreak", 0.4, _scan_signal(_JAILBREAK_RE)),
    _Signal("role_override", 0.35, _scan_signal(_ROLE_OVERRIDE_RE)),
    _Signal("base64_blob", 0.3, _has_base64_blob),
    _Signal("repeated_delimiters", 0.2, _has_many_delimiters),
)


_SIGNAL_MISSES: Final = tuple(1.0 - signal.weight for signal in _SIGNALS)


def _checks(text: str) -> tuple[Callable[[], bool], ...]:
    """For each of _SIGNALS, a call telling whether it fires on ``text``."""
    view = _Lowered.of(text)
    if view is None:
        return tuple(functools.partial(signal.scan, text) for signal in _SIGNALS)
    return (
        lambda: _ignores_instructions(view),
        lambda: _has_role_tags(text),
        lambda: _reveals_prompt(view),
        lambda: _jailbreak(view),
        lambda: _role_override(view),
        lambda: _has_base64_blob(text),
        lambda: _has_many_delimiters(text),
    )


def _fired(text: str) -> tuple[bool, ...]:
    """For each of _SIGNALS, whether it fires on ``text``."""
    return tuple(check() for check in _checks(text))


# The order injection.detected evaluates the signals in: cheapest first, as measured on
# ~2 KB of prose (jailbreak, ignore_instructions, role_tags, repeated_delimiters,
# base64_blob, system_prompt_reveal, role_override). Detection stops once the signals seen
# decide the outcome, so on ordinary text the last, costliest one is never run: alone it
# cannot reach the threshold.
_DETECTION_ORDER: Final = (3, 0, 1, 6, 5, 2, 4)
# _UNSEEN_MISS[k]: the miss product of the signals after the k-th in detection order, the
# lowest the product can still fall to if every one of them fires.
_UNSEEN_MISS: Final = tuple(
    math.prod(_SIGNAL_MISSES[index] for index in _DETECTION_ORDER[k + 1 :])
    for k in range(len(_DETECTION_ORDER))
)


def _detected(checks: Sequence[Callable[[], bool]]) -> bool:
    """Whether the noisy-OR of the signals that fire reaches INJECTION_THRESHOLD, running only
    as many of ``checks`` (in _SIGNALS order) as it takes to know."""
    miss = 1.0
    for k, index in enumerate(_DETECTION_ORDER):
        if checks[index]():
            miss *= _SIGNAL_MISSES[index]
            if 1.0 - miss >= INJECTION_THRESHOLD:
                return True
        elif 1.0 - miss * _UNSEEN_MISS[k] < INJECTION_THRESHOLD:
            return False
    return False


def injection_signals(text: str) -> list[str]:
    """Names of the heuristics that fired, strongest first, for decision explanations.

    Possible names: ignore_instructions, role_tags, system_prompt_reveal, jailbreak,
    role_override, base64_blob, repeated_delimiters.
    """
    return [signal.name for signal, fired in zip(_SIGNALS, _fired(text), strict=True) if fired]


def injection_score(text: str) -> float:
    """Prompt-injection likelihood in [0, 1].

    Signals are combined as a noisy-OR, ``1 - prod(1 - weight)``: each one that fires
    independently raises the score, the result can never exceed 1, and a single strong
    signal (weight >= :data:`INJECTION_THRESHOLD`) is enough to reach the threshold.
    """
    miss = 1.0
    for signal_miss, fired in zip(_SIGNAL_MISSES, _fired(text), strict=True):
        if fired:
            miss *= signal_miss
    return min(1.0, max(0.0, 1.0 - miss))


def injection_detected(text: str) -> bool:
    """``injection_score(text) >= INJECTION_THRESHOLD``, without running the heuristics whose
    result cannot change the answer."""
    return _detected(_checks(text))


# ---------------------------------------------------------------------------
# Token estimate
# ---------------------------------------------------------------------------

# Character classes, one bit each (whitespace is 0). The text is mapped to one class byte
# per character via its UTF-8 encoding: continuation bytes are deleted and each lead byte
# stands for its character. Lead bytes from 0xE3 on start U+3000 and above (CJK, kana,
# Hangul, and the supplementary planes, emoji included); 0xC2-0xE2 start U+0080-U+2FFF.
_LETTER: Final = 0x01
_DIGIT: Final = 0x02
_PUNCT: Final = 0x04
_UNDERSCORE: Final = 0x08
_OTHER: Final = 0x10
_WIDE: Final = 0x20


def _token_class_table() -> bytes:
    table = bytearray(256)
    for code in range(128):
        char = chr(code)
        if char.isspace():
            table[code] = 0
        elif char.isalpha():
            table[code] = _LETTER
        elif char.isdigit():
            table[code] = _DIGIT
        elif char == "_":
            table[code] = _UNDERSCORE
        else:
            table[code] = _PUNCT
    for code in range(0xC0, 0x100):
        table[code] = _WIDE if code >= 0xE3 else _OTHER
    return bytes(table)


_TOKEN_CLASSES: Final = _token_class_table()
_UTF8_CONTINUATION: Final = bytes(range(0x80, 0xC0))
# Each class's tokens per run: 1 + (len - 1) // per_token, found by counting full blocks of
# per_token in the run's continuation (all but its first character).
_TOKEN_BLOCKS: Final = tuple(
    (code, bytes([code]) * per_token)
    for code, per_token in ((_LETTER, 8), (_DIGIT, 3), (_PUNCT, 3), (_UNDERSCORE, 3), (_OTHER, 3), (_WIDE, 1))
)
_LETTER_BYTE: Final = bytes([_LETTER])
_LONG_WORD: Final = _LETTER_BYTE * 9


def estimate_tokens(text: str) -> int:
    """Cheap estimate of the token count under OpenAI's BPE tokenizers (cl100k/o200k).

    Two estimates are taken and the larger one wins, so the result errs slightly high,
    which is the safe side for quotas and context limits:

    * the classic "4 characters per token" rule, ``ceil(len(text) / 4)``;
    * a lexical count over the maximal runs of one character class: one token per run of
      ASCII letters (an ordinary English word) plus one per further 8 letters of long
      words; one per up-to-3 characters of a run of ASCII digits, of underscores or of
      other ASCII symbols; one per up-to-3 characters of a run of non-ASCII characters
      below U+3000 (accented and non-Latin letters, typographic punctuation, non-ASCII
      spaces: a class of their own, so "café" is "caf" plus "é"); and one per character
      from U+3000 up (CJK, kana, Hangul, emoji), because the character rule badly
      undercounts those. ASCII whitespace separates runs and counts for nothing.

    The empty string is 0 tokens; any other text is at least 1.
    """
    if not text:
        return 0
    by_chars = max(1, -(-len(text) // 4))
    classes = text.encode("utf-8", "surrogatepass").translate(_TOKEN_CLASSES, _UTF8_CONTINUATION)
    size = len(classes)
    # Cheap upper bound first: a run of letters starts at the text's start, after
    # whitespace or after another class; any other character adds at most one token; and
    # a letter run of length n has (n - 1) // 8 <= 2 * (n // 9) extra tokens. Ordinary
    # prose stays under the character rule by this bound alone.
    non_letters = classes.translate(None, _LETTER_BYTE)
    others = len(non_letters) - non_letters.count(0)
    bound = len(non_letters) + 1 + others
    if bound <= by_chars and bound + 2 * classes.count(_LONG_WORD) <= by_chars:
        return by_chars
    # Exact count on the class bytes read as one big integer: byte i of ``previous`` is the
    # class of character i - 1, so a class bit set in ``value`` but not in ``previous``
    # starts a run, and one set in both continues it.
    value = int.from_bytes(classes, "little")
    previous = value << 8
    lexical = (value & ~previous).bit_count()
    continued = (value & previous).to_bytes(size, "little")
    for code, block in _TOKEN_BLOCKS:
        if code in classes:
            lexical += continued.count(block)
    return max(by_chars, lexical)


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

"""SMS segment counting and per-destination pricing for Twilio ``Messages`` calls.

Twilio bills an outbound SMS per *segment*. This module reproduces how Twilio's own
Messaging Segment Calculator (github.com/TwilioDevEd/message-segment-calculator, the
tool Twilio's docs point to) splits a body, so Keybrake can price a send before it
forwards it. All functions are pure and do no I/O.

The rules, from Twilio's glossary pages ("How long can a message be?", "What is GSM-7
/ UCS-2 character encoding?") and 3GPP TS 23.038:

* A body whose every character is in the GSM-7 default alphabet (:data:`GSM7_BASIC`) or
  its extension table (:data:`GSM7_EXTENSION`) is sent as **GSM-7**: 7-bit septets, an
  extension character costs 2 (an ESC septet plus the character). One segment holds
  160 septets; once a body needs more, every segment carries a 6-octet User Data
  Header and holds 153.
* Any other character (emoji, CJK, Cyrillic, "ê", a tab, curly quotes, ...) switches
  the **whole** body to **UCS-2**, counted in UTF-16 code units (an astral character
  such as an emoji is a surrogate pair, 2 units): 70 per single segment, 67 per segment
  of a concatenated message.
* Segments are filled by packing, not by dividing: a 2-septet extension character is
  never split across two segments, and neither is a surrogate pair or (as the
  calculator does) a user-perceived character such as ``"e" + U+0301`` or a ZWJ emoji
  sequence. Packing can therefore need one more segment than ``ceil(n / 153)``.

Smart Encoding is **not** applied. Smart Encoding is a Messaging Service option that
swaps look-alike characters (curly quotes, em dash, no-break space, ...) for GSM-7
ones. Twilio's calculator has it off by default and sends from a plain ``From`` number
don't use it, so a curly quote here makes the body UCS-2. (Twilio's 2017 launch post
says Messaging Services created since then have it on.) Through such a service a body
usually costs fewer segments than counted here, but a few substitutions lengthen the
text (``…`` becomes three dots, ``½`` becomes ``1/2``, a tab seven spaces), so a body
made mostly of those can cost more.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Mapping
from typing import Literal

__all__ = [
    "GSM7_BASIC",
    "GSM7_EXTENSION",
    "SmsEncoding",
    "calling_code_price",
    "count_segments",
    "encoding_of",
]

SmsEncoding = Literal["GSM-7", "UCS-2"]
"""The two SMS data codings Twilio picks between for a body."""

GSM7_BASIC: frozenset[str] = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ"  # 0x00-0x1F (0x1B, the escape, is not a character)
    " !\"#¤%&'()*+,-./0123456789:;<=>?"  # 0x20-0x3F
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"  # 0x40-0x5F
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"  # 0x60-0x7F
)
"""The 127 characters of the GSM 03.38 default alphabet; each costs 1 septet.

It is the table Twilio's calculator uses: capital ``Ç`` (0x09) but not ``ç``; ``é`` but
not ``ê``; LF and CR but not TAB; ``¤`` but no backtick.

>>> len(GSM7_BASIC), "é" in GSM7_BASIC, "ê" in GSM7_BASIC, "\\n" in GSM7_BASIC
(127, True, False, True)
"""

GSM7_EXTENSION: frozenset[str] = frozenset("^{}\\[~]|€\f")
"""The 10 characters of the GSM 03.38 extension table; each costs 2 septets (ESC + code).

They keep a body in GSM-7 but take two places in a segment: ``^ { } \\ [ ~ ] | €`` and
form feed.

>>> sorted(GSM7_EXTENSION) == sorted("^{}\\\\[~]|€\\f")
True
"""

_GSM7_ALL: frozenset[str] = GSM7_BASIC | GSM7_EXTENSION

# A segment is 140 octets (1120 bits); a concatenated message's segments each spend 6
# octets (48 bits) on the User Data Header: (1120 - 48) // 7 = 153, (1120 - 48) // 16 = 67.
_GSM7_SINGLE = 160
_GSM7_MULTI = 153
_UCS2_SINGLE = 70
_UCS2_MULTI = 67

# Grapheme_Cluster_Break classes (Unicode UAX #29), as far as _gcb_class tells them apart.
_OTHER, _CONTROL, _EXTEND, _ZWJ, _SPACING_MARK, _PREPEND, _RI = range(7)
_L, _V, _T, _LV, _LVT = range(7, 12)
# Extend characters outside the Mn/Me categories: ZWNJ, halfwidth katakana sound marks,
# emoji skin-tone modifiers, tag characters.
_EXTRA_EXTEND = frozenset({0x200C, 0xFF9E, 0xFF9F})
_EMOJI_MODIFIERS = range(0x1F3FB, 0x1F400)
_TAGS = range(0xE0020, 0xE0080)
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
_EXTRA_SPACING_MARKS = frozenset({0x0E33, 0x0EB3})  # Thai / Lao SARA AM (Lo)
_PREPENDS = frozenset(
    {
        *range(0x0600, 0x0606),
        0x06DD,
        0x070F,
        0x0890,
        0x0891,
        0x08E2,
        0x0D4E,
        0x110BD,
        0x110CD,
        0x111C2,
        0x111C3,
        0x1193F,
        0x11941,
        0x11A3A,
        *range(0x11A84, 0x11A8A),
        0x11D46,
        0x11F02,
    }
)


def encoding_of(body: str) -> SmsEncoding:
    """Return the encoding Twilio sends ``body`` in: ``"GSM-7"`` or ``"UCS-2"``.

    A body is GSM-7 only if every character is in :data:`GSM7_BASIC` or
    :data:`GSM7_EXTENSION`; one other character makes the whole body UCS-2. The empty
    body is GSM-7.

    >>> encoding_of("Hello {world} €5")
    'GSM-7'
    >>> encoding_of("Café"), encoding_of("Crêpe"), encoding_of("“quoted”")
    ('GSM-7', 'UCS-2', 'UCS-2')
    >>> encoding_of("Привет"), encoding_of("ok 👍")
    ('UCS-2', 'UCS-2')
    """
    return "GSM-7" if _GSM7_ALL.issuperset(body) else "UCS-2"


def count_segments(body: str) -> int:
    """Return how many SMS segments Twilio bills for ``body``.

    GSM-7 bodies are measured in septets (extension characters count 2), UCS-2 bodies in
    UTF-16 code units (a surrogate pair counts 2). A body that fits one segment (160
    septets / 70 units) is 1 segment; a longer one is packed greedily into 153-septet /
    67-unit segments without splitting an extension character, a surrogate pair or a
    user-perceived character (see :func:`_ucs2_clusters`).

    The empty body counts as 1 segment: that is what Twilio's calculator reports, and it
    keeps a price estimate from ever being zero. (Twilio refuses a message with neither
    ``Body`` nor ``MediaUrl`` with error 21602; a media-only message is an MMS, which is
    priced per message, not per segment.)

    Bodies longer than Twilio's 1600-character limit (which Twilio rejects) are still
    counted exactly; the work is one linear pass. Trailing line breaks are counted as
    sent, although Twilio is reported to trim them: counting them can only overcharge.

    >>> count_segments(""), count_segments("a" * 160), count_segments("a" * 161)
    (1, 1, 2)
    >>> count_segments("a" * 306), count_segments("a" * 307)
    (2, 3)
    >>> count_segments("a" * 159 + "€")  # 161 septets
    2
    >>> count_segments("a" * 152 + "{" + "a" * 152)  # "{" can't straddle segments 1 and 2
    3
    >>> count_segments("ж" * 70), count_segments("ж" * 71), count_segments("ж" * 135)
    (1, 2, 3)
    >>> count_segments("ж" * 66 + "😀" + "ж" * 66)  # the emoji can't straddle 1 and 2
    3
    """
    if _GSM7_ALL.issuperset(body):
        septets = len(body) + sum(body.count(ch) for ch in GSM7_EXTENSION)
        if septets <= _GSM7_SINGLE:
            return 1
        if septets == len(body):  # no extension characters: plain division is exact
            return -(-septets // _GSM7_MULTI)
        return _pack((2 if ch in GSM7_EXTENSION else 1 for ch in body), _GSM7_MULTI)
    units = len(body) + sum(1 for ch in body if ord(ch) > 0xFFFF)
    if units <= _UCS2_SINGLE:
        return 1
    return _pack(_ucs2_clusters(body, _UCS2_MULTI), _UCS2_MULTI)


def _pack(sizes: Iterator[int], capacity: int) -> int:
    """Count the segments needed to hold ``sizes`` in order, never splitting one.

    Every size must be at most ``capacity``.

    >>> _pack(iter([1, 2, 1]), 3)
    2
    """
    segments, used = 1, 0
    for size in sizes:
        if used + size > capacity:
            segments += 1
            used = size
        else:
            used += size
    return segments


def _gcb_class(ch: str, cp: int) -> int:
    """Approximate the Grapheme_Cluster_Break property of ``ch`` from its category."""
    if cp < 0x300:  # ASCII and Latin-1/Extended: controls or plain letters
        return _CONTROL if cp < 0x20 or 0x7F <= cp < 0xA0 or cp == 0xAD else _OTHER
    if 0xAC00 <= cp <= 0xD7A3:
        return _LV if (cp - 0xAC00) % 28 == 0 else _LVT
    if 0x1100 <= cp <= 0x115F or 0xA960 <= cp <= 0xA97C:
        return _L
    if 0x1160 <= cp <= 0x11A7 or 0xD7B0 <= cp <= 0xD7C6:
        return _V
    if 0x11A8 <= cp <= 0x11FF or 0xD7CB <= cp <= 0xD7FB:
        return _T
    if cp == 0x200D:
        return _ZWJ
    if cp in _REGIONAL_INDICATORS:
        return _RI
    if cp in _PREPENDS:
        return _PREPEND
    if cp in _EXTRA_EXTEND or cp in _EMOJI_MODIFIERS or cp in _TAGS:
        return _EXTEND
    if cp in _EXTRA_SPACING_MARKS:
        return _SPACING_MARK
    category = unicodedata.category(ch)
    if category in ("Mn", "Me"):
        return _EXTEND
    if category == "Mc":
        return _SPACING_MARK
    if category in ("Cc", "Cf", "Zl", "Zp", "Cs"):
        return _CONTROL
    return _OTHER


def _is_pictographic(ch: str, cp: int) -> bool:
    """Approximate Extended_Pictographic: the emoji blocks or any other symbol (So)."""
    return 0x1F000 <= cp <= 0x1FAFF or (cp >= 0x2000 and unicodedata.category(ch) == "So")


def _joins(prev: int, cur: int) -> bool:
    """UAX #29 rules GB3-GB9b: whether a ``cur`` character continues a cluster whose
    last character is ``prev``. (GB11 and GB12/13 need state; see the caller.)"""
    if prev == _CONTROL or cur == _CONTROL:
        return False  # also keeps CR and LF apart, as Twilio's calculator does
    if cur in (_EXTEND, _ZWJ, _SPACING_MARK) or prev == _PREPEND:
        return True
    if prev == _L:
        return cur in (_L, _V, _LV, _LVT)
    if prev in (_LV, _V):
        return cur in (_V, _T)
    if prev in (_LVT, _T):
        return cur == _T
    return False


def _ucs2_clusters(body: str, cap: int) -> Iterator[int]:
    """Yield the UTF-16 size of each user-perceived character of ``body``.

    Twilio's calculator packs whole graphemes (it splits text with the
    ``grapheme-splitter`` package, except that it keeps CR and LF apart). Python's
    standard library has no grapheme segmentation, so this applies the rules of Unicode
    UAX #29 (combining and spacing marks, prepended marks, Hangul jamo, ZWJ emoji
    sequences, regional-indicator flags) with the properties approximated from general
    categories. Sizes are capped at ``cap``: a cluster that long (a "zalgo" run of
    combining marks) can't be sent in one segment, so it is split, where the calculator
    would overfill one segment.

    Grouping can only add segments compared with packing code points, never remove one,
    so where the approximation groups too much it errs towards overcharging. One known
    case: an emoji skin-tone modifier after a non-emoji character joins it (Unicode 11+),
    while the calculator's older splitter keeps the two apart.

    >>> list(_ucs2_clusters("ae\\u0301🇫🇷👍🏽\\r\\n", 67))
    [1, 2, 4, 4, 1, 1]
    >>> list(_ucs2_clusters("👨\\u200d👩\\u200d👧", 67))
    [8]
    >>> list(_ucs2_clusters("\\u1100\\u1161\\u11a8각", 67))  # jamo L V T, then a syllable
    [3, 1]
    """
    size = 0
    prev = _CONTROL  # class of the previous character (nothing joins the start)
    lone_ri = False  # the previous character is an unpaired regional indicator
    pict_run = False  # the cluster so far ends in Extended_Pictographic Extend*
    zwj_after_pict = False  # ... Extended_Pictographic Extend* ZWJ
    for ch in body:
        cp = ord(ch)
        width = 2 if cp > 0xFFFF else 1
        cls = _gcb_class(ch, cp)
        pict = _is_pictographic(ch, cp)
        joins = (
            _joins(prev, cls)
            or (zwj_after_pict and pict)  # GB11
            or (lone_ri and cls == _RI)  # GB12, GB13
        )
        if joins and size + width <= cap:
            size += width
        else:
            if size:
                yield size
            size = width
        zwj_after_pict = cls == _ZWJ and pict_run
        pict_run = pict or (cls == _EXTEND and pict_run)
        lone_ri = cls == _RI and not lone_ri
        prev = cls
    if size:
        yield size


_CHANNEL_PREFIX = "whatsapp:"
_E164 = re.compile(r"\+[1-9][0-9]{7,14}")


def calling_code_price(to: str, table: Mapping[str, int], default: int) -> int:
    """Return the price (integer micro-USD) for sending to the E.164 number ``to``.

    ``table`` maps calling-code prefixes, written as digits without ``+`` (``"1"``,
    ``"44"``, ``"1876"``), to prices. The longest key that prefixes the number wins, so
    ``"1876"`` (Jamaica) beats ``"1"`` (US/Canada) for ``+18765550123``; when no key
    matches the result is ``default``. Keys in any other form (``"+44"``, ``"44 "``)
    never match.

    A Twilio channel address ``whatsapp:+447700900123`` is priced as the bare number
    after the ``whatsapp:`` prefix (matched case-insensitively); the table the caller
    passes decides whether that is an SMS or a WhatsApp rate.

    ``to`` must be ``+`` followed by 8 to 15 ASCII digits, the first not ``0``; anything
    else (a missing ``+``, spaces, dashes, other channel prefixes, other digit scripts)
    raises :class:`ValueError` saying what is wrong. The message does not repeat the
    number.

    >>> prices = {"1": 7_900, "44": 46_300, "1876": 95_000}
    >>> calling_code_price("+14155550123", prices, 100_000)
    7900
    >>> calling_code_price("+18765550123", prices, 100_000)
    95000
    >>> calling_code_price("whatsapp:+447700900123", prices, 100_000)
    46300
    >>> calling_code_price("+33612345678", prices, 100_000)
    100000
    >>> calling_code_price("4155550123", prices, 100_000)
    Traceback (most recent call last):
    ...
    ValueError: recipient is not an E.164 number: it must start with '+'
    """
    number = (
        to[len(_CHANNEL_PREFIX) :] if to[: len(_CHANNEL_PREFIX)].lower() == _CHANNEL_PREFIX else to
    )
    if _E164.fullmatch(number) is None:
        raise ValueError(f"recipient is not an E.164 number: {_e164_problem(number)}")
    digits = number[1:]
    for end in range(len(digits), 0, -1):
        price = table.get(digits[:end])
        if price is not None:
            return price
    return default


def _e164_problem(number: str) -> str:
    """Describe why ``number`` (already known not to be E.164) is rejected."""
    if not number:
        return "it is empty"
    if number[0] == " " and number[1:2].isdigit():
        return "it starts with a space (a '+' sent unescaped in a form body decodes to one)"
    if number[0] != "+":
        if ":" in number:
            return "only the 'whatsapp:' channel prefix is understood"
        return "it must start with '+'"
    rest = number[1:]
    bad = next((ch for ch in rest if ch not in "0123456789"), None)
    if bad is not None:
        return f"it contains {bad!r}; only the digits 0-9 may follow '+'"
    if rest.startswith("0"):
        return "a country calling code never starts with 0"
    return f"it has {len(rest)} digits; E.164 numbers have 8 to 15"

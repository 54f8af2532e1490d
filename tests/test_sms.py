"""Tests for ``keybrake.pricing.sms``: Twilio SMS segment counting and calling-code pricing.

Expected segment counts follow Twilio's published rules (160/153 GSM-7 septets, 70/67
UCS-2 code units, extension characters cost 2 septets, Smart Encoding off) and the
packing done by Twilio's Messaging Segment Calculator, whose own fixtures and whose
live-Twilio check (TwilioDevEd/message-segment-calculator, issue #66) are reproduced
below where marked "calculator" / "live".
"""

from __future__ import annotations

import doctest
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keybrake.pricing import sms as _sms
from keybrake.pricing.sms import (
    GSM7_BASIC,
    GSM7_EXTENSION,
    calling_code_price,
    count_segments,
    encoding_of,
)

GSM = "GSM-7"
UCS = "UCS-2"

# "1234567890..." with its first character replaced by "{": the calculator's fixtures.
_DIGITS = "".join(str(i % 10) for i in range(1, 200))

SEGMENT_CASES: list[tuple[str, str, str, int]] = [
    # id, body, encoding, segments
    ("empty", "", GSM, 1),
    ("one-char", "a", GSM, 1),
    ("gsm-160", "a" * 160, GSM, 1),
    ("gsm-161", "a" * 161, GSM, 2),
    ("gsm-306", "a" * 306, GSM, 2),
    ("gsm-307", "a" * 307, GSM, 3),
    ("gsm-459", "a" * 459, GSM, 3),
    ("gsm-460", "a" * 460, GSM, 4),
    ("gsm-158-plus-euro-160-septets", "a" * 158 + "€", GSM, 1),
    ("gsm-159-plus-euro-161-septets", "a" * 159 + "€", GSM, 2),
    ("calculator-escape-one-segment", "{" + _DIGITS[1:159], GSM, 1),
    ("calculator-escape-two-segments", "{" + _DIGITS[1:160], GSM, 2),
    # 152 + "{" + 152 = 306 septets: ceil(306/153) = 2, but "{" can't straddle the
    # boundary, so segment 1 holds 152 and the last "a" spills into a third.
    ("extension-straddles-boundary", "a" * 152 + "{" + "a" * 152, GSM, 3),
    ("extension-ends-segment-exactly", "a" * 151 + "{" + "a" * 153, GSM, 2),
    ("extension-only-160-septets", "€" * 80, GSM, 1),
    ("extension-only-packs-76-per-segment", "|" * 153, GSM, 3),
    ("form-feed-is-extension", "\f" * 81, GSM, 2),
    ("e-acute-is-gsm-basic", "é", GSM, 1),
    ("e-circumflex-is-ucs2", "ê", UCS, 1),
    ("live-70-precomposed-e-acute", "é" * 70, GSM, 1),
    ("live-70-decomposed-e-acute", "e\u0301" * 70, UCS, 3),
    ("live-1-decomposed-e-acute", "e\u0301", UCS, 1),
    ("gsm-160-e-acute", "é" * 160, GSM, 1),
    ("one-non-gsm-char-makes-all-ucs2", "ê" + "a" * 70, UCS, 2),
    ("euro-is-extension", "€", GSM, 1),
    ("live-one-pipe", "|", GSM, 1),
    ("cyrillic", "Привет, как дела?", UCS, 1),
    ("cjk-70", "中" * 70, UCS, 1),
    ("live-cjk-71", "中" * 71, UCS, 2),
    ("ucs2-70", "ж" * 70, UCS, 1),
    ("ucs2-71", "ж" * 71, UCS, 2),
    ("ucs2-134", "ж" * 134, UCS, 2),
    ("ucs2-135", "ж" * 135, UCS, 3),
    ("emoji-surrogate-pair-at-70", "ж" * 68 + "😀", UCS, 1),
    ("emoji-surrogate-pair-at-71", "ж" * 69 + "😀", UCS, 2),
    ("calculator-emoji-one-segment", "😜" + _DIGITS[1:69], UCS, 1),
    ("calculator-emoji-two-segments", "😜" + _DIGITS[1:70], UCS, 2),
    ("calculator-emoji-three-segments", "😜" + _DIGITS[1:134], UCS, 3),
    # 66 + 2 + 66 = 134 units: ceil(134/67) = 2, but the pair can't straddle unit 67.
    ("emoji-straddles-67-boundary", "ж" * 66 + "😀" + "ж" * 66, UCS, 3),
    ("emoji-ends-segment-exactly", "ж" * 65 + "😀" + "ж" * 67, UCS, 2),
    # The calculator packs whole graphemes: 👍🏽 (4 units) and 🇫🇷 (4 units) stay together.
    ("skin-tone-emoji-not-split", "ж" * 65 + "👍🏽" + "ж" * 65, UCS, 3),
    ("flag-not-split", "ж" * 65 + "🇫🇷" + "ж" * 65, UCS, 3),
    ("zwj-family-not-split", "ж" * 60 + "👨\u200d👩\u200d👧" + "ж" * 60, UCS, 3),
    ("combining-accent-not-split", "ж" * 66 + "e\u0301" + "ж" * 66, UCS, 3),
    ("hangul-jamo-not-split", "ж" * 66 + "\u1100\u1161" + "ж" * 66, UCS, 3),
    ("prepended-mark-not-split", "ж" * 66 + "\u0600a" + "ж" * 66, UCS, 3),
    ("crlf-in-ucs2-is-two-free-units", "ж" * 66 + "\r\n" + "ж" * 66, UCS, 2),
    ("live-emoji-and-pipe", "\U0001f600|", UCS, 1),
    ("extension-char-is-one-unit-in-ucs2", "😀" + "|" * 68, UCS, 1),
    ("newline-is-gsm-basic", "line one\nline two", GSM, 1),
    ("cr-is-gsm-basic", "line one\rline two", GSM, 1),
    ("live-crlf-counts-two", "a" * 80 + "\r\n" + "a" * 79, GSM, 2),
    ("live-lf-counts-one", "a" * 80 + "\n" + "a" * 79, GSM, 1),
    ("live-crlf-at-2-3-boundary", "a" * 200 + "\r\n" + "a" * 105, GSM, 3),
    ("tab-is-not-gsm", "a\tb", UCS, 1),
    ("live-curly-quotes-smart-encoding-off", "“Hi”", UCS, 1),
    ("curly-apostrophe-150-chars", "It\u2019s" + "a" * 146, UCS, 3),
    ("straight-quotes-150-chars", "It's" + "a" * 146, GSM, 1),
    ("gsm-1600", "a" * 1600, GSM, 11),
    ("gsm-1600-extension", "€" * 1600, GSM, 22),
    ("ucs2-1600", "ж" * 1600, UCS, 24),
    ("ucs2-1600-emoji", "😀" * 1600, UCS, 49),
]


@pytest.mark.parametrize(
    ("body", "encoding", "segments"),
    [pytest.param(body, enc, segs, id=case_id) for case_id, body, enc, segs in SEGMENT_CASES],
)
def test_count_segments(body: str, encoding: str, segments: int) -> None:
    assert encoding_of(body) == encoding
    assert count_segments(body) == segments


def test_segment_case_ids_are_unique() -> None:
    ids = [case[0] for case in SEGMENT_CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 25


# -- character tables ---------------------------------------------------------------


def test_gsm7_tables() -> None:
    assert len(GSM7_BASIC) == 127  # 128 code points minus the escape
    assert frozenset("^{}\\[~]|€\f") == GSM7_EXTENSION
    assert not GSM7_BASIC & GSM7_EXTENSION
    assert all(len(ch) == 1 for ch in GSM7_BASIC | GSM7_EXTENSION)
    printable_ascii = {chr(cp) for cp in range(0x20, 0x7F)}
    # Every printable ASCII character is GSM-7 except the backtick.
    assert printable_ascii - GSM7_BASIC - GSM7_EXTENSION == {"`"}


@pytest.mark.parametrize(
    "char",
    sorted(GSM7_BASIC | GSM7_EXTENSION),
    ids=lambda ch: f"U+{ord(ch):04X}",
)
def test_every_gsm7_char_keeps_gsm7(char: str) -> None:
    assert encoding_of("abc" + char) == GSM


@pytest.mark.parametrize(
    "char",
    [
        pytest.param("ê", id="e-circumflex"),
        pytest.param("ç", id="small-c-cedilla"),
        pytest.param("`", id="backtick"),
        pytest.param("\t", id="tab"),
        pytest.param("\x1b", id="escape"),
        pytest.param("\u00a0", id="no-break-space"),
        pytest.param("“", id="left-double-quote"),
        pytest.param("\u2019", id="right-single-quote"),
        pytest.param("—", id="em-dash"),
        pytest.param("…", id="ellipsis"),
        pytest.param("ж", id="cyrillic"),
        pytest.param("中", id="cjk"),
        pytest.param("😀", id="emoji"),
        pytest.param("\u0301", id="combining-acute"),
    ],
)
def test_non_gsm7_char_switches_to_ucs2(char: str) -> None:
    assert encoding_of("abc" + char) == UCS


def test_huge_bodies_are_counted_exactly() -> None:
    assert count_segments("a" * 100_000) == math.ceil(100_000 / 153)
    assert count_segments("€" * 100_000) == math.ceil(100_000 / 76)
    assert count_segments("ж" * 100_000) == math.ceil(100_000 / 67)
    assert count_segments("😀" * 100_000) == math.ceil(100_000 / 33)


def test_long_combining_run_is_split_not_one_giant_segment() -> None:
    # One "cluster" of 201 / 202 units can't fit one 67-unit segment; it is split.
    assert count_segments("e" + "\u0301" * 200) == 3
    assert count_segments("e" + "\u0301" * 201) == 4


def test_docstring_examples() -> None:
    result = doctest.testmod(_sms)
    assert result.attempted > 0
    assert result.failed == 0


# -- properties ---------------------------------------------------------------------

_MIXED = [
    *sorted(GSM7_BASIC)[:20],
    *sorted(GSM7_EXTENSION),
    "ж",
    "ê",
    "😀",
    "👍",
    "🏽",
    "\u0301",
    "\u200d",
    "\ufe0f",
    "🇫",
    "🇷",
]


@given(
    body=st.text(alphabet=_MIXED, max_size=400),
    tail=st.text(alphabet=_MIXED, min_size=1, max_size=5),
)
@settings(max_examples=300, deadline=None)
def test_segments_never_decrease_when_appending(body: str, tail: str) -> None:
    before = count_segments(body)
    for ch in tail:
        body += ch
        after = count_segments(body)
        assert after >= before
        before = after


@given(
    length=st.integers(min_value=0, max_value=2_000),
    pattern=st.text(alphabet=sorted(GSM7_BASIC), min_size=1, max_size=12),
)
@settings(max_examples=300, deadline=None)
def test_gsm7_without_extension_chars_follows_closed_form(length: int, pattern: str) -> None:
    body = (pattern * (length // len(pattern) + 1))[:length]
    expected = 1 if length <= 160 else math.ceil(length / 153)
    assert encoding_of(body) == GSM
    assert count_segments(body) == expected


@given(
    length=st.integers(min_value=0, max_value=500),
    pattern=st.text(alphabet=["ж", "中", "a", "{"], min_size=1, max_size=8),
)
@settings(max_examples=200, deadline=None)
def test_bmp_ucs2_without_pairs_follows_closed_form(length: int, pattern: str) -> None:
    body = "ж" + (pattern * (length // len(pattern) + 1))[:length]
    n = len(body)
    assert count_segments(body) == (1 if n <= 70 else math.ceil(n / 67))


def _calculator_segments(sizes_in_bits: list[int]) -> int:
    """Twilio's calculator algorithm (Segment.ts / SegmentedMessage._buildSegments):
    fill 1120-bit segments; on overflow, give the first segment its 48-bit header and
    move its trailing characters that no longer fit into the new segment."""
    segments: list[list[int]] = [[]]
    has_header = [False]
    for bits in sizes_in_bits:
        free = 1120 - 48 * has_header[-1] - sum(segments[-1])
        if free < bits:
            segments.append([])
            has_header.append(True)
            if not has_header[-2]:
                has_header[-2] = True
                moved: list[int] = []
                while 1120 - 48 - sum(segments[-2]) < 0:
                    moved.insert(0, segments[-2].pop())
                segments[-1].extend(moved)
        segments[-1].append(bits)
    return len(segments)


@given(body=st.text(alphabet=sorted(GSM7_BASIC)[:10] + sorted(GSM7_EXTENSION), max_size=700))
@settings(max_examples=200, deadline=None)
def test_gsm7_packing_matches_calculator_algorithm(body: str) -> None:
    sizes = [14 if ch in GSM7_EXTENSION else 7 for ch in body]
    assert count_segments(body) == _calculator_segments(sizes)


@given(body=st.text(alphabet=["ж", "中", "a", "{", "😀", "🎉"], min_size=1, max_size=300))
@settings(max_examples=200, deadline=None)
def test_ucs2_packing_matches_calculator_algorithm(body: str) -> None:
    body = "ж" + body  # force UCS-2
    sizes = [32 if ord(ch) > 0xFFFF else 16 for ch in body]
    assert count_segments(body) == _calculator_segments(sizes)


# -- calling-code pricing -----------------------------------------------------------

PRICES = {"1": 7_900, "44": 46_300, "447": 50_000, "1876": 95_000, "7": 0}
DEFAULT = 250_000


@pytest.mark.parametrize(
    ("to", "price"),
    [
        pytest.param("+14155550123", 7_900, id="us"),
        pytest.param("+12125550123", 7_900, id="us-other-area-code"),
        pytest.param("+442071838750", 46_300, id="uk-landline"),
        pytest.param("+447700900123", 50_000, id="uk-mobile-longer-prefix"),
        pytest.param("+18765550123", 95_000, id="jamaica-1876-beats-1"),
        pytest.param("+17675550123", 7_900, id="nanp-without-own-entry-falls-to-1"),
        pytest.param("+33612345678", DEFAULT, id="unknown-country-default"),
        pytest.param("+74951234567", 0, id="zero-price-is-a-price-not-a-miss"),
        pytest.param("whatsapp:+447700900123", 50_000, id="whatsapp-prefix"),
        pytest.param("WhatsApp:+14155550123", 7_900, id="whatsapp-prefix-any-case"),
        pytest.param("+12345678", 7_900, id="8-digits-minimum"),
        pytest.param("+123456789012345", 7_900, id="15-digits-maximum"),
    ],
)
def test_calling_code_price(to: str, price: int) -> None:
    assert calling_code_price(to, PRICES, DEFAULT) == price


def test_calling_code_price_empty_table_gives_default() -> None:
    assert calling_code_price("+14155550123", {}, 123) == 123


@pytest.mark.parametrize(
    ("to", "problem"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("14155550123", "must start with '\\+'", id="no-plus"),
        pytest.param(" 14155550123", "starts with a space", id="form-decoded-plus"),
        pytest.param("+1 415 555 0123", "contains ' '", id="spaces"),
        pytest.param("+1-415-555-0123", "contains '-'", id="dashes"),
        pytest.param("+1(415)5550123", "contains '\\('", id="parentheses"),
        pytest.param("+14155550123\n", "contains '\\\\n'", id="trailing-newline"),
        pytest.param(
            "+\u0661\u0664\u0661\u0665\u0665\u0665\u0660\u0661\u0662\u0663",
            "contains '\u0661'",
            id="arabic-indic-digits",
        ),
        pytest.param("+04155550123", "never starts with 0", id="leading-zero"),
        pytest.param("+1234567", "7 digits", id="too-short"),
        pytest.param("+1234567890123456", "16 digits", id="too-long"),
        pytest.param("+", "0 digits", id="plus-only"),
        pytest.param("sms:+14155550123", "whatsapp:", id="unknown-channel"),
        pytest.param("whatsapp:", "empty", id="whatsapp-without-number"),
        pytest.param("whatsapp:whatsapp:+14155550123", "whatsapp:", id="double-prefix"),
        pytest.param("whatsapp:14155550123", "must start with '\\+'", id="whatsapp-no-plus"),
    ],
)
def test_calling_code_price_rejects_non_e164(to: str, problem: str) -> None:
    with pytest.raises(ValueError, match=f"not an E.164 number: .*{problem}"):
        calling_code_price(to, PRICES, DEFAULT)


@given(
    digits=st.text(alphabet="0123456789", min_size=7, max_size=14),
    first=st.sampled_from("123456789"),
    table=st.dictionaries(
        st.text(alphabet="0123456789", min_size=1, max_size=4),
        st.integers(min_value=0, max_value=10**7),
        max_size=30,
    ),
)
@settings(max_examples=300, deadline=None)
def test_calling_code_price_is_longest_prefix(
    digits: str, first: str, table: dict[str, int]
) -> None:
    number = first + digits
    matches = [key for key in table if number.startswith(key)]
    expected = table[max(matches, key=len)] if matches else -1
    assert calling_code_price("+" + number, table, -1) == expected

"""C-FIND attribute matching (PS3.4 C.2.2.2) and return-key projection, over pydicom datasets.

Generic: a query identifier is matched against a full record dataset, and the answer contains
exactly the keys the query asked for (empty when the record has no value), nested sequences
included. Used by the worklist SCP, and by query/retrieve over the storage index.

Rules implemented: universal matching (empty value), single value matching, wildcards `*` and
`?` on string VRs (person names case-insensitive, as most worklist servers do), list-of-UID
matching, date/time/datetime range matching with the combined date-time rule for date+time pairs,
and sequence matching (any record item matching every key of the query's item).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator
from typing import cast

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
#: Keys that steer the query rather than match: never matched, never projected from the record.
NOT_MATCHED = {Tag(0x0008, 0x0005), Tag(0x0008, 0x0052)}  # Specific Character Set, Q/R Level
#: Date and time keys matched together as one date-time (PS3.4 C.2.2.2.5.1).
DATE_TIME_PAIRS = {
    Tag(0x0040, 0x0002): Tag(0x0040, 0x0003),  # Scheduled Procedure Step Start Date/Time
    Tag(0x0008, 0x0020): Tag(0x0008, 0x0030),  # Study Date/Time
    Tag(0x0008, 0x0021): Tag(0x0008, 0x0031),  # Series Date/Time
    Tag(0x0040, 0x0244): Tag(0x0040, 0x0245),  # Performed Procedure Step Start Date/Time
}
PAIRED_TIMES = set(DATE_TIME_PAIRS.values())

_MIN = datetime.datetime.min
_MAX = datetime.datetime.max


class InvalidQuery(Exception):
    """A key's value cannot be used for matching; the reason names the attribute."""


def is_empty(element: DataElement) -> bool:
    if element.VR == "SQ":
        return len(element.value) == 0 or all(len(item) == 0 for item in element.value)
    value = element.value
    return value is None or value == "" or (isinstance(value, list | tuple) and len(value) == 0)


def _text(value: object) -> str:
    return "" if value is None else str(value)


# --- dates and times ----------------------------------------------------------------------------


def _parse_date(text: str, keyword: str) -> datetime.date:
    if not re.fullmatch(r"\d{8}", text):
        raise InvalidQuery(f"{keyword}: {text!r} is not a date (YYYYMMDD)")
    try:
        return datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        raise InvalidQuery(f"{keyword}: {text!r} is not a valid date") from None


def _parse_time(text: str, keyword: str, upper: bool) -> datetime.time:
    """HH, HHMM, HHMMSS or HHMMSS.FFFFFF; a partial upper bound covers its whole precision."""
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?", text.replace(":", ""))
    if not match:
        raise InvalidQuery(f"{keyword}: {text!r} is not a time (HHMMSS)")
    hh, mm, ss, frac = match.groups()
    try:
        return datetime.time(
            int(hh),
            int(mm) if mm else (59 if upper else 0),
            int(ss) if ss else (59 if upper else 0),
            int(frac.ljust(6, "0")) if frac else (999999 if upper and not ss else 0),
        )
    except ValueError:
        raise InvalidQuery(f"{keyword}: {text!r} is not a valid time") from None


def _range(text: str) -> tuple[str, str, bool]:
    """'a-b' -> (a, b, True); 'a' -> (a, a, False)."""
    if "-" in text:
        low, _, high = text.partition("-")
        return low.strip(), high.strip(), True
    return text.strip(), text.strip(), False


def date_bounds(text: str, keyword: str) -> tuple[datetime.date | None, datetime.date | None]:
    low, high, _ = _range(text)
    return (
        _parse_date(low, keyword) if low else None,
        _parse_date(high, keyword) if high else None,
    )


def time_bounds(text: str, keyword: str) -> tuple[datetime.time | None, datetime.time | None]:
    low, high, _ = _range(text)
    return (
        _parse_time(low, keyword, upper=False) if low else None,
        _parse_time(high, keyword, upper=True) if high else None,
    )


def datetime_bounds(
    date_text: str, time_text: str, keyword: str
) -> tuple[datetime.datetime, datetime.datetime]:
    """Combined date-time range of a date key and its time key (either may be empty)."""
    date_low, date_high = date_bounds(date_text, keyword) if date_text else (None, None)
    time_low, time_high = time_bounds(time_text, keyword) if time_text else (None, None)
    lower = datetime.datetime.combine(date_low, time_low or datetime.time.min) if date_low else _MIN
    upper = (
        datetime.datetime.combine(date_high, time_high or datetime.time.max) if date_high else _MAX
    )
    return lower, upper


def _record_date(text: str) -> datetime.date | None:
    """A stored value; one that does not parse matches no range (it never fails the query:
    one object with a malformed date must not break the answers for all the others). The
    pre-3.0 form yyyy.mm.dd is read as a date, as PS3.5 6.2 recommends."""
    if re.fullmatch(r"\d{4}\.\d{2}\.\d{2}", text):
        text = text.replace(".", "")
    try:
        return _parse_date(text, "record date")
    except InvalidQuery:
        return None


def _record_time(text: str) -> datetime.time | None:
    try:
        return _parse_time(text, "record time", upper=False)
    except InvalidQuery:
        return None


def _record_datetime(date_text: str, time_text: str) -> datetime.datetime | None:
    date = _record_date(date_text) if date_text else None
    if date is None:
        return None
    moment = _record_time(time_text) if time_text else datetime.time.min
    return None if moment is None else datetime.datetime.combine(date, moment)


def _match_date_time(query: Dataset, record: Dataset, date_tag: BaseTag) -> bool:
    time_tag = DATE_TIME_PAIRS[date_tag]
    date_text = _text(query[date_tag].value) if date_tag in query else ""
    time_text = _text(query[time_tag].value) if time_tag in query else ""
    if not date_text and not time_text:
        return True
    keyword = query[date_tag].keyword if date_tag in query else query[time_tag].keyword
    record_date = _text(record.get(date_tag).value) if date_tag in record else ""
    record_time = _text(record.get(time_tag).value) if time_tag in record else ""
    if not date_text:  # time-only key: compare the time of day
        low, high = time_bounds(time_text, keyword)
        at = _record_time(record_time) if record_time else None
        if at is None:
            return False
        return (low is None or at >= low) and (high is None or at <= high)
    lower, upper = datetime_bounds(date_text, time_text, keyword)
    moment = _record_datetime(record_date, record_time)
    return moment is not None and bool(lower <= moment <= upper)


# --- strings --------------------------------------------------------------------------------------


def _wildcard(pattern: str, case_insensitive: bool) -> re.Pattern[str]:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(regex, re.IGNORECASE | re.DOTALL if case_insensitive else re.DOTALL)


def _values(value: object) -> list[str]:
    if isinstance(value, list | tuple | MultiValue):
        return [_text(v) for v in value]
    return [_text(value)]


def _person_name(text: str) -> str:
    """A PN value without its insignificant trailing empty components and groups
    (PS3.5 6.2.1: 'BROWN^ALICE^^^' is 'BROWN^ALICE')."""
    groups = [group.rstrip("^ ") for group in text.rstrip().split("=")]
    return "=".join(groups).rstrip("=")


def _padded_person_name(text: str) -> str:
    """Each group of a PN value with all five components: what a wildcard after a component
    delimiter ('BROWN^*') is matched against, so that 'BROWN' and 'BROWN^^^^' match it."""
    groups = _person_name(text).split("=")
    return "=".join("^".join((g.split("^") + [""] * 5)[:5]) for g in groups)


def _match_value(element: DataElement, record_value: object) -> bool:
    vr = element.VR
    values = _values(element.value)
    have_values = _values(record_value)
    if vr == "PN":
        values = [_person_name(v) for v in values]
        if not any(values):  # only delimiters ('^^^^'): a zero-length value, universal
            return True
        have_values = [_person_name(h) for h in have_values]
        have_values += [_padded_person_name(h) for h in have_values]
    if vr == "UI":  # list of UID matching
        return any(_text(v) in have_values for v in values)
    case_insensitive = vr == "PN"
    for value in values:
        text = value.rstrip()
        if vr in WILDCARD_VRS and ("*" in text or "?" in text):
            pattern = _wildcard(text, case_insensitive)
            if any(pattern.fullmatch(h.rstrip()) for h in have_values):
                return True
        elif case_insensitive:
            if any(text.casefold() == h.rstrip().casefold() for h in have_values):
                return True
        elif any(text == h.rstrip() for h in have_values):
            return True
    return False


# --- datasets -------------------------------------------------------------------------------------


def keys(query: Dataset) -> Iterator[DataElement]:
    for element in query:
        if element.tag in NOT_MATCHED or element.tag.element == 0:
            continue
        yield element


def matches(query: Dataset, record: Dataset, *, combined_date_time: bool = True) -> bool:
    """Whether the record matches every key. With `combined_date_time` a date key and its time
    key are one date-time range (PS3.4 C.2.2.2.5.1); Query/Retrieve does this only when the
    SCU negotiated it (C.4.1.1.2 extended negotiation), else each is matched on its own."""
    for element in keys(query):
        tag = element.tag
        if combined_date_time and tag in DATE_TIME_PAIRS:
            if not _match_date_time(query, record, tag):
                return False
            continue
        if combined_date_time and tag in PAIRED_TIMES:
            date_tag = next(d for d, t in DATE_TIME_PAIRS.items() if t == tag)
            if date_tag not in query and not _match_date_time(query, record, date_tag):
                return False
            continue
        if is_empty(element):
            continue
        if element.VR == "SQ":
            if not _match_sequence(element, record.get(tag), combined_date_time):
                return False
            continue
        if tag not in record:
            continue  # a key we do not hold: treated as a return key, not a filter
        if element.VR in ("DA", "TM", "DT"):
            if not _match_temporal(element, record[tag]):
                return False
            continue
        if not _match_value(element, record[tag].value):
            return False
    return True


def _match_temporal(element: DataElement, record_element: DataElement) -> bool:
    text, have = _text(element.value), _text(record_element.value)
    if not have:
        return False
    if element.VR == "DA":
        low, high = date_bounds(text, element.keyword)
        day = _record_date(have)
        return day is not None and (low is None or day >= low) and (high is None or day <= high)
    if element.VR == "TM":
        earliest, latest = time_bounds(text, element.keyword)
        moment = _record_time(have)
        return (
            moment is not None
            and (earliest is None or moment >= earliest)
            and (latest is None or moment <= latest)
        )
    # DT: YYYYMMDDHHMMSS; compare as strings padded to the same precision
    low_text, high_text, _ = _range(text)
    have = have[:14]
    return (not low_text or have >= low_text.ljust(14, "0")[:14]) and (
        not high_text or have <= high_text.ljust(14, "9")[:14]
    )


def _match_sequence(
    element: DataElement, record_element: DataElement | None, combined_date_time: bool
) -> bool:
    item = element.value[0]
    record_items = record_element.value if record_element is not None else []
    if not record_items:
        return all(is_empty(e) for e in keys(item))
    return any(
        matches(item, record_item, combined_date_time=combined_date_time)
        for record_item in record_items
    )


def project(query: Dataset, record: Dataset) -> Dataset:
    """The answer: every key the query carries, with the record's value or empty."""
    answer = Dataset()
    for element in keys(query):
        tag = element.tag
        have = cast(DataElement | None, record.get(tag))  # None when the record lacks it
        if element.VR == "SQ":
            items = have.value if have is not None else []
            template = element.value[0] if len(element.value) else None
            projected = []
            for item in items:
                if template is None or len(template) == 0:
                    projected.append(item)  # an empty item asks for everything in it
                elif matches(template, item):
                    projected.append(project(template, item))
            answer.add_new(tag, "SQ", projected)
        elif have is not None:
            answer.add(have)
        else:
            answer.add_new(tag, element.VR, None)
    return answer

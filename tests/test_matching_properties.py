"""The C-FIND matching rules against a small, obviously correct reference matcher written here
(PS3.4 C.2.2.2), on random records and queries: wildcards, ranges, UID lists, person names
with insignificant trailing components, sequences, and character sets. The pre-encoded answer
path (appliance.dicom.encoded) must give the same bytes' meaning as the generic projection.
Fixed seed and bounded examples, so CI is repeatable."""

from __future__ import annotations

import datetime
import io
import re

import pydicom
import pytest
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pynetdicom.dsutils import decode

from appliance.dicom import encoded, matching
from appliance.dicom.charsets import encode_for

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(autouse=True)
def wildcards_in_any_vr(monkeypatch):
    """Query values such as 'M?' are valid C-FIND keys though not valid CS values: pydicom's
    value validation is for stored data, not for match patterns."""
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)


LETTERS = "ABÉZ"
names = st.lists(st.text(alphabet=LETTERS, min_size=1, max_size=3), min_size=1, max_size=3).map(
    "^".join
)
padded_names = st.tuples(names, st.integers(0, 3)).map(lambda pair: pair[0] + "^" * pair[1])
codes = st.text(alphabet="AB1", min_size=1, max_size=3)
dates = st.dates(datetime.date(2026, 1, 1), datetime.date(2026, 12, 31)).map(
    lambda d: d.strftime("%Y%m%d")
)
uids = st.sampled_from(["1.2.3", "1.2.4", "1.2.5.6"])


@st.composite
def records(draw) -> Dataset:
    ds = Dataset()
    ds.PatientName = draw(padded_names)
    ds.PatientID = draw(codes)
    ds.StudyDate = draw(dates)
    ds.StudyInstanceUID = draw(uids)
    step = Dataset()
    step.Modality = draw(st.sampled_from(["MG", "CT"]))
    step.ScheduledStationAETitle = draw(st.sampled_from(["UNIT1", "UNIT2"]))
    ds.ScheduledProcedureStepSequence = [step]
    return ds


def _wildcard_of(value: str, draw) -> str:
    """A pattern built from `value` (so it often matches) or random."""
    chars = list(value)
    out = []
    for char in chars:
        choice = draw(st.integers(0, 5))
        out.append("?" if choice == 0 else ("*" if choice == 1 else char))
    return "".join(out) or "*"


@st.composite
def queries(draw, record: Dataset) -> Dataset:
    query = Dataset()
    kind = draw(st.sampled_from(["universal", "exact", "wildcard", "other"]))
    name = str(record.PatientName)
    if kind == "universal":
        query.PatientName = ""
    elif kind == "exact":
        query.PatientName = name.rstrip("^") + "^" * draw(st.integers(0, 2))
    elif kind == "wildcard":
        # A wildcard may follow a component delimiter ('BROWN^*'), or the delimiters may be all.
        suffix = draw(st.sampled_from(["", "", "^*", "^^*", "^?*"]))
        query.PatientName = _wildcard_of(name.rstrip("^"), draw) + suffix
    else:
        query.PatientName = draw(st.one_of(names, st.just("^^^^")))
    if draw(st.booleans()):
        query.PatientID = draw(st.one_of(st.just(str(record.PatientID)), codes, st.just("")))
    date_kind = draw(st.sampled_from(["none", "single", "range", "open-low", "open-high"]))
    low, high = sorted([draw(dates), draw(dates)])
    query.StudyDate = {
        "none": "",
        "single": draw(st.one_of(st.just(str(record.StudyDate)), dates)),
        "range": f"{low}-{high}",
        "open-low": f"-{high}",
        "open-high": f"{low}-",
    }[date_kind]
    if draw(st.booleans()):
        query.StudyInstanceUID = draw(
            st.lists(uids, min_size=1, max_size=2, unique=True).map(
                lambda values: values if len(values) > 1 else values[0]
            )
        )
    if draw(st.booleans()):
        step = Dataset()
        step.Modality = draw(st.sampled_from(["", "MG", "CT", "M?"]))
        step.ScheduledStationAETitle = draw(st.sampled_from(["", "UNIT1", "UNIT*"]))
        query.ScheduledProcedureStepSequence = [step]
    return query


# --- the reference ------------------------------------------------------------------------------


def ref_text(pattern: str, value: str, person_name: bool = False) -> bool:
    """Single value or wildcard matching of one string (PS3.4 C.2.2.2.1, C.2.2.2.4)."""
    spellings = [value]
    if person_name:
        # PS3.5 6.2.1: trailing empty components are insignificant, so a name has several
        # spellings ('BROWN', 'BROWN^', ... 'BROWN^^^^'); a pattern matches if it matches one.
        pattern = pattern.rstrip("^")
        if pattern == "":
            return True
        components = value.rstrip("^").split("^")
        spellings = ["^".join(components + [""] * n) for n in range(6 - len(components))] or [
            "^".join(components)
        ]
    if pattern == "":
        return True
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    flags = re.IGNORECASE if person_name else 0
    return any(re.fullmatch(regex, spelling, flags) for spelling in spellings)


def ref_date(query: str, value: str) -> bool:
    if query == "":
        return True
    if "-" not in query:
        return query == value
    low, high = query.split("-")
    return (not low or value >= low) and (not high or value <= high)


def ref_uid(query: str | list[str], value: str) -> bool:
    values = query if isinstance(query, list) else [query]
    return query == "" or value in [str(v) for v in values]


def reference(query: Dataset, record: Dataset) -> bool:
    if not ref_text(str(query.PatientName), str(record.PatientName), person_name=True):
        return False
    if "PatientID" in query and not ref_text(str(query.PatientID or ""), str(record.PatientID)):
        return False
    if not ref_date(str(query.StudyDate or ""), str(record.StudyDate)):
        return False
    if "StudyInstanceUID" in query:
        wanted = query.StudyInstanceUID
        wanted = list(wanted) if not isinstance(wanted, str) else wanted
        if not ref_uid(wanted, str(record.StudyInstanceUID)):
            return False
    if "ScheduledProcedureStepSequence" in query:
        asked = query.ScheduledProcedureStepSequence[0]
        have = record.ScheduledProcedureStepSequence[0]
        for keyword in ("Modality", "ScheduledStationAETitle"):
            if not ref_text(str(asked.get(keyword) or ""), str(have.get(keyword))):
                return False
    return True


@st.composite
def cases(draw) -> tuple[Dataset, Dataset]:
    record = draw(records())
    return record, draw(queries(record))


@seed(20261203)
@SETTINGS
@given(cases())
def test_the_matcher_agrees_with_the_reference(case):
    record, query = case
    assert matching.matches(query, record) == reference(query, record)


@seed(20261203)
@SETTINGS
@given(cases(), st.sampled_from(["ISO_IR 192", "ISO_IR 100", "ISO_IR 6"]), st.booleans())
def test_the_pre_encoded_answer_says_what_the_projection_says(case, term, implicit):
    record, query = case
    query.AccessionNumber = ""  # a key the record does not hold: answered empty
    # Both answer only records that matched (the SCP projects nothing else).
    assume(encoded.expressible(query) and matching.matches(query, record))
    expected = encode_for(matching.project(query, record), term)
    raw = encoded.project(query, encoded.EncodedRecord(encode_for(record, term), term, implicit))
    got = decode(io.BytesIO(raw), implicit, True)
    assert _plain(got) == _plain(expected)


def _plain(ds: Dataset) -> dict:
    out = {}
    for element in ds:
        if element.VR == "SQ":
            out[element.keyword] = [_plain(item) for item in element.value]
        else:
            value = element.value
            out[element.keyword] = "" if value in (None, b"") else str(value)
    return out


def test_the_reference_itself_knows_the_cases_the_review_found():
    """The reference is only a reference if it says what PS3.4 says."""
    assert ref_text("BROWN^ALICE", "BROWN^ALICE^^^", person_name=True)
    assert not ref_text("BROWN^ALIC", "BROWN^ALICE", person_name=True)
    assert ref_text("BROWN^*", "BROWN^^^^", person_name=True)
    assert ref_text("BROWN^*", "BROWN", person_name=True)
    assert ref_text("BROWN^ALICE^*", "BROWN^ALICE^^^", person_name=True)
    assert ref_text("^^^^", "ANYONE", person_name=True)
    assert ref_date("20261101-", "20261122")
    assert not ref_date("-20261101", "20261122")
    record = Dataset()
    record.add(DataElement(0x00100010, "PN", "BROWN^ALICE^^^"))
    query = Dataset()
    query.add(DataElement(0x00100010, "PN", "BROWN^ALICE"))
    assert matching.matches(query, record)

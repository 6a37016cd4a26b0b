"""Answers as bytes: a record's elements encoded once, an answer assembled by concatenation.

Building a pydicom dataset per answer and encoding it costs far more than matching. Instead each
record is encoded element by element (by pydicom, so the bytes are exactly what it would write)
once per record version, character set and transfer syntax; an answer is then the requested
elements' bytes in tag order, with empty elements for keys the record does not hold. This is
the same projection as `matching.project`, limited to the shapes it can express as bytes:
sequences whose query template holds no further non-empty sequence templates.
"""

from __future__ import annotations

import functools

from pydicom import Dataset
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

from appliance.dicom import matching
from appliance.dicom.charsets import is_default_repertoire

_ITEM = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _write(element: DataElement, implicit: bool, encodings: list[str]) -> bytes:
    stream = DicomBytesIO()
    stream.is_little_endian = True
    stream.is_implicit_VR = implicit
    write_data_element(stream, element, encodings)
    return stream.getvalue()


@functools.lru_cache(maxsize=4096)
def _empty(tag: int, vr: str, implicit: bool) -> bytes:
    return _write(DataElement(tag, vr, None), implicit, ["ISO_IR 6"])


def _sequence(tag: int, items: list[bytes], implicit: bool) -> bytes:
    head = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
    head += b"\xff\xff\xff\xff" if implicit else b"SQ\x00\x00\xff\xff\xff\xff"
    return head + b"".join(_ITEM + item + _ITEM_END for item in items) + _SEQUENCE_END


class EncodedRecord:
    """One record's elements as bytes, for one character set and transfer syntax."""

    def __init__(self, record: Dataset, term: str, implicit: bool) -> None:
        encodings = convert_encodings(term.split("\\"))
        self.implicit = implicit
        # The default repertoire is said by leaving Specific Character Set out.
        self.charset = (
            b""
            if is_default_repertoire(term)
            else _write(
                DataElement(0x00080005, "CS", term.split("\\") if "\\" in term else term),
                implicit,
                encodings,
            )
        )
        self.elements = {e.tag: _write(e, implicit, encodings) for e in record}
        self.items = {
            e.tag: [
                {child.tag: _write(child, implicit, encodings) for child in item}
                for item in e.value
            ]
            for e in record
            if e.VR == "SQ"
        }


def expressible(query: Dataset) -> bool:
    """Whether `project` can answer this query's shape (decided before any answer is sent)."""
    for element in matching.keys(query):
        if element.VR == "SQ" and not matching.is_empty(element):
            template = element.value[0]
            if any(c.VR == "SQ" and not matching.is_empty(c) for c in matching.keys(template)):
                return False
    return True


def project(query: Dataset, record: EncodedRecord) -> bytes:
    """The answer's encoded identifier: exactly the requested keys, Specific Character Set first."""
    implicit = record.implicit
    parts = [record.charset]
    for element in matching.keys(query):
        tag = element.tag
        if element.VR == "SQ" and not matching.is_empty(element):
            items = record.items.get(tag, [])
            template = list(matching.keys(element.value[0]))
            # A matching record's item matched the template (records carry at most one item).
            projected = [
                b"".join(item.get(c.tag) or _empty(c.tag, c.VR, implicit) for c in template)
                for item in items[:1]
            ]
            parts.append(_sequence(tag, projected, implicit))
        elif tag in record.elements:
            parts.append(record.elements[tag])
        elif element.VR == "SQ":
            parts.append(_sequence(tag, [], implicit))
        else:
            parts.append(_empty(tag, element.VR, implicit))
    return b"".join(parts)

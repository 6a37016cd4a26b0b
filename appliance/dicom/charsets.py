"""Answering in the character set a modality understands.

Text is kept as Unicode; each answer is encoded in the character set chosen for it. A value
that the set cannot carry is transliterated (accents dropped: ZOË -> ZOE) and anything still
unrepresentable is replaced by a visible '?', never sent as bytes of another character set.
"""

from __future__ import annotations

import unicodedata

from pydicom import Dataset
from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue

TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UC", "UT"}
#: Terms for the default repertoire (ASCII): pydicom maps "ISO_IR 6" to Latin-1, which would
#: let accented letters through as Latin-1 bytes under a label that promises none.
DEFAULT_REPERTOIRE = {"", "ISO_IR 6", "ISO 2022 IR 6"}


def is_default_repertoire(term: str) -> bool:
    return all(part.strip() in DEFAULT_REPERTOIRE for part in term.split("\\"))


def codecs_for(term: str) -> list[str]:
    """Python codecs for a Specific Character Set value ('ISO_IR 100', '\\ISO 2022 IR 87');
    empty if any part is unknown."""
    codecs = []
    for part in term.split("\\"):
        part = part.strip()
        if part in DEFAULT_REPERTOIRE:
            codecs.append("ascii")  # the default repertoire, ISO-IR 6
        elif part in python_encoding:
            codecs.append(python_encoding[part])
        else:
            return []
    return codecs


def _encodes(text: str, codec: str) -> bool:
    try:
        text.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


#: Letters with no decomposition to fold by (Ł is not L plus a mark).
_FOLD = str.maketrans(
    {"Ł": "L", "ł": "l", "Ø": "O", "ø": "o", "Đ": "D", "đ": "d", "ß": "ss", "Æ": "AE",
     "æ": "ae", "Œ": "OE", "œ": "oe", "Þ": "TH", "þ": "th", "Ħ": "H", "ħ": "h", "\u0131": "i"}
)  # fmt: skip


def _fold(char: str) -> str:
    """A letter without its accents (Ë -> E, Ł -> L)."""
    folded = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
    return folded.translate(_FOLD)


def fit(text: str, codecs: list[str]) -> str:
    """`text` as the character set can carry it: each letter it cannot is transliterated
    (its accents dropped), and what is still unrepresentable becomes a visible '?'."""
    if any(_encodes(text, codec) for codec in codecs):
        return text
    out = []
    for char in text:
        if any(_encodes(char, codec) for codec in codecs):
            out.append(char)
            continue
        folded = _fold(char)
        out.append(folded if any(_encodes(folded, codec) for codec in codecs) else "?")
    return "".join(out)


def encode_for(answer: Dataset, term: str) -> Dataset:
    """`answer` with Specific Character Set `term` and every text value fitted to it. Elements
    are replaced, not changed in place: the answer shares them with cached records."""
    codecs = codecs_for(term)
    fitted = Dataset()
    if not is_default_repertoire(term):  # absent: the default repertoire
        fitted.SpecificCharacterSet = term.split("\\") if "\\" in term else term
    _fit_into(answer, fitted, codecs)
    return fitted


def _fit_into(source: Dataset, target: Dataset, codecs: list[str]) -> None:
    for element in source:
        if element.tag == 0x00080005:
            continue
        if element.VR == "SQ":
            items = []
            for item in element.value:
                copy = Dataset()
                _fit_into(item, copy, codecs)
                items.append(copy)
            target.add_new(element.tag, "SQ", items)
        elif element.VR in TEXT_VRS and element.value:
            value = element.value
            fitted: list[str] | str = (
                [fit(str(v), codecs) for v in value]
                if isinstance(value, MultiValue)
                else fit(str(value), codecs)
            )
            target.add(DataElement(element.tag, element.VR, fitted))
        else:
            target.add(element)

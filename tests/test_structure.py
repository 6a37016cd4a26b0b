"""What `storage/structure.py` accepts as whole, on encapsulations real encoders produce, and the
index columns it feeds arriving in a database from the previous release."""

from __future__ import annotations

import io
import sqlite3
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

from appliance.state import StatePaths
from appliance.storage.index import open_database
from appliance.storage.structure import Unsound, check_structure, decode_all
from appliance.testing import synthetic


def _j2k() -> tuple[pydicom.Dataset, bytes]:
    ds = synthetic.mammogram(shape=(64, 48))
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1)).rstrip(b"\x00")
    assert codestream.endswith(b"\xff\xd9")
    return ds, codestream


def _jpeg() -> tuple[pydicom.Dataset, bytes]:
    ds = synthetic.mammogram(shape=(64, 48))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    pixels = np.random.default_rng(1).integers(0, 255, (64, 48), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    return ds, buffer.getvalue()


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def _save(tmp_path: Path, ds: pydicom.Dataset, fragments: list[bytes], name: str) -> Path:
    ds = ds.copy()
    items = b"".join(b"\xfe\xff\x00\xe0" + struct.pack("<I", len(f)) + f for f in fragments)
    basic_offset_table = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
    ds.PixelData = basic_offset_table + items + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _even(data: bytes) -> bytes:
    return data + b"\x00" if len(data) % 2 else data


def _jp2(ds: pydicom.Dataset, codestream: bytes) -> bytes:
    """The codestream in a JP2 file, with an XML box after it (allowed in JP2)."""
    header = _box(b"ihdr", struct.pack(">IIHBBBB", ds.Rows, ds.Columns, 1, 15, 7, 0, 0))
    colour = _box(b"colr", b"\x01\x00\x00\x00\x00\x00\x11")
    return (
        b"\x00\x00\x00\x0cjP  \r\n\x87\n"
        + _box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ")
        + _box(b"jp2h", header + colour)
        + _box(b"jp2c", codestream)
        + _box(b"xml ", b"<a/>")
    )


def _split_end_marker(codestream: bytes) -> list[bytes]:
    """Two fragments with the end marker's FF at the end of the first and D9 in the second
    (PS3.5 A.4 lets a frame be cut at any even boundary). A fill byte 0xFF before a marker is
    allowed in JPEG, and makes the cut land there."""
    if len(codestream) % 2 == 0:
        codestream = codestream[:-2] + b"\xff\xff\xd9"
    return [codestream[:-1], b"\xd9\x00"]


def _halves(codestream: bytes) -> list[bytes]:
    middle = (len(codestream) // 2) & ~1
    return [codestream[:middle], _even(codestream[middle:])]


CASES = {
    "j2k-zero-padding": (_j2k, lambda ds, cs: [_even(cs) + b"\x00" * 4]),
    "j2k-ff-padding": (_j2k, lambda ds, cs: [_even(cs + b"\xff")]),
    "jp2-with-a-box-after-the-codestream": (_j2k, lambda ds, cs: [_even(_jp2(ds, cs))]),
    "jpeg-end-marker-split-across-fragments": (_jpeg, lambda ds, cs: _split_end_marker(cs)),
    "jpeg-two-fragments": (_jpeg, lambda ds, cs: _halves(cs)),
}


@pytest.mark.parametrize("case", CASES)
def test_valid_encapsulations_are_whole(tmp_path, case):
    make, fragments_of = CASES[case]
    ds, codestream = make()
    path = _save(tmp_path, ds, fragments_of(ds, codestream), case)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    assert check_structure(path, header).has_pixels
    assert decode_all(path) == 1


def test_a_codestream_without_its_end_marker_is_not_whole(tmp_path):
    ds, codestream = _j2k()
    path = _save(tmp_path, ds, [_even(codestream[: len(codestream) // 2])], "cut")
    with pytest.raises(Unsound, match="no end-of-image marker"):
        decode_all(path)


#: stored_instances as release 0.1.0 created it (before pixels_state, odd_lengths ...).
SCHEMA_0_1_0 = """
CREATE TABLE stored_instances (
    sop_instance_uid    TEXT PRIMARY KEY,
    storage_path        TEXT NOT NULL UNIQUE,
    file_size           INTEGER NOT NULL,
    storage_hash        TEXT NOT NULL,
    patient_id          TEXT,
    patient_name        TEXT,
    accession_number    TEXT,
    study_instance_uid  TEXT NOT NULL,
    series_instance_uid TEXT,
    sop_class_uid       TEXT NOT NULL,
    modality            TEXT,
    image_laterality    TEXT,
    view_position       TEXT,
    transfer_syntax_uid TEXT NOT NULL,
    number_of_frames    INTEGER,
    source_aet          TEXT,
    source_address      TEXT,
    status              TEXT NOT NULL DEFAULT 'STORED',
    created_at          TEXT NOT NULL
);
"""


def test_a_database_from_the_first_release_gains_the_new_columns_unknown(tmp_path):
    paths = StatePaths(tmp_path)
    old = sqlite3.connect(paths.pacs_db)
    old.executescript(SCHEMA_0_1_0)
    old.execute(
        "INSERT INTO stored_instances (sop_instance_uid, storage_path, file_size, storage_hash,"
        " study_instance_uid, sop_class_uid, transfer_syntax_uid, created_at)"
        " VALUES ('1.2.3', 'a/b.dcm', 10, 'x', '1.2', '1.2.840.10008.5.1.4.1.1.1.2',"
        " '1.2.840.10008.1.2.1', '2026-01-01T00:00:00Z')"
    )
    old.commit()
    old.close()
    database = open_database(paths)
    database.open()
    try:
        with database.reader() as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM stored_instances").fetchone()
    finally:
        database.close()
    assert row["sop_instance_uid"] == "1.2.3"
    assert row["pixels_state"] is None  # not proved: commitment decodes before it confirms
    assert row["odd_lengths"] is None  # unknown: looked up when the instance is sent
    assert row["pipeline_state"] == "PENDING"

"""Only whole data is stored, and only proved-whole data is committed.

Compressed test images come from encoders the project did not write (dcmtk's dcmcjpls,
dcmcjpeg and dcmcrle; OpenJPEG's opj_compress). Damaged copies are sent byte for byte with
pynetdicom's chunked send (a real modality's bytes, not a re-encoding), whole ones with dcmtk's
storescu. Storage commitment reports are heard where the requestor listens.
"""

from __future__ import annotations

import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset, uid
from pydicom.encaps import encapsulate

from appliance.testing import synthetic
from tests.support import (
    ApplianceProcess,
    commitment_request,
    encode,
    free_port,
    hear_commitment,
    index_rows,
    send_files,
    storescu,
    write_config,
)

pytestmark = [pytest.mark.usefixtures("dcmtk", "openjpeg"), pytest.mark.system]

SHAPE = (256, 192)
ITEM = b"\xfe\xff\x00\xe0"
DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    committer = free_port()
    config = write_config(
        root,
        {
            "dicom": {
                "destinations": [{"ae_title": "COMMITTER", "host": "127.0.0.1", "port": committer}]
            },
            "pipeline": {"retry_after_s": 0.2, "max_attempts": 2},
        },
    )
    with ApplianceProcess(config) as app:
        yield {"app": app, "root": root, "committer": committer}


def native(directory: Path, name: str, **fields: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    ds = synthetic.mammogram(shape=SHAPE)
    for keyword, value in fields.items():
        setattr(ds, keyword, value)
    path = directory / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def openjpeg_encoded(directory: Path, name: str) -> Path:
    """A JPEG 2000 lossless image whose codestream OpenJPEG's opj_compress made."""
    ds = pydicom.dcmread(native(directory, f"{name}-native"))
    pgm = directory / f"{name}.pgm"
    pixels = ds.pixel_array.astype(">u2")
    pgm.write_bytes(b"P5\n%d %d\n4095\n" % (ds.Columns, ds.Rows) + pixels.tobytes())
    codestream = directory / f"{name}.j2k"
    subprocess.run(
        ["opj_compress", "-i", str(pgm), "-o", str(codestream)], check=True, capture_output=True
    )
    ds.PixelData = encapsulate([codestream.read_bytes()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid.JPEG2000Lossless
    path = directory / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def compressed(directory: Path, name: str, syntax: str) -> Path:
    if syntax == uid.JPEG2000Lossless:
        return openjpeg_encoded(directory, name)
    return encode(native(directory, f"{name}-native"), directory / f"{name}.dcm", syntax)


ENCODERS = {
    "jpeg-ls (dcmcjpls)": uid.JPEGLSLossless,
    "jpeg lossless (dcmcjpeg)": uid.JPEGLosslessSV1,
    "rle (dcmcrle)": uid.RLELossless,
    "jpeg 2000 (opj_compress)": uid.JPEG2000Lossless,
}


def _last_fragment(data: bytes) -> tuple[int, int]:
    """Where the last fragment's value starts, and its length."""
    end = data.rindex(DELIMITER)
    position = data.index(ITEM, data.rindex(b"\xe0\x7f\x10\x00"))
    last = position
    while position < end:
        last = position
        (length,) = struct.unpack_from("<I", data, position + 4)
        position += 8 + length
    (length,) = struct.unpack_from("<I", data, last + 4)
    return last + 8, length


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.mark.parametrize("syntax", ENCODERS.values(), ids=ENCODERS.keys())
def test_encapsulated_pixel_data_cut_short_is_refused_and_nothing_is_stored(site, tmp_path, syntax):
    whole = compressed(tmp_path, "whole", syntax)
    data = whole.read_bytes()
    start, length = _last_fragment(data)
    cuts = {
        "mid-fragment": data[: start + length // 2],
        "no-delimiter": data[: len(data) - len(DELIMITER)],
    }
    paths = []
    for name, cut in cuts.items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(cut)
        paths.append(path)
    statuses = send_files(site["app"].ports["storage"], paths)
    for response in statuses:
        assert response.Status == 0xA900, response
        assert "Pixel Data" in response.ErrorComment
    stored = {row["sop_instance_uid"] for row in index_rows(site["root"] / "state")}
    assert sop_uid(whole) not in stored
    [accepted] = send_files(site["app"].ports["storage"], [whole])  # the whole one is fine
    assert accepted.Status == 0


def commitment_report(site, references: list[tuple[str, str]]) -> Dataset:
    """Request commitment as COMMITTER; the N-EVENT-REPORT heard where COMMITTER listens."""
    request = commitment_request(references)
    return hear_commitment(site["app"].ports["storage"], site["committer"], request)


DAMAGE = {
    # JPEG-LS cut inside sound items: found by the missing end-of-image marker.
    "jpeg-ls cut": (uid.JPEGLSLossless, lambda fragment: fragment[: (len(fragment) // 3) & ~1]),
    # OpenJPEG's codestream cut with its end marker put back: only the decoder can tell.
    "jpeg 2000 cut, EOC kept": (
        uid.JPEG2000Lossless,
        lambda fragment: fragment[: (len(fragment) // 3) & ~1] + b"\xff\xd9",
    ),
    # RLE segments cut short: the decoder finds its segment table does not fit.
    "rle cut": (uid.RLELossless, lambda fragment: fragment[: (len(fragment) // 3) & ~1]),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_codestream_that_does_not_decode_is_stored_but_never_committed(site, tmp_path, damage):
    """The item structure is sound (lengths fixed up), the codestream inside is not: nothing at
    receive can tell. Commitment asked at once (before the pipeline may have got there) and
    again (from what the index remembers); the pipeline reports it failed at decode."""
    syntax, cut = DAMAGE[damage]
    source = compressed(tmp_path, "source", syntax)  # never sent itself
    data = source.read_bytes()
    start, length = _last_fragment(data)
    damaged = cut(data[start : start + length])
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(data[: start - 4] + struct.pack("<I", len(damaged)) + damaged + DELIMITER)
    good = [
        compressed(tmp_path, "ls", uid.JPEGLSLossless),
        compressed(tmp_path, "j2k", uid.JPEG2000Lossless),
    ]
    statuses = send_files(site["app"].ports["storage"], [broken, *good], calling="COMMITTER")
    assert [s.Status for s in statuses] == [0, 0, 0]  # nothing at receive can tell
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in [broken, *good]]
    refs = [(str(h.SOPClassUID), str(h.SOPInstanceUID)) for h in headers]
    for _ in range(2):
        report = commitment_report(site, refs)
        assert {i.ReferencedSOPInstanceUID for i in report.ReferencedSOPSequence} == {
            instance for _, instance in refs[1:]
        }
        [failed] = report.FailedSOPSequence
        assert failed.ReferencedSOPInstanceUID == refs[0][1]
        assert failed.FailureReason == 0x0110
    assert "event=commitment.instance_unsound" in site["app"].log()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = {r["sop_instance_uid"]: r for r in index_rows(site["root"] / "state")}
        if rows[refs[0][1]]["pipeline_state"] == "FAILED":
            break
        time.sleep(0.3)
    row = rows[refs[0][1]]
    assert (row["pipeline_state"], row["pixels_state"]) == ("FAILED", "BROKEN")
    assert all(rows[instance]["pixels_state"] == "WHOLE" for _, instance in refs[1:])


def test_a_deflated_image_without_pixel_data_is_refused_and_a_whole_one_stored(site, tmp_path):
    whole = encode(
        native(tmp_path, "plain"), tmp_path / "whole.dcm", uid.DeflatedExplicitVRLittleEndian
    )
    stripped = pydicom.dcmread(native(tmp_path, "stripped-source"))
    del stripped.PixelData
    stripped.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    empty = tmp_path / "empty.dcm"
    stripped.save_as(empty, enforce_file_format=True)
    refused, stored = send_files(site["app"].ports["storage"], [empty, whole])
    assert refused.Status == 0xA900
    assert "Pixel Data missing" in refused.ErrorComment
    assert stored.Status == 0


def test_native_pixel_data_shorter_than_its_image_is_refused(site, tmp_path):
    ds = pydicom.dcmread(native(tmp_path, "source"))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]  # a consistent, but half, element
    short = tmp_path / "short.dcm"
    ds.save_as(short, enforce_file_format=True)
    [refused] = send_files(site["app"].ports["storage"], [short])
    assert refused.Status == 0xA900
    assert "Pixel Data holds" in refused.ErrorComment


def test_a_parametric_map_with_float_pixel_data_is_stored(site, tmp_path):
    """Float Pixel Data (7FE0,0008) is an image's pixel data too (PS3.3 C.7.6.3)."""
    ds = synthetic.mammogram(shape=(32, 32))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.30"
    ds.Modality = "OT"
    del ds.PixelData, ds.PixelRepresentation, ds.HighBit, ds.BitsStored
    del ds.WindowCenter, ds.WindowWidth, ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.linspace(0, 1, 32 * 32, dtype="<f4").tobytes()
    path = tmp_path / "pmap.dcm"
    ds.save_as(path, enforce_file_format=True)
    [stored] = send_files(site["app"].ports["storage"], [path])
    assert stored.Status == 0, stored
    row = next(
        r for r in index_rows(site["root"] / "state") if r["sop_instance_uid"] == ds.SOPInstanceUID
    )
    assert row["pixels_state"] == "WHOLE"


def test_whole_images_from_dcmtk_storescu_are_stored(site, tmp_path):
    paths = [
        compressed(tmp_path, name, syntax)
        for name, syntax in [("a", uid.JPEGLSLossless), ("b", uid.RLELossless)]
    ]
    for path, propose in zip(paths, ["-xt", "-xr"], strict=True):  # the file's own syntax
        result = storescu(site["app"].ports["storage"], "-aet", "MODALITY1", propose, str(path))
        assert result.returncode == 0, result.stderr
    stored = {r["sop_instance_uid"] for r in index_rows(site["root"] / "state")}
    assert {sop_uid(p) for p in paths} <= stored

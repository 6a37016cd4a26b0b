"""What a stored instance becomes on the way out when the peer did not accept its syntax: the
choice of syntax, lossless transcoding, Big Endian turned Little, odd lengths padded. Files
made by dcmtk (dcmconv, dcmcjpls); the dataset checked after a real DIMSE encode/decode."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import attrs
import numpy as np
import pydicom
import pytest
from pydicom import uid
from pynetdicom.dsutils import decode, encode

from appliance.dicom import _pynetdicom
from appliance.dicom._pynetdicom import NoSendableSyntax, StoredFile
from appliance.testing import synthetic

pytestmark = pytest.mark.usefixtures("dcmtk")


@attrs.frozen
class Context:
    abstract_syntax: str
    transfer_syntax: list[str]
    as_scu: bool = True


@attrs.frozen
class Peer:
    ae_title: str = "VIEWER"


@attrs.frozen
class Association:
    accepted_contexts: list[Context]
    is_acceptor: bool = True
    requestor: Peer = Peer()


def stored(tmp_path: Path, converter: list[str] | None) -> tuple[Path, np.ndarray]:
    source = tmp_path / "source.dcm"
    ds = synthetic.mammogram(shape=(64, 48))
    ds.save_as(source, enforce_file_format=True)
    if converter is None:
        return source, ds.pixel_array
    target = tmp_path / "stored.dcm"
    subprocess.run([*converter, str(source), str(target)], check=True)
    return target, ds.pixel_array


def on_the_wire(dataset: pydicom.Dataset, syntax: str) -> pydicom.Dataset:
    ts = uid.UID(syntax)
    received = decode(
        io.BytesIO(encode(dataset, ts.is_implicit_VR, ts.is_little_endian)),
        ts.is_implicit_VR,
        ts.is_little_endian,
    )
    received.file_meta = pydicom.dataset.FileMetaDataset()
    received.file_meta.TransferSyntaxUID = ts
    return received


def offered(sop_class: str, *syntaxes: str) -> Association:
    return Association([Context(sop_class, [s]) for s in syntaxes])


@pytest.mark.parametrize(
    ("converter", "accepted"),
    [
        (["dcmconv", "+tb"], uid.ExplicitVRLittleEndian),  # Big Endian stored, LE wanted
        (["dcmcjpls"], uid.ExplicitVRLittleEndian),  # JPEG-LS stored, uncompressed wanted
        (["dcmcjpls"], uid.JPEG2000Lossless),  # JPEG-LS stored, JPEG 2000 wanted: transcoded
        (None, uid.JPEGLSLossless),  # uncompressed stored, JPEG-LS wanted: encoded
    ],
    ids=["big-endian", "jpeg-ls-to-plain", "jpeg-ls-to-j2k", "plain-to-jpeg-ls"],
)
def test_the_pixels_arrive_unchanged_in_the_syntax_the_peer_took(tmp_path, converter, accepted):
    path, pixels = stored(tmp_path, converter)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    instance = StoredFile(
        path, header.SOPClassUID, header.SOPInstanceUID, header.file_meta.TransferSyntaxUID
    )
    sent = instance.for_association(offered(header.SOPClassUID, accepted))
    assert isinstance(sent, pydicom.Dataset)
    assert sent.file_meta.TransferSyntaxUID == accepted
    if uid.UID(accepted).is_encapsulated:
        assert np.array_equal(sent.pixel_array, pixels)
    else:
        assert np.array_equal(on_the_wire(sent, accepted).pixel_array, pixels)


def test_the_stored_syntax_is_sent_as_the_file_itself(tmp_path):
    path, _ = stored(tmp_path, ["dcmcjpls"])
    header = pydicom.dcmread(path, stop_before_pixels=True)
    instance = StoredFile(path, header.SOPClassUID, header.SOPInstanceUID, uid.JPEGLSLossless)
    association = offered(header.SOPClassUID, uid.ExplicitVRLittleEndian, uid.JPEGLSLossless)
    assert instance.for_association(association) == path


def test_an_image_no_accepted_encoder_can_hold_fails_with_every_reason(tmp_path):
    """32 bits per sample fit neither JPEG-LS nor RLE: each encoder is tried, the refusal says
    why for both (the sub-operation fails, the others go on)."""
    ds = synthetic.mammogram(shape=(32, 32))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.PixelData = (np.arange(32 * 32, dtype="<u4") * 65599).tobytes()
    path = tmp_path / "wide.dcm"
    ds.save_as(path, enforce_file_format=True)
    instance = StoredFile(path, ds.SOPClassUID, ds.SOPInstanceUID, uid.ExplicitVRLittleEndian)
    with pytest.raises(NoSendableSyntax) as refused:
        instance.for_association(offered(ds.SOPClassUID, uid.JPEGLSLossless, uid.RLELossless))
    assert uid.JPEGLSLossless in str(refused.value)
    assert uid.RLELossless in str(refused.value)


def test_nothing_sendable_is_a_clear_refusal(tmp_path):
    path, _ = stored(tmp_path, None)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    instance = StoredFile(
        path, header.SOPClassUID, header.SOPInstanceUID, uid.ExplicitVRLittleEndian
    )
    with pytest.raises(NoSendableSyntax, match="VIEWER accepted none"):
        instance.for_association(offered(header.SOPClassUID, uid.JPEGBaseline8Bit))


def test_a_non_image_class_is_never_offered_compressed():
    sr = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    assert _pynetdicom.syntaxes.sendable(sr) == [
        uid.ExplicitVRLittleEndian,
        uid.ImplicitVRLittleEndian,
    ]

"""Vendor-style mammograms built outside the appliance's own image code, encoded by dcmtk's and
OpenJPEG's encoders, and their reference renderings (dcmtk's dcm2pnm, or PS3.3 C.11 written here
for what dcmtk cannot decode).

A case is an uncompressed dataset in a vendor's style (photometric interpretation, Presentation
LUT Shape, VOI by window, table or none, bits, sign, enhanced multi-frame functional groups) and
the encoder that makes the file under test. The reference never uses appliance code: pixels come
from dcmtk or from `opj_decompress`, and the display rules below are the standard's, one line each.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from attrs import frozen
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

ROWS, COLUMNS = 1024, 832
MG = "1.2.840.10008.5.1.4.1.1.1.2"
BTO = "1.2.840.10008.5.1.4.1.1.13.1.3"
ROOT = "1.2.826.0.1.3680043.8.498."


def tissue(rows: int = ROWS, columns: int = COLUMNS) -> np.ndarray:
    """0..1 'how much tissue': a half-ellipse against the chest wall on the left, with texture."""
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float64)
    distance = (x / (0.8 * columns)) ** 2 + ((y - rows / 2) / (0.42 * rows)) ** 2
    breast = np.clip(1.0 - distance, 0.0, 1.0) ** 0.4
    texture = 1.0 + 0.1 * np.sin(x / 19.0) * np.cos(y / 23.0)
    result: np.ndarray = np.clip(breast * texture, 0.0, 1.0)
    return result


def _base(sop_class: str = MG) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(ROOT)
    ds.StudyInstanceUID = generate_uid(ROOT)
    ds.SeriesInstanceUID = generate_uid(ROOT)
    ds.PatientID, ds.PatientName = "CORPUS", "CORPUS^CASE"
    ds.Modality = "MG"
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.BitsAllocated = 16
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def vendor_image(
    *,
    bits: int = 12,
    photometric: str = "MONOCHROME2",
    shape: str | None = "IDENTITY",
    signed: bool = False,
    voi: str = "window",
    function: str | None = None,
    rescale: tuple[float, float] = (1.0, 0.0),
) -> Dataset:
    """A For Presentation mammogram with tissue bright once displayed. MONOCHROME1 stores tissue
    as low values (Fuji/Konica style); signed images store around zero."""
    ds = _base()
    top = (1 << bits) - 1
    stored = 60 + tissue() * (top * 0.9 - 60)
    if photometric == "MONOCHROME1":
        stored = top - stored
    if signed:
        stored = stored - (1 << (bits - 1))
    values = np.rint(stored).astype(np.int16 if signed else np.uint16)
    ds.PhotometricInterpretation = photometric
    if shape:
        ds.PresentationLUTShape = shape
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, int(signed)
    slope, intercept = rescale
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    low, high = float(values.min()) * slope + intercept, float(values.max()) * slope + intercept
    if voi == "window":
        # A window a little inside the data, as a unit's processing would choose.
        ds.WindowCenter = round((low + high) / 2)
        ds.WindowWidth = round((high - low) * 0.9)
        if function:
            ds.VOILUTFunction = function
    elif voi == "table":
        lut = Dataset()
        first, entries = int(low), int(high - low) + 1
        lut.LUTDescriptor = [entries, first, 12]
        ramp = np.linspace(0.0, 1.0, entries) ** 0.7  # a vendor's non-linear tone curve
        lut.add_new(0x00283006, "US", [int(v) for v in np.rint(ramp * 4095)])  # LUT Data
        ds.VOILUTSequence = [lut]
    ds.PixelData = values.tobytes()
    return ds


def tomosynthesis(frames: int = 5) -> Dataset:
    """An enhanced multi-frame breast tomosynthesis object whose window is only in its
    functional groups: a Frame VOI LUT per frame (each frame its own; a macro is in the shared
    or the per-frame groups, never both, C.7.6.16), and a misleading top-level window."""
    ds = _base(BTO)
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PresentationLUTShape = "IDENTITY"
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 10, 9, 0
    ds.NumberOfFrames = frames
    slices = [np.rint(40 + tissue() * (700 + 40 * i)).astype(np.uint16) for i in range(frames)]
    shared, transform = Dataset(), Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, 0, "US"
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.WindowCenter, ds.WindowWidth = 900, 200  # a window no frame should be shown with
    per_frame = []
    for index in range(frames):
        group, frame_voi = Dataset(), Dataset()
        frame_voi.WindowCenter, frame_voi.WindowWidth = (
            (350, 400)
            if index == frames // 2
            else (
                900,
                200,
            )
        )
        group.FrameVOILUTSequence = [frame_voi]
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.stack(slices).tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def dcmtk_encode(tool: list[str], source: Path, target: Path) -> Path:
    subprocess.run([*tool, str(source), str(target)], check=True, capture_output=True)
    return target


def opj_encode(
    ds: Dataset,
    target: Path,
    precision: int,
    *,
    signed: bool | None = None,
    levels: int | None = None,
) -> Path:
    """JPEG 2000 lossless by OpenJPEG's own encoder, the codestream's precision (and sign, and
    decomposition levels) chosen independently of the header (as some field encoders do)."""
    pixels = ds.pixel_array
    signed = int(ds.PixelRepresentation) == 1 if signed is None else signed
    raw = target.with_suffix(".rawl")
    raw.write_bytes(np.ascontiguousarray(pixels.astype("<i2" if signed else "<u2")).tobytes())
    codestream = target.with_suffix(".j2k")
    shape = f"{ds.Columns},{ds.Rows},1,{precision},{'s' if signed else 'u'}"
    resolutions = ["-n", str(levels + 1)] if levels is not None else []
    subprocess.run(
        ["opj_compress", "-i", str(raw), "-o", str(codestream), "-F", shape, *resolutions],
        check=True,
        capture_output=True,
    )
    encoded = pydicom.Dataset(ds)
    encoded.file_meta = FileMetaDataset(ds.file_meta)
    encoded.file_meta.TransferSyntaxUID = JPEG2000Lossless
    encoded.PixelData = encapsulate([codestream.read_bytes()])
    encoded["PixelData"].VR = "OB"
    return save(encoded, target)


# -- references ---------------------------------------------------------------------------------


def dcmtk_rendering(path: Path, ds: Dataset, workdir: Path) -> np.ndarray:
    """dcmtk's 8-bit rendering with the object's own VOI (the first window or table); with
    none, dcmtk's min-max window (the appliance's automatic window is over the 0.5-99.5
    percentiles, which for a mammogram is the same span within a grey level or two)."""
    voi = (
        ["+Wi", "1"]
        if "WindowCenter" in ds
        else ["+Wl", "1"]
        if "VOILUTSequence" in ds
        else ["+Wm"]
    )
    out = workdir / f"{path.stem}.dcmtk.pgm"
    syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    # dcmtk's renderers: dcmj2pnm for JPEG, dcml2pnm for JPEG-LS, dcm2pnm for the rest.
    tool = (
        "dcml2pnm"
        if syntax.startswith("1.2.840.10008.1.2.4.8")
        else ("dcmj2pnm" if syntax.startswith("1.2.840.10008.1.2.4.") else "dcm2pnm")
    )
    subprocess.run([tool, *voi, str(path), str(out)], check=True, capture_output=True)
    with Image.open(out) as image:
        return np.asarray(image.convert("L"), dtype=np.float64)


def opj_pixels(path: Path, workdir: Path) -> np.ndarray:
    """Stored values as OpenJPEG's own decoder gives them (no scaling to any bit depth)."""
    ds = pydicom.dcmread(path)
    from pydicom.encaps import generate_frames

    codestream = workdir / f"{path.stem}.ref.j2k"
    codestream.write_bytes(next(generate_frames(ds.PixelData, number_of_frames=1)))
    out = workdir / f"{path.stem}.ref.rawl"  # little-endian samples
    subprocess.run(
        ["opj_decompress", "-i", str(codestream), "-o", str(out)], check=True, capture_output=True
    )
    dtype = "<i2" if int(ds.PixelRepresentation) else "<u2"
    values = np.frombuffer(out.read_bytes(), dtype=dtype)
    return values.reshape(int(ds.Rows), int(ds.Columns)).astype(np.float64)


def c11_rendering(stored: np.ndarray, ds: Dataset, frame: Dataset | None = None) -> np.ndarray:
    """PS3.3 C.11 on stored values: Modality LUT, VOI, Presentation LUT; 8-bit grey levels.
    `frame` holds the frame's functional-group values (rescale, window) when there are some."""
    source = frame if frame is not None else ds
    values = stored * float(source.get("RescaleSlope", 1)) + float(
        source.get("RescaleIntercept", 0)
    )
    if "WindowCenter" in source:
        c, w = float(source.WindowCenter), float(source.WindowWidth)
        function = str(source.get("VOILUTFunction", "LINEAR"))
        if function == "SIGMOID":
            grey = 1 / (1 + np.exp(-4 * (values - c) / w))
        elif function == "LINEAR_EXACT":
            grey = np.clip((values - c) / w + 0.5, 0, 1)
        else:  # C.11.2.1.2.1
            grey = np.clip(((values - (c - 0.5)) / (w - 1)) + 0.5, 0, 1)
    else:
        lut = ds.VOILUTSequence[0]
        entries, first, bits = (int(v) for v in lut.LUTDescriptor)
        table = np.asarray(lut.LUTData, dtype=np.float64)
        grey = table[np.clip(np.rint(values) - first, 0, entries - 1).astype(int)] / (
            (1 << bits) - 1
        )
    # C.8.11.1.1.1: MONOCHROME1 is displayed inverted (Presentation LUT Shape INVERSE is how
    # that is declared, not a second inversion); MONOCHROME2 is inverted only by INVERSE.
    invert = ds.PhotometricInterpretation == "MONOCHROME1" or (
        ds.get("PresentationLUTShape") == "INVERSE"
    )
    if invert:
        grey = 1 - grey
    return np.asarray(np.rint(grey * 255), dtype=np.float64)


@frozen
class Case:
    name: str
    build: Callable[[], Dataset]
    #: ("dcmtk", [tool...]) | ("opj", precision or (precision, signed, levels)) | ("none", None)
    encoder: tuple[str, object]
    #: "dcmtk" (dcm2pnm renders the file) or "c11" (the reference above, on OpenJPEG's pixels)
    reference: str
    #: Bits Stored the encoded file's header claims, when it differs from the samples' (a
    #: field mismatch: e.g. 14-bit samples in a precision-14 codestream, the header saying 16).
    claimed_bits_stored: int | None = None


CASES = [
    Case("hologic-mono2-window-uncompressed", vendor_image, ("none", None), "dcmtk"),
    Case("hologic-mono2-window-jpeg-lossless", vendor_image, ("dcmtk", ["dcmcjpeg"]), "dcmtk"),
    Case(
        "siemens-mono2-voi-lut-jpeg-ls",
        lambda: vendor_image(voi="table"),
        ("dcmtk", ["dcmcjpls"]),
        "dcmtk",
    ),
    Case(
        "agfa-mono2-no-voi-rle",
        lambda: vendor_image(voi="none"),
        ("dcmtk", ["dcmcrle"]),
        "dcmtk",
    ),
    Case(
        "fuji-mono1-inverse-rle",
        lambda: vendor_image(bits=10, photometric="MONOCHROME1", shape="INVERSE"),
        ("dcmtk", ["dcmcrle"]),
        "dcmtk",
    ),
    Case(
        "konica-mono1-inverse-jpeg-ls",
        lambda: vendor_image(photometric="MONOCHROME1", shape="INVERSE"),
        ("dcmtk", ["dcmcjpls"]),
        "dcmtk",
    ),
    Case(
        "mono1-without-shape-uncompressed",
        lambda: vendor_image(photometric="MONOCHROME1", shape=None),
        ("none", None),
        "dcmtk",
    ),
    Case(
        "ge-14-bit-sigmoid-jpeg-lossless",
        lambda: vendor_image(bits=14, function="SIGMOID"),
        ("dcmtk", ["dcmcjpeg"]),
        "dcmtk",
    ),
    Case(
        "16-bit-rescaled-uncompressed",
        lambda: vendor_image(bits=16, rescale=(0.5, -100.0)),
        ("none", None),
        "dcmtk",
    ),
    Case(
        "signed-16-bit-jpeg-ls",
        lambda: vendor_image(bits=16, signed=True),
        ("dcmtk", ["dcmcjpls"]),
        "dcmtk",
    ),
    Case("j2k-12-bit-precision-12", vendor_image, ("opj", 12), "c11"),
    Case("j2k-bits-stored-12-precision-16", vendor_image, ("opj", 16), "c11"),
    Case(
        "j2k-bits-stored-16-precision-14",
        lambda: vendor_image(bits=14),
        ("opj", 14),
        "c11",
        claimed_bits_stored=16,
    ),
    Case("j2k-signed-16-bit", lambda: vendor_image(bits=16, signed=True), ("opj", 16), "c11"),
    # A signed codestream under an unsigned header (the sign bit of SIZ set, values positive).
    Case("j2k-signed-codestream-unsigned-header", vendor_image, ("opj", (16, True, 0)), "c11"),
    # No decomposition level: the reduced decode may skip no halving, not the one it wants.
    Case("j2k-no-decomposition-level", vendor_image, ("opj", (12, False, 0)), "c11"),
    Case(
        "j2k-mono1-inverse",
        lambda: vendor_image(photometric="MONOCHROME1", shape="INVERSE"),
        ("opj", 12),
        "c11",
    ),
]


def make(case: Case, workdir: Path) -> tuple[Path, Dataset]:
    """The file under test and the dataset it was made from."""
    ds = case.build()
    plain = save(ds, workdir / f"{case.name}.plain.dcm")
    kind, argument = case.encoder
    if kind == "none":
        return plain, ds
    target = workdir / f"{case.name}.dcm"
    if kind == "dcmtk":
        assert isinstance(argument, list)
        return dcmtk_encode(argument, plain, target), ds
    precision, signed, levels = argument if isinstance(argument, tuple) else (argument, None, None)
    assert isinstance(precision, int)
    encoded = opj_encode(ds, target, precision, signed=signed, levels=levels)
    if case.claimed_bits_stored is not None:
        bits = case.claimed_bits_stored
        patched = pydicom.dcmread(encoded)
        patched.BitsStored, patched.HighBit = bits, bits - 1
        save(patched, encoded)
        ds.BitsStored, ds.HighBit = bits, bits - 1
    return encoded, ds


def reference(case: Case, path: Path, ds: Dataset, workdir: Path) -> np.ndarray:
    if case.reference == "dcmtk":
        return dcmtk_rendering(path, ds, workdir)
    return c11_rendering(opj_pixels(path, workdir), ds)

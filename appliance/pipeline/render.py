"""Thumbnails and previews of a stored image, displayed as a radiologist expects.

Display pipeline (PS3.3 C.11): Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence),
VOI (first Window Center/Width, with VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID; else
the VOI LUT Sequence; else a robust automatic window), then polarity: MONOCHROME1 is shown
inverted once, whatever its Presentation LUT Shape (the mammography IODs require INVERSE with
MONOCHROME1: it is how MONOCHROME1 is realised for display, not a second inversion); a
MONOCHROME2 image is inverted only by INVERSE. Multi-frame objects (tomosynthesis) show their
central frame, with that frame's functional groups (Frame VOI LUT, Pixel Value
Transformation; per-frame over shared). Pixels are reduced before any floating-point work:
JPEG 2000 is decoded at reduced resolution by OpenJPEG (through Pillow), other syntaxes are
area-averaged. A rendering that is uniform although the stored values vary is refused: a
thumbnail is evidence a radiographer looks at.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from attrs import frozen
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut
from pydicom.pixels.utils import pixel_array

JPEG_2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}


@frozen
class Rendition:
    height: int
    quality: int


class RenderError(Exception):
    """The image cannot be rendered; ``phase`` names where (decode, display, render, write,
    worker). ``final``: trying again cannot change the outcome (no retries)."""

    def __init__(self, phase: str, reason: str, final: bool = False) -> None:
        super().__init__(f"{phase}: {reason}")
        self.phase = phase
        self.reason = reason
        self.final = final

    def __reduce__(self) -> tuple[type[RenderError], tuple[str, str, bool]]:
        return type(self), (self.phase, self.reason, self.final)


@frozen
class Codestream:
    """What a JPEG 2000 codestream's main header says (ISO/IEC 15444-1 A.5.1 SIZ, A.6.1 COD)."""

    precision: int  # bits of the first component's samples
    signed: bool
    components: int
    levels: int  # wavelet decomposition levels: how many halvings a decoder may skip


def jpeg2000_header(codestream: bytes) -> Codestream | None:
    """The main header's facts, or None when SIZ or COD is not where it must be."""
    start = codestream.find(b"\xff\x4f\xff\x51")  # SOC then SIZ (a JP2 wrapper may precede it)
    if start < 0 or len(codestream) < start + 2 + 41:
        return None
    siz = start + 2
    components = int.from_bytes(codestream[siz + 38 : siz + 40], "big")
    ssiz = codestream[siz + 40]  # after SIZ's marker, Lsiz, Rsiz, 8 sizes and Csiz
    cod = codestream.find(
        b"\xff\x52", siz + 2 + int.from_bytes(codestream[siz + 2 : siz + 4], "big")
    )
    if cod < 0 or len(codestream) < cod + 10:
        return None
    levels = codestream[cod + 9]  # after COD's marker, Lcod, Scod and SGcod (4 bytes)
    return Codestream((ssiz & 0x7F) + 1, bool(ssiz & 0x80), components, levels)


def _jpeg2000_reduced(path: Path, header: pydicom.Dataset, height: int) -> np.ndarray | None:
    """Decode only the resolution levels needed; None where this path does not apply (signed
    or multi-component data, multi-frame objects, precision over 16, a header it cannot read,
    a codestream Pillow cannot decode at that resolution): the full decode is used instead."""
    if header.get("PixelRepresentation", 0) != 0 or int(header.get("NumberOfFrames") or 1) != 1:
        return None
    codestream = next(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))
    facts = jpeg2000_header(codestream)
    if facts is None or facts.signed or facts.components != 1 or facts.precision > 16:
        return None
    rows = int(header.Rows)
    wanted = max(int(math.log2(rows / height)), 0) if rows > height else 0
    image = Image.open(io.BytesIO(codestream))
    image.reduce = min(wanted, facts.levels)  # type: ignore[method-assign,assignment]
    try:
        image.load()
    except OSError:  # Pillow's OpenJPEG path refused it: pydicom's decoder may not
        return None
    pixels = np.asarray(image)
    if image.mode == "I;16" and facts.precision < 16:
        # Pillow scales OpenJPEG's samples to 16 bits by the codestream's own precision, which
        # need not be Bits Stored (both mismatches exist in the field): undo exactly that.
        pixels = pixels >> (16 - facts.precision)
    return pixels


def _area_reduce(pixels: np.ndarray, height: int) -> np.ndarray:
    factor = pixels.shape[0] // height
    if factor < 2:
        return pixels.astype(np.float32)
    rows, columns = (pixels.shape[0] // factor) * factor, (pixels.shape[1] // factor) * factor
    blocks = pixels[:rows, :columns].reshape(rows // factor, factor, columns // factor, factor)
    reduced: np.ndarray = blocks.mean(axis=(1, 3), dtype=np.float32)
    return reduced


def decode(
    path: Path, header: pydicom.Dataset, height: int, decoded: np.ndarray | None = None
) -> np.ndarray:
    """The (central) frame's stored values, reduced to about `height` rows or more; `decoded`
    is that frame when a proof has just decoded it (monochrome only)."""
    syntax = str(header.file_meta.TransferSyntaxUID)
    if decoded is not None and decoded.ndim == 2:
        return _area_reduce(decoded, height)
    try:
        if syntax in JPEG_2000:
            reduced = _jpeg2000_reduced(path, header, height)
            if reduced is not None:
                return _area_reduce(reduced, height)
        multi_frame = int(header.get("NumberOfFrames") or 1) > 1
        pixels = pixel_array(path, index=central_frame(header) if multi_frame else None)
    except Exception as exc:  # codecs raise anything: ValueError, RuntimeError, OSError ...
        raise RenderError("decode", f"{type(exc).__name__}: {exc}") from exc
    if pixels.ndim == 3 and int(header.get("SamplesPerPixel", 1)) == 1:
        pixels = pixels[0]
    return pixels if pixels.ndim == 3 else _area_reduce(pixels, height)


def _first(value: Any) -> float:
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Map to 0..1 per PS3.3 C.11.2.1.2."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    width = max(width, 1.0)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _voi_lut(values: np.ndarray, lut: pydicom.Dataset) -> np.ndarray:
    """PS3.3 C.11.2.1.1: a table lookup; inputs outside the table take its first/last entry."""
    entries, first, bits = (int(v) for v in lut.LUTDescriptor)
    entries = entries or 65536
    data = lut.LUTData
    if isinstance(data, bytes):
        table = np.frombuffer(data, dtype="<u2")
        if bits <= 8 and len(table) * 2 == entries:  # 8-bit entries packed two to a word
            table = np.frombuffer(data, dtype=np.uint8)
    else:
        table = np.asarray(data if isinstance(data, list | MultiValue) else [data])
    index = np.clip(np.rint(values) - first, 0, len(table) - 1).astype(np.intp)
    looked_up: np.ndarray = table[index].astype(np.float32) / float((1 << bits) - 1)
    return looked_up


#: What a frame's functional groups (PS3.3 C.7.6.16) say about display, macro -> attributes.
FRAME_DISPLAY_MACROS = {
    "PixelValueTransformationSequence": (
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "ModalityLUTSequence",
    ),
    # Frame VOI LUT, or Frame VOI LUT With LUT (the tomosynthesis IOD's): a window or a table.
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence"),
}


def frame_header(header: pydicom.Dataset, index: int) -> pydicom.Dataset:
    """The header as frame `index` of an enhanced multi-frame object is displayed: each display
    macro's item, from the frame's own group or else the shared one (a macro is in one of
    them), replaces everything at the top level it speaks of. Other objects are returned as
    they are."""
    shared = (header.get("SharedFunctionalGroupsSequence") or [None])[0]
    frames = header.get("PerFrameFunctionalGroupsSequence") or []
    frame = frames[index] if index < len(frames) else None
    found = {}
    for macro in FRAME_DISPLAY_MACROS:
        for group in (frame, shared):
            if group is not None and group.get(macro):
                found[macro] = group.get(macro)[0]
                break
    if not found:
        return header
    effective = pydicom.Dataset()
    effective.update(header)  # shallow: the elements are shared, not copied
    for macro, item in found.items():
        for keyword in FRAME_DISPLAY_MACROS[macro]:
            if keyword in effective:
                del effective[keyword]
            if keyword in item:
                effective[keyword] = item[keyword]
    return effective


def inverted(header: pydicom.Dataset) -> bool:
    """Whether displayed grey levels are inverted: MONOCHROME1 once, whatever its Presentation
    LUT Shape (INVERSE is how MONOCHROME1 is realised, C.8.11.1.1.1 and C.11.6); MONOCHROME2
    only with INVERSE."""
    if str(header.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        return True
    return str(header.get("PresentationLUTShape", "")) == "INVERSE"


def display(stored: np.ndarray, header: pydicom.Dataset) -> np.ndarray:
    """Stored values -> displayed grey levels 0..1."""
    if "ModalityLUTSequence" in header:
        values = apply_modality_lut(stored.astype(np.uint16), header).astype(np.float32)
    else:
        slope = float(header.get("RescaleSlope", 1) or 1)
        intercept = float(header.get("RescaleIntercept", 0) or 0)
        values = stored * np.float32(slope) + np.float32(intercept)
    if header.get("WindowCenter") not in (None, "") and header.get("WindowWidth") not in (None, ""):
        function = str(header.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        grey = _window(values, _first(header.WindowCenter), _first(header.WindowWidth), function)
    elif "VOILUTSequence" in header:
        grey = _voi_lut(values, header.VOILUTSequence[0])
    else:  # no VOI given: a robust automatic window over the image's own values
        low, high = np.percentile(values, (0.5, 99.5))
        grey = np.clip((values - low) / max(high - low, 1.0), 0.0, 1.0)
    return 1.0 - grey if inverted(header) else grey


#: A rendering with this share of its pixels within NEAR_EXTREME grey levels of black (or of
#: white) is not an image: a mammogram shows its tissue well inside the grey scale.
UNIFORM_SHARE = 0.995
NEAR_EXTREME = 12


def check_not_uniform(stored: np.ndarray, levels: np.ndarray) -> None:
    """Refuse a rendering that is (nearly) all black or all white while the stored values'
    histogram says there is an image (their 1st and 99th percentiles differ): the sign of a
    decoder or a display rule gone wrong (a mis-scaled codestream, a window far outside the
    data). A flat field with a few marks (a specimen, a text overlay) is not refused."""
    if levels.size == 0:
        return
    low, high = (float(v) for v in np.percentile(stored, (1, 99)))
    if high <= low:
        return
    dark = float(np.count_nonzero(levels <= NEAR_EXTREME)) / levels.size
    light = float(np.count_nonzero(levels >= 255 - NEAR_EXTREME)) / levels.size
    for share, colour in ((dark, "black"), (light, "white")):
        if share >= UNIFORM_SHARE:
            raise RenderError(
                "render",
                f"rendering is {share:.1%} {colour} although the stored values vary "
                f"({low:g}..{high:g} between the 1st and 99th percentiles): not shown as an image",
                final=True,
            )


def central_frame(header: pydicom.Dataset) -> int:
    """The frame a multi-frame object is shown by."""
    frames = int(header.get("NumberOfFrames") or 1)
    return frames // 2 if frames > 1 else 0


def render(
    path: Path, renditions: Sequence[Rendition], decoded: np.ndarray | None = None
) -> list[bytes] | None:
    """JPEG bytes for each rendition, or None for an object without pixel data. `decoded`:
    the central frame's stored values when already decoded (by the proof)."""
    header = pydicom.dcmread(path, stop_before_pixels=True)
    if "Rows" not in header:
        return None
    tallest = max(r.height for r in renditions)
    pixels = decode(path, header, tallest, decoded)
    try:
        if pixels.ndim == 3:  # colour (e.g. secondary capture): pydicom already gave RGB
            image = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
        else:
            grey = display(pixels, frame_header(header, central_frame(header)))
            levels = (grey * 255.0 + 0.5).astype(np.uint8)
            image = Image.fromarray(levels)
    except Exception as exc:
        raise RenderError("display", f"{type(exc).__name__}: {exc}") from exc
    if pixels.ndim != 3:
        check_not_uniform(pixels, levels)
    outputs = []
    for rendition in renditions:
        scaled = image
        if image.height != rendition.height:
            width = max(1, round(image.width * rendition.height / image.height))
            scaled = image.resize((width, rendition.height), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        scaled.save(buffer, "JPEG", quality=rendition.quality)
        outputs.append(buffer.getvalue())
    return outputs

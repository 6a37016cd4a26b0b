"""Thumbnails and previews of a stored image, displayed as a radiologist expects.

Display pipeline (PS3.3 C.11): Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence),
VOI (first Window Center/Width, with VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID; else
the VOI LUT Sequence; else a robust automatic window), then polarity (MONOCHROME1 and
Presentation LUT Shape INVERSE are shown inverted). Multi-frame objects (tomosynthesis) show
their central frame. Pixels are reduced before any floating-point work: JPEG 2000 is decoded
at reduced resolution by OpenJPEG (through Pillow), other syntaxes are area-averaged.
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
    """The image cannot be rendered; ``phase`` names where (decode, display, encode)."""

    def __init__(self, phase: str, reason: str) -> None:
        super().__init__(f"{phase}: {reason}")
        self.phase = phase


def _jpeg2000_reduced(path: Path, header: pydicom.Dataset, height: int) -> np.ndarray | None:
    """Decode only the resolution levels needed; None where this path does not apply."""
    if header.get("PixelRepresentation", 0) != 0 or int(header.get("NumberOfFrames") or 1) != 1:
        return None
    rows = int(header.Rows)
    reduce = max(int(math.log2(rows / height)), 0) if rows > height else 0
    codestream = next(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))
    image = Image.open(io.BytesIO(codestream))
    image.reduce = reduce  # type: ignore[method-assign,assignment]  # Pillow: levels to skip
    image.load()
    pixels = np.asarray(image)
    if image.mode == "I;16" and int(header.BitsStored) < 16:
        # OpenJPEG output is scaled to 16 bits in Pillow; the VOI expects stored values.
        pixels = pixels >> (16 - int(header.BitsStored))
    return pixels


def _area_reduce(pixels: np.ndarray, height: int) -> np.ndarray:
    factor = pixels.shape[0] // height
    if factor < 2:
        return pixels.astype(np.float32)
    rows, columns = (pixels.shape[0] // factor) * factor, (pixels.shape[1] // factor) * factor
    blocks = pixels[:rows, :columns].reshape(rows // factor, factor, columns // factor, factor)
    reduced: np.ndarray = blocks.mean(axis=(1, 3), dtype=np.float32)
    return reduced


def decode(path: Path, header: pydicom.Dataset, height: int) -> np.ndarray:
    """The (central) frame's stored values, reduced to about `height` rows or more."""
    syntax = str(header.file_meta.TransferSyntaxUID)
    try:
        if syntax in JPEG_2000:
            reduced = _jpeg2000_reduced(path, header, height)
            if reduced is not None:
                return _area_reduce(reduced, height)
        frames = int(header.get("NumberOfFrames") or 1)
        pixels = pixel_array(path, index=frames // 2 if frames > 1 else None)
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
    inverted = str(header.get("PhotometricInterpretation", "")) == "MONOCHROME1"
    if str(header.get("PresentationLUTShape", "")) == "INVERSE":
        inverted = not inverted
    return 1.0 - grey if inverted else grey


def render(path: Path, renditions: Sequence[Rendition]) -> list[bytes] | None:
    """JPEG bytes for each rendition, or None for an object without pixel data."""
    header = pydicom.dcmread(path, stop_before_pixels=True)
    if "Rows" not in header:
        return None
    tallest = max(r.height for r in renditions)
    pixels = decode(path, header, tallest)
    try:
        if pixels.ndim == 3:  # colour (e.g. secondary capture): pydicom already gave RGB
            image = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
        else:
            grey = display(pixels, header)
            image = Image.fromarray((grey * 255.0 + 0.5).astype(np.uint8))
    except Exception as exc:
        raise RenderError("display", f"{type(exc).__name__}: {exc}") from exc
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

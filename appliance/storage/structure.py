"""Is a received dataset whole? Two proofs, one cheap and one complete.

``check_structure`` runs on every C-STORE before Success: it walks the element headers without
reading values (inflating a deflated dataset first) and, for the pixel data element (Pixel
Data, Float or Double Float Pixel Data), checks that a native value holds every frame and that
an encapsulated one is a sequence of items ending in its delimiter before the end of the file.
A native image that passes has been proved whole.

``decode_all`` is the complete proof for encapsulated (compressed) pixel data: every frame
decoded by the codec, one frame in memory at a time. The image pipeline runs it before it
renders, storage commitment when the pipeline has not got there yet; until one of them has, an
encapsulated image is not confirmed to a modality (docs/storage.md, "What is committed").
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import pydicom
from pydicom.filereader import data_element_generator
from pydicom.pixels.utils import iter_pixels
from pydicom.uid import UID

PIXEL_DATA = 0x7FE00010
#: Pixel Data and its float variants (Parametric Maps): any of them is an image's pixel data.
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, PIXEL_DATA})
BITS_OF = {0x7FE00008: 32, 0x7FE00009: 64}
UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
SEQUENCE_DELIMITER = 0xFFFEE0DD
#: A deflated dataset that inflates past this is refused before anything holds it in memory
#: (a deflate bomb: 600 KB can inflate to gigabytes). Deflate is for reports and small objects;
#: images come in their pixel syntaxes.
MAX_INFLATED = 256 << 20


class CannotCheck(Exception):
    """The proof could not be made (memory, an I/O error): nothing is known; try again later."""


class Unsound(Exception):
    """The dataset is not whole; ``malformed`` when it cannot even be parsed."""

    def __init__(self, reason: str, *, malformed: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.malformed = malformed


@attrs.frozen
class Structure:
    """What the walk found: whether there is pixel data and whether it is already proved."""

    has_pixels: bool
    #: Native pixel data that holds every frame (or no pixel data at all): nothing to decode.
    proved: bool
    #: Encapsulated pixel data: each fragment's (file offset, length), offset table excluded.
    fragments: tuple[tuple[int, int], ...] = ()
    #: The pixel data element's own length is odd (PS3.5 7.1.1 says even).
    odd_length: bool = False


def dataset_offset(path: Path) -> int:
    """Where the dataset starts: after the preamble, 'DICM' and the File Meta group, whose
    length (0002,0000) is the first element (pynetdicom and pydicom always write it)."""
    with path.open("rb") as stream:
        head = stream.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise Unsound("no DICOM File Meta group", malformed=True)
    return 144 + int.from_bytes(head[140:144], "little")


def _inflate(path: Path, offset: int, out: BinaryIO | None) -> int:
    """Inflate the dataset after `offset` (into `out`, or only counting); its inflated size."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size = 0
    with path.open("rb") as stream:
        stream.seek(offset)
        try:
            while chunk := stream.read(1 << 20):
                while chunk:
                    piece = inflater.decompress(chunk, 1 << 20)
                    chunk = inflater.unconsumed_tail
                    size += len(piece)
                    if size > MAX_INFLATED:
                        raise Unsound(
                            f"deflated dataset inflates past {MAX_INFLATED >> 20} MiB",
                            malformed=True,
                        )
                    if out is not None:
                        out.write(piece)
            rest = inflater.flush()
        except zlib.error as exc:
            raise Unsound(f"deflated dataset does not inflate: {exc}", malformed=True) from None
    if out is not None:
        out.write(rest)
    if not inflater.eof:
        raise Unsound("deflated dataset ends before its deflate stream does")
    return size + len(rest)


def check_inflated_size(path: Path) -> None:
    """For a deflated file, before pydicom (which inflates without a bound) reads it."""
    meta = pydicom.filereader.read_file_meta_info(path)
    if UID(meta.get("TransferSyntaxUID", "")).is_deflated:
        _inflate(path, dataset_offset(path), None)


def _inflated(path: Path, offset: int) -> BinaryIO:
    out = io.BytesIO()
    _inflate(path, offset, out)
    out.seek(0)
    return out


def _expected_native_bytes(header: pydicom.Dataset, tag: int) -> int | None:
    try:
        rows, columns = int(header.Rows), int(header.Columns)
        samples = int(header.get("SamplesPerPixel", 1) or 1)
        frames = int(header.get("NumberOfFrames", 1) or 1)
        bits = BITS_OF.get(tag) or int(header.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return None  # the header cannot say; pydicom's own checks meet it at decode
    pixels = rows * columns * samples * frames
    if header.get("PhotometricInterpretation") == "YBR_FULL_422":
        pixels = pixels * 2 // 3
    return (pixels * bits + 7) // 8


def _walk_fragments(stream: BinaryIO, size: int) -> tuple[tuple[int, int], ...]:
    """Items up to the sequence delimiter: each fragment after the offset table."""
    items: list[tuple[int, int]] = []
    while True:
        head = stream.read(8)
        if len(head) < 8:
            raise Unsound("encapsulated Pixel Data ends before its sequence delimiter")
        group, element, length = struct.unpack("<HHI", head)
        tag = group << 16 | element
        if tag == SEQUENCE_DELIMITER:
            return tuple(items[1:])
        if tag != ITEM or length == UNDEFINED_LENGTH:
            raise Unsound(f"encapsulated Pixel Data holds ({group:04X},{element:04X}), not an item")
        if stream.tell() + length > size:
            raise Unsound("encapsulated Pixel Data fragment runs past the end of the file")
        items.append((stream.tell(), length))
        stream.seek(length, os.SEEK_CUR)


def check_structure(path: Path, header: pydicom.Dataset) -> Structure:
    """Raise Unsound unless every element fits in the file and the pixel data is whole."""
    transfer_syntax = UID(header.file_meta.TransferSyntaxUID)
    offset = dataset_offset(path)
    if transfer_syntax.is_deflated:
        stream, offset = _inflated(path, offset), 0
    else:
        stream = path.open("rb")
    with stream:
        size = stream.seek(0, os.SEEK_END)
        stream.seek(offset)
        implicit, little = transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
        found: list[int] = []

        def at_pixels(tag: int, vr: str | None, length: int) -> bool:
            if tag in PIXEL_DATA_TAGS:
                found.append(tag)
                return True
            return False

        try:
            for _element in data_element_generator(
                stream, implicit, little, stop_when=at_pixels, defer_size=1
            ):
                if stream.tell() > size:
                    break
        except (ValueError, struct.error, EOFError, OSError) as exc:
            raise Unsound(f"malformed dataset: {exc}", malformed=True) from None
        position = stream.tell()
        if position > size:
            raise Unsound("malformed dataset: lengths past its end", malformed=True)
        if not found:
            return Structure(has_pixels=False, proved=True)
        element_header = stream.read(8 if implicit else 12)
        if len(element_header) < 8:
            raise Unsound("pixel data element truncated")
        length_format = "<I" if little else ">I"
        (length,) = struct.unpack_from(length_format, element_header, 4 if implicit else 8)
        value_at = stream.tell()
        if transfer_syntax.is_encapsulated and found[0] == PIXEL_DATA:
            if length != UNDEFINED_LENGTH:
                raise Unsound("encapsulated Pixel Data must have undefined length")
            fragments = _walk_fragments(stream, size)
            if not fragments:
                raise Unsound("encapsulated Pixel Data has no fragments")
            return Structure(has_pixels=True, proved=False, fragments=fragments)
        if length == UNDEFINED_LENGTH:
            raise Unsound("native pixel data with undefined length")
        if value_at + length > size:
            raise Unsound("Pixel Data truncated")
        expected = _expected_native_bytes(header, found[0])
        if expected is not None and length < expected:
            raise Unsound(f"Pixel Data holds {length} bytes, the image needs {expected}")
        return Structure(has_pixels=True, proved=True, odd_length=bool(length % 2))


#: Where a codestream starts and ends (PS3.5 A.4: JPEG, JPEG-LS and JPEG 2000 frames are whole
#: codestreams). Decoders fill a cut codestream with whatever they guess and say nothing, so the
#: end-of-image marker is the only sign that a frame arrived whole.
JPEG_FAMILY = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
}
JPEG_2000_FAMILY = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}


JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "
#: How far from a frame's end its end marker may sit: encoders pad with 0x00 or 0xFF.
TAIL_WINDOW = 64


def _tail(stream: BinaryIO, pieces: list[tuple[int, int]]) -> bytes:
    """The last TAIL_WINDOW bytes of a frame, across its fragments (an end marker may be split
    between two: PS3.5 A.4 lets a frame be cut at any even boundary)."""
    tail = b""
    for offset, length in reversed(pieces):
        take = min(length, TAIL_WINDOW - len(tail))
        stream.seek(offset + length - take)
        tail = stream.read(take) + tail
        if len(tail) >= TAIL_WINDOW:
            break
    return tail


def _check_markers(
    path: Path, syntax: UID, fragments: tuple[tuple[int, int], ...], frames: int
) -> None:
    """Each frame's codestream begins with its start marker and ends with its end marker
    (trailing 0x00/0xFF padding allowed). With one fragment per frame, or one frame, each frame
    is checked; several fragments per frame of a multi-frame object without an offset table
    cannot be told apart, so there the first start and the last end are. A JP2 file (not a
    bare codestream) may carry boxes after its codestream: its end is left to the decoder."""
    if syntax in JPEG_FAMILY:
        starts: tuple[bytes, ...] = (b"\xff\xd8",)
    elif syntax in JPEG_2000_FAMILY:
        starts = (b"\xff\x4f\xff\x51", JP2_SIGNATURE)
    else:
        return  # RLE: its segment table is checked by the decoder
    if len(fragments) == frames:
        framed = [[fragment] for fragment in fragments]
    else:
        framed = [list(fragments)]
    with path.open("rb") as stream:
        for number, pieces in enumerate(framed, 1):
            offset, length = pieces[0]
            stream.seek(offset)
            head = stream.read(min(length, 12))
            if not any(head.startswith(start) for start in starts):
                raise Unsound(f"frame {number}: codestream does not begin with its start marker")
            if head.startswith(JP2_SIGNATURE):
                continue
            if not _tail(stream, pieces).rstrip(b"\x00\xff").endswith(b"\xff\xd9"):
                raise Unsound(f"frame {number}: codestream cut short (no end-of-image marker)")


def has_odd_lengths(dataset: pydicom.Dataset) -> bool:
    """Whether any element (nested sequences included) has an odd value length, which PS3.5
    7.1.1 forbids and some peers (dcmtk's storescp) abort on. Such objects are stored as they
    arrived and repaired (re-encoded, padded) only on the way out."""
    for tag in dataset.keys():  # noqa: SIM118  (iterating a Dataset converts its elements)
        raw = dataset.get_item(tag)
        length = getattr(raw, "length", None)
        if length is not None and length != UNDEFINED_LENGTH and length % 2:
            return True
        if raw is not None and (getattr(raw, "VR", None) == "SQ" or length == UNDEFINED_LENGTH):
            value = dataset[tag].value
            if isinstance(value, pydicom.Sequence) and any(has_odd_lengths(i) for i in value):
                return True
    return False


def decode_all(path: Path, keep: list[Any] | None = None, keep_index: int = 0) -> int:
    """Prove the pixel data whole: the structure checked again, then (for encapsulated data)
    every frame decoded, one in memory at a time. The number of frames decoded; raises Unsound,
    or CannotCheck when the machine (memory, I/O), not the data, failed. Frame `keep_index`'s
    stored values are appended to `keep` (so a render need not decode it again)."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except OSError as exc:
        raise CannotCheck(f"reading the file failed: {exc.strerror or exc}") from None
    except Exception as exc:
        raise Unsound(f"unreadable dataset: {exc}", malformed=True) from None
    try:
        structure = check_structure(path, header)
        if structure.proved:
            return 0
        expected = int(header.get("NumberOfFrames", 1) or 1)
        syntax = UID(header.file_meta.TransferSyntaxUID)
        _check_markers(path, syntax, structure.fragments, expected)
    except OSError as exc:
        raise CannotCheck(f"reading the file failed: {exc.strerror or exc}") from None
    frames = 0
    try:
        for frame in iter_pixels(path, raw=True):
            if keep is not None and frames == keep_index:
                keep.append(frame)
            frames += 1
    except (MemoryError, OSError) as exc:  # the machine's trouble, not the data's
        raise CannotCheck(f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # codecs raise anything: ValueError, RuntimeError ...
        raise Unsound(f"pixel data does not decode: {type(exc).__name__}: {exc}") from None
    if frames != expected:
        raise Unsound(f"{frames} frames decoded, Number of Frames says {expected}")
    return frames

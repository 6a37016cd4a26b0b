"""Which transfer syntaxes the appliance accepts, and which it can send, for which SOP classes.

Receiving (C-STORE from a unit): pynetdicom accepts the first of the acceptor's list that the
requestor proposes, so the order is policy: lossless compressed first (smaller on disk and on
the uplink; all decodable by the codecs we ship), then uncompressed, lossy last. Compressed
syntaxes only for classes that carry pixel data: an SR, a PDF, a presentation state or a KOS
stored "compressed" could not be retrieved by an uncompressed-only peer. Explicit VR Big Endian
is retired (PS3.5 2023) and not accepted: every unit also offers Little Endian. Across
contexts, lossy is accepted only when no lossless context of the class is (see
appliance.dicom._pynetdicom).

Sending (C-GET sub-operations on the requestor's role-reversed contexts, C-MOVE): the stored
syntax as it is when the peer takes it, else a syntax the appliance can produce from any
stored image: uncompressed, or a lossless one it can encode (JPEG 2000, JPEG-LS, RLE).
"""

from __future__ import annotations

from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
LOSSLESS_COMPRESSED = [JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1, JPEGLossless, RLELossless]
LOSSY = [JPEGLSNearLossless, JPEG2000, JPEGExtended12Bit, JPEGBaseline8Bit]

#: What an image class accepts, in order of preference.
IMAGE_SYNTAXES = [*LOSSLESS_COMPRESSED, *UNCOMPRESSED, DeflatedExplicitVRLittleEndian, *LOSSY]
#: What any other class accepts (structured reports, documents, presentation states, KOS ...).
NON_IMAGE_SYNTAXES = [*UNCOMPRESSED, DeflatedExplicitVRLittleEndian]

#: Storage classes with pixel data whose names do not say "Image".
PIXEL_CLASSES_BY_NAME = {
    "Segmentation Storage",
    "Label Map Segmentation Storage",
    "RT Dose Storage",
}


def is_image_class(sop_class: str) -> bool:
    """Whether a storage SOP class carries (compressible) Pixel Data."""
    name = UID(sop_class).name
    return "Image" in name or name in PIXEL_CLASSES_BY_NAME


def accepted_for(sop_class: str) -> list[str]:
    return list(IMAGE_SYNTAXES if is_image_class(sop_class) else NON_IMAGE_SYNTAXES)


def is_lossy(transfer_syntax: str) -> bool:
    return transfer_syntax in LOSSY


def _can_encode(transfer_syntax: str) -> bool:
    try:
        return bool(get_encoder(transfer_syntax).is_available)
    except (NotImplementedError, ValueError):
        return False


#: Lossless compressed syntaxes this installation can encode into (transcoding on retrieve).
ENCODABLE = [ts for ts in (JPEG2000Lossless, JPEGLSLossless, RLELossless) if _can_encode(ts)]


def sendable(sop_class: str) -> list[str]:
    """What the appliance can produce from any stored instance of the class."""
    return [*UNCOMPRESSED, *ENCODABLE] if is_image_class(sop_class) else list(UNCOMPRESSED)

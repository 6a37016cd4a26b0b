"""Synthetic mammograms for tests, benchmarks and the modality simulator: no real patient data.

The pixel data looks like what a radiologist would expect of a screening view: a bright,
roughly elliptical breast against a dark background on the chest-wall side given by laterality.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from appliance import __version__

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
BREAST_TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"
#: UID root for generated objects (pydicom's, so they never collide with real equipment's).
UID_ROOT = "1.2.826.0.1.3680043.8.498."

SCREENING_VIEWS = [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]
FFDM_SHAPE = (4096, 3328)  # rows, columns of a Hologic-size 2D mammogram


def breast_pixels(rows: int, columns: int, laterality: str, bits_stored: int = 12) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    # Chest wall on the image edge opposite the nipple: left breasts face right.
    cx = 0.0 if laterality == "R" else columns - 1.0
    distance = ((x - cx) / (0.85 * columns)) ** 2 + ((y - rows / 2) / (0.45 * rows)) ** 2
    tissue = np.clip(1.0 - distance, 0.0, 1.0) ** 0.5
    texture = 0.08 * np.sin(x / 37.0) * np.cos(y / 53.0)
    maximum = (1 << bits_stored) - 1
    pixels: np.ndarray = ((tissue * (0.85 + texture)) * maximum * 0.9 + 40).astype(np.uint16)
    return pixels


#: SNOMED CT codes of the views (PS3.16 CID 4014) and the breast (CID 4013).
VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
BREAST_CODE = ("76752008", "Breast")


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return item


def _mammography_image_module(ds: Dataset, laterality: str, view: str) -> None:
    """What the Digital Mammography X-Ray Image IOD requires beyond the basics (PS3.3 A.27),
    so that dciodvfy finds no error in what the tests send and what comes back."""
    ds.ReferringPhysicianName = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PatientOrientation = ["A", "R"] if laterality == "L" else ["P", "L"]
    ds.AnatomicRegionSequence = [_code(*BREAST_CODE)]
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [0.07, 0.07]
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.OrganExposed = "BREAST"
    ds.ViewCodeSequence = [_code(*VIEW_CODES.get(view, VIEW_CODES["CC"]))]
    ds.ViewCodeSequence[0].ViewModifierCodeSequence = []
    ds.AcquisitionContextSequence = []


def mammogram(
    *,
    laterality: str = "L",
    view: str = "CC",
    shape: tuple[int, int] = FFDM_SHAPE,
    frames: int = 1,
    patient_id: str = "9990000001",
    patient_name: str = "TEST^PARTICIPANT",
    accession_number: str = "ACC0001",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """An uncompressed MG (or, with frames > 1, breast tomosynthesis) object, 12 bits stored."""
    rows, columns = shape
    now = datetime.datetime.now()
    ds = Dataset()
    ds.SOPClassUID = BREAST_TOMOSYNTHESIS if frames > 1 else MG_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_instance_uid or generate_uid(UID_ROOT)
    ds.StudyInstanceUID = study_instance_uid or generate_uid(UID_ROOT)
    ds.SeriesInstanceUID = series_instance_uid or generate_uid(UID_ROOT)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.AccessionNumber = accession_number
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = "MG"
    ds.Manufacturer = "Screening gateway synthetic"
    ds.SoftwareVersions = __version__
    ds.ImageLaterality = laterality
    ds.ViewPosition = view
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    if frames == 1:
        _mammography_image_module(ds, laterality, view)
    pixels = breast_pixels(rows, columns, laterality)
    if frames > 1:
        ds.NumberOfFrames = frames
        pixels = np.broadcast_to(pixels, (frames, rows, columns))
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def screening_study(
    directory: Path, *, shape: tuple[int, int] = FFDM_SHAPE, **fields: Any
) -> list[Path]:
    """Write the four screening views of one study (RCC, LCC, RMLO, LMLO) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = fields.pop("study_instance_uid", None) or generate_uid(UID_ROOT)
    series_uid = generate_uid(UID_ROOT)
    paths = []
    for number, (laterality, view) in enumerate(SCREENING_VIEWS, start=1):
        ds = mammogram(
            laterality=laterality,
            view=view,
            shape=shape,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            **fields,
        )
        ds.InstanceNumber = number
        path = directory / f"{laterality}{view}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

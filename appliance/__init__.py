"""Screening gateway appliance: the DICOM gateway of a breast screening site."""

__version__ = "0.1.0"

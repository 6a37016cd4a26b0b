"""DICOM services: pynetdicom servers run in threads, their handlers call into Trio."""

"""DICOM Exchange site agent: publishes a center's DICOM files and receives its deliveries."""

__version__ = "0.1.0"

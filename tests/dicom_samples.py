"""Chest radiograph DICOM files built from the real PNG data, for the DICOM-out and node tests (pydicom)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def chest_dataset(png: Path, *, index: int = 0, orientation: tuple[str, str] | None = ("L", "F"), flip: bool = False,
                  sop_class: str = DX_PRESENTATION, body_part: str = "CHEST", spacing_mm: float | None = 0.7,
                  study_uid: str | None = None, view: str = "PA"):
    """A single-frame 8-bit MONOCHROME2 DX (or CR / other ``sop_class``) Dataset of ``png``.

    ``flip`` mirrors the pixels left-right (an AP image shown from the front) and ``orientation`` gives its
    PatientOrientation (``None``: absent). UIDs are derived from the file name and ``index``, so a rebuilt sample
    is the same instance."""
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(Image.open(png).convert("L"))
    if flip:
        pixels = pixels[:, ::-1]
    seed = [png.name, str(index), str(flip), sop_class, body_part]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(entropy_srcs=seed + ["sop"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.PatientName = "Test^Chest"
    ds.PatientID = f"LUNGSAM-{png.stem}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid or generate_uid(entropy_srcs=seed + ["study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=seed + ["series"])
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20261201"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = f"A{index:05d}"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "test"
    ds.Modality = {DX_PRESENTATION: "DX", CR: "CR"}.get(sop_class, "OT" if sop_class != CT else "CT")
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if sop_class == DX_PRESENTATION:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "IDENTITY"
        ds.DetectorType = "DIRECT"
        ds.BurnedInAnnotation = "NO"
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.LossyImageCompression = "00"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
    if orientation is not None:
        ds.PatientOrientation = list(orientation)
    if spacing_mm is not None:
        ds.ImagerPixelSpacing = [spacing_mm, spacing_mm]
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=seed + ["for"])
    ds.PositionReferenceIndicator = ""
    ds.WindowCenter = 128
    ds.WindowWidth = 256
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def write_chest_dicom(png: Path, path: Path, **kwargs) -> Path:
    """:func:`chest_dataset` written as a Part 10 file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chest_dataset(png, **kwargs).save_as(path, enforce_file_format=True)
    return path

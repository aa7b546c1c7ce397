"""Tiny DICOM files built with pydicom, for the image and RSNA adapter tests.

Written as a radiography archive would write them: a file meta header, explicit VR little
endian, uncompressed pixels (or JPEG Baseline, as some public sets ship), so the decoder meets
the same structure it meets on real data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage


def _base(rows: int, cols: int, transfer_syntax: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientID = "fixture"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    return ds


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                **attrs: Any) -> Path:
    """An uncompressed single-frame grayscale DICOM; `attrs` become DICOM attributes by keyword."""
    pixels = np.asarray(pixels)
    signed = pixels.dtype.kind == "i"
    ds = _base(pixels.shape[0], pixels.shape[1], ExplicitVRLittleEndian)
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_jpeg_dicom(path: Path, pixels: np.ndarray) -> Path:
    """A JPEG Baseline (8-bit, lossy) grayscale DICOM, the encapsulated kind."""
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="L").save(buf, format="JPEG", quality=95)
    ds = _base(pixels.shape[0], pixels.shape[1], JPEGBaseline8Bit)
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


__all__ = ["write_dicom", "write_jpeg_dicom"]

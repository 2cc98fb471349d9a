"""Inputs that once escaped the typed errors: a decoder's own exception or NaN pixels reached the job or server.

Every one must become an ImageError with a stable code (a Parquet error row, an HTTP 422), never another
exception, and never a non-finite model input (NaN probabilities would be labelled, or fail a served batch).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.config import PreprocessConfig
from cxr.errors import ImageError
from cxr.preprocess import preprocess

CFG = PreprocessConfig(image_size=32)


def _tiff(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    return buf.getvalue()


def _dicom(tmp_path: Path, frames: int = 1, window_width: float | None = None) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = 16, 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if window_width is not None:
        ds.WindowCenter, ds.WindowWidth = 100, window_width
    ds.PixelData = np.arange(16 * 16 * frames, dtype=np.uint16).tobytes()
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def _inf_pixel() -> bytes:
    arr = np.ones((16, 16), np.float32)
    arr[3, 3] = np.inf
    return _tiff(Image.fromarray(arr, mode="F"))


@pytest.mark.parametrize("name,make,code", [
    ("lab_tiff", lambda tmp: _tiff(Image.new("LAB", (16, 16))), "corrupt"),  # PIL: "conversion from LAB ... not supported"
    ("float_tiff_with_inf", lambda tmp: _inf_pixel(), "corrupt"),
    ("dicom_window_width_0", lambda tmp: _dicom(tmp, window_width=0), "dicom_invalid"),
    ("dicom_multi_frame", lambda tmp: _dicom(tmp, frames=3), "unsupported"),
])
def test_decoder_surprises_become_typed_errors(tmp_path: Path, name: str, make, code: str) -> None:
    with pytest.raises(ImageError) as err:
        preprocess(make(tmp_path), CFG)
    assert err.value.code == code, (name, str(err.value))


def test_a_finite_float_tiff_still_decodes() -> None:
    arr = np.linspace(0, 5, 256, dtype=np.float32).reshape(16, 16)
    x = preprocess(_tiff(Image.fromarray(arr, mode="F")), CFG)
    assert x.shape == (1, 32, 32) and np.isfinite(x).all()

"""Inputs that once escaped the typed errors: a decoder's own exception or NaN pixels reached the job or server.

Every one must become an ImageError with a stable code (a Parquet error row, an HTTP 422), never another
exception, and never a non-finite model input (NaN probabilities would be labelled, or fail a served batch).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cxr.config import PreprocessConfig
from cxr.errors import ImageError
from cxr.preprocess import preprocess

CFG = PreprocessConfig(image_size=32)
PIXELS = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16)


def _tiff(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    return buf.getvalue()


def _inf_pixel() -> bytes:
    arr = np.ones((16, 16), np.float32)
    arr[3, 3] = np.inf
    return _tiff(Image.fromarray(arr, mode="F"))


@pytest.mark.parametrize("name,make,code", [
    ("lab_tiff", lambda dcm: _tiff(Image.new("LAB", (16, 16))), "corrupt"),  # PIL: "conversion from LAB ... not supported"
    ("float_tiff_with_inf", lambda dcm: _inf_pixel(), "corrupt"),
    ("dicom_window_width_0", lambda dcm: dcm(PIXELS, WindowCenter=100, WindowWidth=0), "dicom_invalid"),
    ("dicom_multi_frame", lambda dcm: dcm(np.stack([PIXELS] * 3), NumberOfFrames=3), "unsupported"),
])
def test_decoder_surprises_become_typed_errors(make_dicom, name: str, make, code: str) -> None:
    with pytest.raises(ImageError) as err:
        preprocess(make(make_dicom), CFG)
    assert err.value.code == code, (name, str(err.value))


def test_a_finite_float_tiff_still_decodes() -> None:
    arr = np.linspace(0, 5, 256, dtype=np.float32).reshape(16, 16)
    x = preprocess(_tiff(Image.fromarray(arr, mode="F")), CFG)
    assert x.shape == (1, 32, 32) and np.isfinite(x).all()

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


def test_running_out_of_memory_is_the_workers_trouble_not_the_files(tmp_path) -> None:
    """A worker short of memory for an image within the pixel cap gets ``out_of_memory`` (retried by the next
    run, a 503 from a replica), not ``corrupt`` (which would mark a good file bad for good), and goes on.

    Real allocation failures: a fresh interpreter caps its own address space a little above what it uses,
    then decodes a 64-megapixel PNG (within the cap) whose float32 copy needs 256 MB."""
    import subprocess
    import sys

    script = """
import io, resource
from PIL import Image
from cxr.config import PreprocessConfig
from cxr.errors import ImageError
from cxr.preprocess import preprocess
buf = io.BytesIO(); Image.new("L", (8000, 8000), 100).save(buf, format="PNG"); big = buf.getvalue()
small = io.BytesIO(); Image.new("L", (64, 64), 100).save(small, format="PNG")
size = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (120 << 20), resource.RLIM_INFINITY))
try:
    preprocess(big, PreprocessConfig(image_size=32))
    print("decoded")
except ImageError as exc:
    print(exc.code)
print(preprocess(small.getvalue(), PreprocessConfig(image_size=32)).shape)
"""
    env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["out_of_memory", "(1, 32, 32)"], out.stdout

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
from cxr.preprocess import decode_image, image_size_of, preprocess

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
    ("lab_tiff", lambda dcm: _tiff(Image.new("LAB", (16, 16))), "unsupported"),  # a real image PIL cannot grey
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
from cxr.preprocess import decode_image, image_size_of, preprocess
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


# --------------------------------------------------------------------------- valid oddities read right


def _raw_tiff(pixels: np.ndarray, photometric: int = 1, sample_format: int = 1) -> bytes:
    """A one-strip grey TIFF written by hand: PIL cannot write 16-bit WhiteIsZero or signed samples."""
    import struct

    height, width = pixels.shape
    data = pixels.tobytes()
    tags = [(256, width), (257, height), (258, pixels.dtype.itemsize * 8), (259, 1), (262, photometric), (273, 0),
            (277, 1), (278, height), (279, len(data)), (339, sample_format)]
    offset = 8 + 2 + 12 * len(tags) + 4
    ifd = b"".join(struct.pack("<HHII", tag, 4, 1, offset if tag == 273 else value) for tag, value in tags)
    return b"II*\x00" + struct.pack("<IH", 8, len(tags)) + ifd + b"\0\0\0\0" + data


RAMP = np.tile(np.linspace(0.0, 1.0, 64), (8, 1))  # dark left, bright right


def test_tiff_samples_pil_does_not_scale_are_read_by_their_tags() -> None:
    """16-bit WhiteIsZero (a CR's MONOCHROME1 as TIFF) was read inverted; signed samples lost every
    negative value to 0 (47 % of a ramp black); uint32 wrapped above 2^31."""
    u16 = np.round(RAMP * 65535).astype("<u2")
    white_is_zero = decode_image(_raw_tiff(65535 - u16, photometric=0))
    np.testing.assert_allclose(white_is_zero, RAMP, atol=1e-4)
    signed = decode_image(_raw_tiff(np.round(RAMP * 25500 - 12000).astype("<i2"), sample_format=2))
    np.testing.assert_allclose(signed, (RAMP * 25500 - 12000 + 32768) / 65535, atol=1e-4)  # by the type's range
    assert (signed > 0).all()
    int8 = decode_image(_raw_tiff(np.round(RAMP * 255 - 128).astype("i1"), sample_format=2))
    np.testing.assert_allclose(int8, np.round(RAMP * 255) / 255, atol=1e-6)  # was wrapped: -100 read as 156
    u32 = decode_image(_raw_tiff(np.round(RAMP * 4e9).astype("<u4")))
    np.testing.assert_allclose(u32, RAMP, atol=1e-4)
    unit_float = decode_image(_raw_tiff((0.8 - 0.6 * RAMP).astype("<f4"), photometric=0, sample_format=3))
    np.testing.assert_allclose(unit_float, 0.2 + 0.6 * RAMP, atol=1e-6)  # was `corrupt`: inverted in a read-only buffer


def test_float_images_in_unit_range_are_taken_as_they_are() -> None:
    """A float TIFF of a [0.2, 0.8] film used to be stretched to [0, 1]: another input than its PNG."""
    x = decode_image(_tiff(Image.fromarray((0.2 + 0.6 * RAMP).astype(np.float32), mode="F")))
    np.testing.assert_allclose(x, 0.2 + 0.6 * RAMP, atol=1e-6)


def test_dicom_is_normalised_by_its_lut_stages_range_not_its_pixels(make_dicom) -> None:
    """A window, a VOI LUT or a Modality LUT map into a range the standard fixes: normalising by the
    pixels' own min/max stretched an identity window to [0, 1], made an image above its window black,
    ignored a VOI LUT Sequence and left a 12->8-bit Modality LUT 16x too dark."""
    from pydicom.dataset import Dataset

    def lut(values: np.ndarray, bits: int) -> Dataset:
        item = Dataset()
        item.LUTDescriptor = [len(values), 0, bits]
        item.LUTData = [int(v) for v in values]
        item["LUTData"].VR = "US"
        return item

    twelve = {"BitsStored": 12, "HighBit": 11}
    pixels = np.round(1000 + 2000 * RAMP).astype(np.uint16)
    plain = decode_image(make_dicom(pixels, **twelve))
    np.testing.assert_allclose(plain, pixels / 4095, atol=1e-6)
    identity = decode_image(make_dicom(pixels, WindowCenter=2048, WindowWidth=4096, **twelve))
    np.testing.assert_allclose(identity, plain, atol=1e-3)
    assert (decode_image(make_dicom(pixels, WindowCenter=40, WindowWidth=80, **twelve)) == 1.0).all()  # white
    full = np.round(4095 * RAMP).astype(np.uint16)
    eight_bit = lut(np.arange(4096) // 16, 8)  # pydicom's own apply_voi wraps these indices at 256
    np.testing.assert_allclose(decode_image(make_dicom(full, VOILUTSequence=[eight_bit], **twelve)), RAMP, atol=1 / 255)
    curve = lut(np.round(np.sqrt(np.arange(4096) / 4095) * 4095), 12)
    np.testing.assert_allclose(decode_image(make_dicom(full, VOILUTSequence=[curve], **twelve)), np.sqrt(RAMP),
                               atol=2e-3)
    declared_16 = lut(np.round(np.sqrt(np.arange(4096) / 4095) * 4095), 16)  # 12-bit entries, descriptor says 16
    np.testing.assert_allclose(decode_image(make_dicom(full, VOILUTSequence=[declared_16], **twelve)),
                               np.sqrt(RAMP), atol=2e-3)  # by the table's own full scale: not 16x too dark
    modality = lut(np.arange(4096) // 16, 8)
    modality.ModalityLUTType = "US"
    np.testing.assert_allclose(decode_image(make_dicom(full, ModalityLUTSequence=[modality], **twelve)), RAMP,
                               atol=1 / 255)
    with pytest.raises(ImageError) as err:
        decode_image(make_dicom(full, RescaleSlope=0, RescaleIntercept=0, **twelve))
    assert err.value.code == "dicom_invalid"  # not an all-black film, scored


def test_header_cuts_bigtiff_and_rotated_sizes() -> None:
    """A JPEG cut inside its header is ``truncated`` (was ``corrupt``); BigTIFF is a TIFF (was
    ``not_image``); the width/height in a result row are the image as scored, EXIF rotation applied."""
    img = Image.fromarray(np.round(RAMP * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    with pytest.raises(ImageError) as err:
        decode_image(buf.getvalue()[:100])
    assert err.value.code == "truncated"
    big = io.BytesIO()
    img.save(big, format="TIFF", big_tiff=True)
    assert big.getvalue()[:4] == b"II+\x00" and decode_image(big.getvalue()).shape == (8, 64)
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(rotated, format="JPEG", exif=exif)
    assert decode_image(rotated.getvalue()).shape == (64, 8) and image_size_of(rotated.getvalue()) == (8, 64)

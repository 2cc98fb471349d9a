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


# --------------------------------------------------------------------------- bombs within the pixel cap (security review)


def _jpeg(size: int = 16, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), 128, np.uint8)).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _tiled_tiff(tile: int) -> bytes:
    """A 16x16 TIFF whose one deflated tile is tile x tile: libtiff would inflate the whole tile."""
    import struct
    import zlib

    comp = zlib.compress(b"\0" * 64, 9)  # the data is never reached: the tile's declared size is the bomb
    data_at = 8 + 2 + 10 * 12 + 4  # after the header and the one IFD of 10 entries
    tags = [(256, 3, 16), (257, 3, 16), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1),
            (322, 4, tile), (323, 4, tile), (324, 4, data_at), (325, 4, len(comp))]
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHIHH", t, k, 1, v, 0) if k == 3 else struct.pack("<HHII", t, k, 1, v) for t, k, v in tags)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + comp


def _dicom_with_jpeg_frame(frame: bytes, rows: int = 16, cols: int = 16) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its SOF0 header claiming another size (its data stays 16x16)."""
    at = jpeg.index(b"\xff\xc0") + 5
    return jpeg[:at] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[at + 4:]


def test_decoding_bombs_within_the_declared_size_are_too_large(make_dicom) -> None:
    """Each of these passed the pixel cap on its declared size and then took gigabytes or minutes."""
    many_scans = _jpeg(progressive=True)[:-2] + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" * 150 + b"\xff\xd9"
    bombs = {
        "progressive JPEG with 150 scans": many_scans,
        "DICOM whose JPEG frame has 150 scans": _dicom_with_jpeg_frame(many_scans),
        "TIFF with a 16384x16384 tile": _tiled_tiff(16384),
        "DICOM whose JPEG frame is 9000x9000": _dicom_with_jpeg_frame(_claiming(_jpeg(), 9000, 9000)),
    }
    for name, data in bombs.items():
        with pytest.raises(ImageError) as err:
            decode_image(data)
        assert err.value.code == "too_large", (name, str(err.value))
    assert decode_image(_jpeg(progressive=True)).shape == (16, 16)  # a real progressive JPEG is fine
    # FF DA bytes outside the scans (an ICC profile, a motion photo's trailer) are no scans
    icc = bytes(range(256)) * 4 + b"\xff\xda" * 300
    assert decode_image(_jpeg(icc_profile=icc) + b"\xff\xda" * 300).shape == (16, 16)
    assert decode_image(_dicom_with_jpeg_frame(_jpeg())).shape == (16, 16)


def test_deflated_dicom_is_read_and_inflated_only_up_to_the_cap(make_dicom) -> None:
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(io.BytesIO(make_dicom(np.tile(PIXELS, (8, 8)))))  # 128x128, 32 KB of pixels
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    deflated = buf.getvalue()
    assert len(deflated) < 8_000  # ~all zeros and ramps: it inflates many times over
    np.testing.assert_array_equal(decode_image(deflated), decode_image(make_dicom(np.tile(PIXELS, (8, 8)))))
    for form in (deflated, deflated[132:]):  # also without the preamble and DICM (pydicom reads both)
        with pytest.raises(ImageError) as err:  # 8 bytes per capped pixel: 1 Kpx allow only 8 KiB
            decode_image(form, max_pixels=1024)
        assert err.value.code == "too_large" and "deflated" in str(err.value)
    with pytest.raises(ImageError) as err:
        decode_image(deflated[:200] + b"\x07" * 50 + deflated[250:])
    assert err.value.code in ("dicom_invalid", "corrupt")


@pytest.mark.timeout(120)
def test_a_large_deflated_dicom_with_a_pad_byte_does_not_hang_the_check(make_dicom) -> None:
    """Over 16 MiB inflated, with a byte after the deflate stream (pydicom pads to even length): the
    check's loop used to spin forever on it, a decode thread lost per file."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    for size in (3000, 3001):  # one of the two deflated lengths is odd, so pydicom pads it
        ds = pydicom.dcmread(io.BytesIO(make_dicom(np.zeros((size, size), np.uint16))))
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        assert decode_image(buf.getvalue()).shape == (size, size)


def test_a_segmented_palette_table_is_refused(make_dicom) -> None:
    """pydicom expands each 6-byte segment of it to up to 65,535 entries: 19 KB took 12 s and 870 MB."""
    data = make_dicom(PIXELS % 256, "PALETTE COLOR", BitsStored=8,
                      RedPaletteColorLookupTableDescriptor=[256, 0, 16],
                      SegmentedRedPaletteColorLookupTableData=b"\x01\x00\xff\xff\x00\x00" * 4)
    with pytest.raises(ImageError) as err:
        decode_image(data)
    assert err.value.code == "unsupported" and "segmented" in str(err.value)

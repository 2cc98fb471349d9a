"""The one preprocessing path: raw bytes -> normalised single-channel tensor.

Training, screening and serving all call :func:`preprocess` (training passes an
``augment`` callable in between, nothing else differs), so there is no
train/serve skew by construction. ``tests/test_core.py`` checks it.

It needs no torch: PIL, numpy and pydicom only. Every Ray Data decode worker
and serving replica runs it, and ``import torch`` costs ~3 s of CPU per
process on the 2-core machines (BENCHMARKS.md). Only training's augmentation
(:func:`make_train_augment`) uses torch, in processes that train anyway.
"""

from __future__ import annotations

import io
import warnings
import zlib
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cxr.config import AugmentConfig, PreprocessConfig
from cxr.errors import ImageError

# We enforce our own pixel cap on every declared size before decoding (PreprocessConfig.max_pixels), a
# DICOM's compressed frame included (_check_dicom_frame); PIL's own bomb check is a warning below 2x its
# default, so it is off.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey image

#: more scans than this in a progressive JPEG is a CPU bomb (libjpeg walks every block once per scan:
#: 5,000 repeats of one tiny scan over an 8000x8000 image took 80 s); encoders write about 10
MAX_JPEG_SCANS = 100

#: training augmentation: a 1xHxW float32 [0,1] image and the target size -> 1xSxS float32 [0,1]
Augment = Callable[[np.ndarray, int], np.ndarray]

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"RIFF", "webp"),
)


def detect_format(data: bytes) -> str | None:
    """Image format from content (magic bytes), not from the file name; None if not an image."""
    if (len(data) >= 132 and data[128:132] == b"DICM") or _bare_dicom(data):
        return "dicom"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            if name == "webp" and data[8:12] != b"WEBP":
                continue
            return name
    return None


def _bare_dicom(data: bytes) -> bool:
    """A DICOM dataset without the 128-byte preamble and 'DICM' (older PACS exports): it starts with a
    group 0002 or 0008 element, little-endian, in explicit VR (two capital letters) or implicit VR
    (a length that fits the file)."""
    if len(data) < 12 or data[0:2] not in (b"\x02\x00", b"\x08\x00") or data[3:4] != b"\x00":
        return False
    vr = data[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    return data[0:2] == b"\x08\x00" and int.from_bytes(data[4:8], "little") < len(data)


def _forced(dicom: bytes) -> bool:
    """pydicom's ``force``: needed to read a dataset without the preamble (see :func:`_bare_dicom`)."""
    return dicom[128:132] != b"DICM"


def decode_image(data: bytes, max_pixels: int = PreprocessConfig.max_pixels) -> np.ndarray:
    """Decode image bytes to a float32 HxW array in [0, 1].

    8-bit and 16-bit data are *scaled* by their bit depth (never clipped), colour
    and alpha are reduced to luminance, EXIF orientation is applied, and DICOM
    goes through its modality/VOI LUTs. Raises :class:`ImageError` with a typed
    code for anything that is not a usable image.
    """
    try:
        img = _decode(data, max_pixels)
    except ImageError as exc:
        if isinstance(exc.__context__, MemoryError):  # a decoder's own handler caught it: still not the file's fault
            raise _out_of_memory(exc.__context__) from None
        raise
    except MemoryError as exc:
        raise _out_of_memory(exc) from None
    except Exception as exc:  # noqa: BLE001 - e.g. a PIL mode with no grey conversion (LAB), a bad DICOM LUT
        raise ImageError("corrupt", f"image could not be converted to grey levels: {type(exc).__name__}: {exc}") from None
    if not np.isfinite(img).all():  # a float TIFF with inf/NaN pixels, a DICOM rescale to infinity
        raise ImageError("corrupt", "image has non-finite pixel values (NaN or infinity)")
    return img


def _out_of_memory(exc: MemoryError) -> ImageError:
    return ImageError("out_of_memory", f"ran out of memory decoding the image (within the pixel cap): {exc}")


def _decode(data: bytes, max_pixels: int) -> np.ndarray:
    """decode_image's work; anything it raises other than an ImageError is a decoder's surprise."""
    if not data:
        raise ImageError("empty", "empty input (0 bytes)")
    kind = detect_format(data)
    if kind == "dicom":
        return _decode_dicom(data, max_pixels)
    if kind is None:
        raise ImageError("not_image", "content is not a supported image (JPEG, PNG, DICOM, TIFF, BMP, WebP, GIF)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message names a BytesIO object, not the file
        raise ImageError("corrupt", f"{kind} header could not be parsed: no decoder recognises it") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on malformed headers
        code = "truncated" if "truncated" in str(exc).lower() else "corrupt"  # "Truncated File Read": cut in its header
        raise ImageError(code, f"{kind} header could not be parsed: {exc}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError("too_large", f"{width}x{height} = {width * height} pixels exceeds the cap of {max_pixels}")
    if width == 0 or height == 0:
        raise ImageError("corrupt", f"image has no pixels ({width}x{height})")
    _check_decode_cost(kind, img, data, max_pixels)
    samples = _int_samples(img)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            img = ImageOps.exif_transpose(img) or img
    except OSError as exc:
        # PIL says "truncated" when data ends early; "broken data stream" is a zlib error inside
        # the data (a damaged PNG/TIFF), i.e. corrupt, not truncated
        code = "truncated" if "truncated" in str(exc) else "corrupt"
        raise ImageError(code, f"{kind} data could not be decoded: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise ImageError("corrupt", f"{kind} data could not be decoded: {exc}") from None
    return _to_unit_gray(img, *samples)


def _check_decode_cost(kind: str, img: Image.Image, data: bytes, max_pixels: int) -> None:
    """Bombs within the pixel cap: a TIFF tile larger than the image (decoded whole), and a progressive
    JPEG repeating its scans (each one a pass over every block)."""
    tags = getattr(img, "tag_v2", None)
    if kind == "tiff" and tags and 322 in tags and 323 in tags:  # TileWidth, TileLength
        tile = int(tags[322]) * int(tags[323])
        if tile > max_pixels:
            raise ImageError("too_large", f"TIFF tile of {tags[322]}x{tags[323]} = {tile} pixels exceeds the cap "
                                          f"of {max_pixels}")
    if kind == "jpeg":
        _check_jpeg_scans(data)


def _check_jpeg_scans(data: bytes) -> None:
    """Refuse a JPEG of over MAX_JPEG_SCANS scans, counted by walking its marker segments to the first
    EOI (a byte count of FF DA would also count bytes of an ICC profile, a thumbnail or a trailer)."""
    scans, at, end = 0, 2, len(data)
    while at + 4 <= end:
        if data[at] != 0xFF:
            return  # not a marker where one must be: the decoder will say what is wrong
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0xD9:  # EOI
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length
            at += 2
            continue
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
        if marker != 0xDA:
            continue
        scans += 1
        if scans > MAX_JPEG_SCANS:
            raise ImageError("too_large", f"JPEG with over {MAX_JPEG_SCANS} scans: a decoding bomb")
        while True:  # entropy-coded data: up to the next marker that is not stuffing (FF 00) or a restart
            at = data.find(b"\xff", at)
            if at < 0 or at + 1 >= end:
                return
            if data[at + 1] == 0x00 or 0xD0 <= data[at + 1] <= 0xD7:
                at += 2
                continue
            break


def _int_samples(img: Image.Image) -> tuple[int, bool, bool]:
    """(bits per sample, signed, white-is-zero) from a TIFF's tags (0, False, False otherwise).

    Read before ``exif_transpose``, whose copy has no tags. Pillow reads signed and 32-bit TIFF
    samples into int32 ("I") and inverts WhiteIsZero only for 8-bit data, so the tags say the rest.
    """
    tags = getattr(img, "tag_v2", None)
    if not tags:
        return 0, False, False

    def first(tag: int, default: int) -> int:
        value = tags.get(tag, default)
        return int(value[0] if isinstance(value, tuple) else value)

    return first(258, 0), first(339, 1) == 2, first(262, 1) == 0


def _to_unit_gray(img: Image.Image, bits: int = 0, signed: bool = False, white_is_zero: bool = False) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # "I": 32-bit ints (signed/32-bit TIFF; 16-bit PNG in some PILs)
        if signed and 0 < bits <= 16:  # by the type's range, as a signed DICOM without a window: 0 is mid-grey
            out = np.asarray(img, dtype=np.float32) + np.float32(2 ** (bits - 1))
            full = 2**bits - 1
        elif signed:  # int32: no useful type range (all of an image would be mid-grey): its own range
            return _stretched(np.asarray(img, dtype=np.float64))
        else:
            ints = np.asarray(img)
            if mode == "I":
                ints = ints.view(np.uint32) if bits == 32 else np.clip(ints, 0, None)  # uint32 was read as int32
            out = ints.astype(np.float32)  # one float array per image, as for 8-bit data below
            full = stored_full_scale(int(ints.max(initial=0)))
        out = np.divide(out, np.float32(full), out=out)
    elif mode == "F":
        out = np.array(img, dtype=np.float32)  # a copy: PIL's buffer is read-only, and WhiteIsZero inverts in place
        if not np.isfinite(out).all():  # checked first: a NaN min/max would make the image a black one
            raise ImageError("corrupt", "image has non-finite pixel values (NaN or infinity)")
        if out.min() < 0.0 or out.max() > 1.0:  # not in unit range (e.g. attenuation values): by its own range
            out = _stretched(out)
    elif mode == "L" and signed and bits == 8:  # int8 samples, which PIL reads as unsigned bytes (-100 as 156)
        out = np.asarray(img).view(np.int8).astype(np.float32) + np.float32(128.0)
        return np.divide(out, np.float32(255.0), out=out)
    else:
        if mode != "L":
            try:
                img = img.convert("L")  # RGB/RGBA/LA/P/CMYK/YCbCr/1 -> ITU-R 601 luma, alpha dropped
            except ValueError as exc:  # LAB, a float colour TIFF: a real image, just not one PIL greys
                raise ImageError("unsupported", f"{mode} images cannot be converted to grey levels: {exc}") from None
        out = np.asarray(img).astype(np.float32)
        return np.divide(out, np.float32(255.0), out=out)  # in place: one float array per image, not two
    if white_is_zero:  # PIL inverts 8-bit WhiteIsZero itself, not 16-bit, 32-bit or float samples
        np.subtract(np.float32(1.0), out, out=out)
    return out


def _stretched(arr: np.ndarray) -> np.ndarray:
    """An image whose values have no known range, scaled by its own min/max (a constant one: black)."""
    lo, hi = float(arr.min()), float(arr.max())
    return ((arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)).astype(np.float32, copy=False)


def stored_full_scale(brightest: int) -> int:
    """Full scale of integer pixels in a wide container: 2^b - 1 for the smallest usual depth b that holds them.

    A 16-bit PNG or TIFF often carries 10-, 12- or 14-bit detector data unscaled (a DICOM export
    without its BitsStored), and read as 16-bit it would be 16x too dark: the model sees a black
    film (a pneumonia score of 0.23 became 4e-5). A full-range 16-bit X-ray has its brightest pixel
    (bone, a marker) far above 2^14, so it keeps 65535. DICOM says its depth and does not guess.
    """
    for bits in (8, 10, 12, 14, 16):
        if brightest < 2**bits:
            return 2**bits - 1
    return brightest


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL's convert("L")


def _decode_dicom(data: bytes, max_pixels: int) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_color_lut

    _check_deflated(data, max_pixels)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=_forced(data))
    except Exception as exc:  # noqa: BLE001
        raise ImageError("dicom_invalid", f"DICOM could not be parsed: {exc}") from None
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise ImageError("unsupported", "DICOM with float pixel data (parametric maps) is not supported")
        raise ImageError("dicom_invalid", "DICOM has no pixel data")
    try:
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise ImageError("dicom_invalid", f"DICOM image size is unreadable: {exc}") from None
    if rows * cols > max_pixels:
        raise ImageError("too_large", f"{cols}x{rows} = {rows * cols} pixels exceeds the cap of {max_pixels}")
    if frames > 1:  # checked before pixel_array, which would decode every frame first
        raise ImageError("unsupported", f"multi-frame DICOM ({frames} frames) is not supported")
    _check_dicom_frame(ds, max_pixels)
    try:
        raw = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        raise ImageError("unsupported", f"DICOM pixel data cannot be decoded here: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise ImageError("dicom_invalid", f"DICOM pixel data is unreadable: {exc}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on a VOI LUT over rescaled (float) values
            if photometric == "PALETTE COLOR":  # indices into a colour palette (rare for X-ray)
                if "SegmentedRedPaletteColorLookupTableData" in ds:  # pydicom expands each segment unbounded
                    raise ImageError("unsupported", "DICOM with a segmented palette colour table is not supported")
                rgb = apply_color_lut(raw, ds)
                full = np.float32(_lut_full_scale(int(np.iinfo(rgb.dtype).bits), int(rgb.max(initial=0)))
                                  if rgb.dtype.kind in "ui" else 1.0)
                return np.clip(rgb[..., :3].astype(np.float32) @ _LUMA / full, 0.0, 1.0)
            if raw.ndim == 3 and raw.shape[-1] in (3, 4):  # colour DICOM
                raw = raw[..., :3].astype(np.float32) @ _LUMA
            elif raw.ndim != 2:
                raise ImageError("unsupported", f"DICOM with {raw.ndim} dimensions (multi-frame?) is not supported")
            def gray(values: np.ndarray) -> np.ndarray:
                return _dicom_gray(values, ds, photometric)

            mapped = any(k in ds for k in ("ModalityLUTSequence", "VOILUTSequence", "RescaleSlope", "WindowCenter"))
            return _per_value(raw, gray) if mapped else gray(raw)  # a plain film: one float32 copy is cheaper
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. WindowWidth 0, a LUT that does not fit the data
        raise ImageError("dicom_invalid", f"DICOM LUT could not be applied: {exc}") from None


def _dicom_gray(arr: np.ndarray, ds: Any, photometric: str) -> np.ndarray:
    """A DICOM's grey levels in [0, 1], value by value: the modality LUT or rescale, then the VOI LUT or
    window, scaled by the range the standard gives them (:func:`_dicom_value_range`); MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_windowing

    modality, voi = _lut_item(ds, "ModalityLUTSequence"), _lut_item(ds, "VOILUTSequence")
    lo, hi = _dicom_value_range(ds, modality)
    if modality:
        table, first, modality_full = _lut_table(ds, modality)
        arr = _apply_lut(arr, table, first)
    else:
        arr = apply_modality_lut(arr, ds)  # the rescale, when there is one
    if voi:  # preferred over a window, as by pydicom and viewers
        table, first, voi_full = _lut_table(ds, voi)
        arr = _apply_lut(arr, table, first)
        lo, hi = 0.0, float(voi_full)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        arr = apply_windowing(arr, ds)  # into the modality range (pydicom's y_min..y_max)
    elif modality:  # the LUT's own output range, as for a VOI LUT
        lo, hi = 0.0, float(modality_full)
    if not hi > lo:
        raise ImageError("dicom_invalid", f"DICOM values have no range ({lo:g} to {hi:g}): is RescaleSlope 0?")
    out = np.array(arr, dtype=np.float32)  # one float32 copy, then in place
    np.subtract(out, np.float32(lo), out=out)
    np.divide(out, np.float32(hi - lo), out=out)
    np.clip(out, 0.0, 1.0, out=out)
    if photometric == "MONOCHROME1":  # high values are dark
        np.subtract(np.float32(1.0), out, out=out)
    return out


#: an integer image whose values span at most this many goes through a table of them (:func:`_per_value`)
_MAX_VALUE_TABLE = 1 << 20


def _per_value(raw: np.ndarray, transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``transform(raw)`` for an elementwise ``transform``, computed once per stored value when ``raw`` is
    integer, then looked up in row blocks: a 64 Mpx film costs its float32 output, not pydicom's float64
    temporaries (rescale + window: 1.8 GB and 6 s before, 0.7 GB and 0.4 s now; BENCHMARKS.md)."""
    if raw.dtype.kind not in "ui" or raw.size == 0:
        return transform(raw)
    lo, hi = 0 if raw.dtype.kind == "u" else int(raw.min()), int(raw.max())  # unsigned: index by the value itself
    if hi - lo >= _MAX_VALUE_TABLE:
        return transform(raw)
    table = np.asarray(transform(np.arange(lo, hi + 1, dtype=np.int64).astype(raw.dtype)), dtype=np.float32)
    out = np.empty(raw.shape, dtype=np.float32)
    rows = max(1, (1 << 22) // max(1, raw[0].size))  # ~4 Mpx per block
    for start in range(0, len(raw), rows):
        index = raw[start:start + rows]
        if lo:
            index = index.astype(np.intp)
            index -= lo
        out[start:start + rows] = table[index]
    return out


_DEFLATED = b"1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
#: explicit-VR value representations with a 2-byte reserved field and a 4-byte length
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


def _check_deflated(data: bytes, max_pixels: int) -> None:
    """A deflated DICOM inflates ~1000:1 and pydicom inflates it whole: inflate it here first, up to
    8 bytes per capped pixel (the most any image within the cap needs, as for files on disk)."""
    if _DEFLATED not in data[:4096]:  # cheap first look
        return
    start = at = 132 if data[128:132] == b"DICM" else 0
    while data[at:at + 2] == b"\x02\x00" and at + 8 <= len(data):  # the file meta group (explicit VR, LE)
        if data[at + 4:at + 6] in _LONG_VRS:
            at += 12 + int.from_bytes(data[at + 8:at + 12], "little")
        else:
            at += 8 + int.from_bytes(data[at + 6:at + 8], "little")
    if _DEFLATED not in data[start:at]:  # the UID elsewhere (a reference in the dataset) is no transfer syntax
        return
    inflater, pending, inflated = zlib.decompressobj(-zlib.MAX_WBITS), data[at:], 0
    try:
        while pending and not inflater.eof:  # 16 MiB at a time, thrown away: only the size counts here
            inflated += len(inflater.decompress(pending, 1 << 24))
            if inflated > 8 * max_pixels:
                raise ImageError("too_large", f"deflated DICOM inflates beyond 8 bytes per pixel of the cap of "
                                              f"{max_pixels}")
            pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise ImageError("dicom_invalid", f"deflated DICOM data is corrupt: {exc}") from None


def _check_dicom_frame(ds: Any, max_pixels: int) -> None:
    """A compressed frame is decoded at the size its own header says, which may not be the dataset's
    Rows x Columns (774 bytes decoded 1.6 Gpx): read that header, and a JPEG's scans, before decoding."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed or "PixelData" not in ds:
        return
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        with Image.open(io.BytesIO(frame)) as img:  # the header only (JPEG, JPEG 2000); else not PIL's to decode
            width, height, kind = img.size[0], img.size[1], img.format
    except Exception:  # noqa: BLE001 - RLE, JPEG-LS, a broken fragment: pydicom reports what it cannot decode
        return
    if width * height > max_pixels:
        raise ImageError("too_large", f"the DICOM's compressed frame is {width}x{height} = {width * height} pixels "
                                      f"(its header says {ds.get('Columns')}x{ds.get('Rows')}), over the cap of "
                                      f"{max_pixels}")
    if kind == "JPEG":
        _check_jpeg_scans(frame)


def _lut_item(ds: Any, sequence: str) -> Any:
    """The first item of a LUT sequence when it has a descriptor and data, else None."""
    items = ds.get(sequence)
    item = items[0] if items else None
    return item if item is not None and item.get("LUTDescriptor") is not None and item.get("LUTData") is not None \
        else None


def _lut_table(ds: Any, item: Any) -> tuple[np.ndarray, int, int]:
    """A modality or VOI LUT item's entries, its first mapped input value, and its output's full scale."""
    entries, first, bits = item.LUTDescriptor
    entries = int(entries) or 2**16
    data = item.LUTData
    if isinstance(data, bytes):  # OW: raw 16-bit words in the dataset's byte order
        little = ds.original_encoding[1] is not False
        table = np.frombuffer(data, dtype="<u2" if little else ">u2")[:entries]
    else:
        table = np.atleast_1d(np.asarray(data, dtype=np.int64))[:entries]
    return table, int(first), _lut_full_scale(int(bits), int(table.max(initial=0)))


def _apply_lut(arr: np.ndarray, table: np.ndarray, first: int) -> np.ndarray:
    """A LUT (PS3.3 C.11.1/C.11.2): values below the first mapped one take the first entry, above the
    last the last. Ours, not pydicom's: pydicom 3.0's ``apply_voi`` indexes in the LUT's output type,
    so an 8-bit LUT over 12-bit data wraps its indices at 256."""
    index = np.clip(np.floor(arr) - first, 0, len(table) - 1).astype(np.intp)
    return table[index]


def _lut_full_scale(declared_bits: int, largest_entry: int) -> int:
    """A LUT's output full scale: its descriptor's bits, unless its entries fit fewer (a 12-bit table
    declared 16, which DCMTK, too, treats as informational): else a film 16x too dark."""
    return min(2**declared_bits - 1, stored_full_scale(largest_entry))


def _dicom_value_range(ds: Any, modality: Any) -> tuple[float, float]:
    """The range the modality stage's values can take, by the standard, not by this image's pixels.

    A Modality LUT: 0..2^bits-1 of its descriptor (as pydicom's window assumes; without a window the
    LUT's own full scale, :func:`_lut_full_scale`); a rescale: the stored range through slope and
    intercept; else the stored range by BitsStored and sign. A window maps into this same range
    (pydicom's ``apply_windowing``); a VOI LUT into its own (:func:`_lut_full_scale`).
    Normalising by it, and not by the pixels' own min/max, keeps a window preset from stretching
    the film, a 16-bit copy of an 8-bit image scoring the same, and an image entirely above its
    window white, not black.
    """
    if modality is not None:
        return 0.0, float(2 ** int(modality.LUTDescriptor[2]) - 1)
    bits = int(ds.get("BitsStored", 16))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:  # pydicom rescales only with both
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return float(lo), float(hi)


def apply_clahe(img: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation on 16-bit data (keeps precision)."""
    import cv2

    clahe = cv2.createCLAHE(clipLimit=cfg.clahe_clip, tileGridSize=(cfg.clahe_grid, cfg.clahe_grid))
    u16 = np.round(np.clip(img, 0.0, 1.0) * 65535.0).astype(np.uint16)
    return clahe.apply(u16).astype(np.float32) / 65535.0


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Resize an HxW float32 image to SxS (squash, antialiased bilinear).

    PIL's float resampling is the algorithm torch's ``interpolate(antialias=True)``
    was ported from: the two agree within 3e-5 (tests/test_core.py).
    """
    if img.shape == (size, size):
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def to_model_input(img: np.ndarray, cfg: PreprocessConfig, augment: Augment | None = None) -> np.ndarray:
    """Decoded [0,1] image -> normalised 1xSxS float32 array (optionally augmented)."""
    if cfg.clahe:
        img = apply_clahe(img, cfg)
    img = np.ascontiguousarray(img, dtype=np.float32)
    x = augment(img[None], cfg.image_size) if augment is not None else resize_square(img, cfg.image_size)[None]
    out = np.subtract(x, np.float32(cfg.mean), dtype=np.float32)  # a new array: x may be the caller's image
    return np.divide(out, np.float32(cfg.std), out=out)


def max_file_bytes(max_pixels: int) -> int:
    """The largest file worth reading as one image: 8 bytes per pixel of the pixel cap (at least 64 MiB).

    That fits any uncompressed 16-bit RGBA image within the cap; a bigger file is not an
    X-ray, and reading it whole could exhaust a worker's memory before any decoder sees it.
    """
    return max(64 << 20, 8 * int(max_pixels))


def preprocess(data: bytes, cfg: PreprocessConfig, augment: Augment | None = None) -> np.ndarray:
    """THE preprocessing function: image bytes -> model input (1xSxS float32).

    Raises :class:`ImageError` (typed ``code``) for unusable inputs, and ``out_of_memory`` when the
    process has no memory left for one within the pixel cap (a rerun, or a client, retries it).
    """
    img = decode_image(data, cfg.max_pixels)
    try:
        return to_model_input(img, cfg, augment)
    except MemoryError as exc:
        raise _out_of_memory(exc) from None


def image_size_of(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header without decoding pixels; None if unknown."""
    try:
        if detect_format(data) == "dicom":
            import pydicom

            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=_forced(data))
            return int(ds.Columns), int(ds.Rows)
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            return (height, width) if _orientation(img) in (5, 6, 7, 8) else (width, height)
    except Exception:  # noqa: BLE001
        return None


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1 = as stored; 5-8 turn the image a quarter) from the header alone.

    Not ``getexif()``: for a PNG without an early eXIf chunk it decodes every pixel (a bomb's too)."""
    try:
        if img.format == "TIFF":
            return int(img.tag_v2.get(0x0112, 1))
        if "exif" in img.info:
            exif = Image.Exif()
            exif.load(img.info["exif"])
            return int(exif.get(0x0112, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF: as stored
        pass
    return 1


def make_train_augment(cfg: AugmentConfig) -> Augment:
    """Training augmentation: random resized crop, small affine, brightness/contrast.

    Operates on the [0,1] 1xHxW image *inside* :func:`preprocess`, so the
    decode, CLAHE and normalisation steps stay shared with inference.

    The random parameters are torchvision's own (``RandomResizedCrop`` and
    ``RandomAffine``'s ``get_params``, drawn from torch's generator, which the
    DataLoader seeds per worker); they are applied to a PIL float image. With
    one seed that gives what the v2 transforms give on a tensor (test_core),
    for 0.9 ms of CPU per 224 px image instead of 2.1-4.5 ms (0.6 vs 1.4 at
    128 px): CPU that a GPU worker's loader processes, or a CPU worker's
    own training step, get back (BENCHMARKS.md, "GPU paths").
    """
    import torch
    from torchvision.transforms import InterpolationMode, RandomAffine, RandomResizedCrop
    from torchvision.transforms import functional as F

    def uniform(spread: float) -> float:
        return 1.0 + (float(torch.rand(())) * 2 - 1) * spread

    def augment(img: np.ndarray, size: int) -> np.ndarray:
        pil = Image.fromarray(np.ascontiguousarray(img[0], dtype=np.float32))  # mode "F": no rounding to 8 bits
        top, left, h, w = RandomResizedCrop.get_params(pil, scale=[cfg.scale_min, 1.0], ratio=[cfg.ratio_min, cfg.ratio_max])
        pil = F.resized_crop(pil, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
        if cfg.rotate_deg or cfg.translate:
            angle, shift, _, _ = RandomAffine.get_params([-cfg.rotate_deg, cfg.rotate_deg], [cfg.translate, cfg.translate],
                                                         None, None, [size, size])
            pil = F.affine(pil, angle, list(shift), 1.0, [0.0, 0.0], InterpolationMode.NEAREST, fill=0.0)
        x = np.asarray(pil, dtype=np.float32)
        if cfg.hflip and torch.rand(()) < cfg.hflip:
            x = x[:, ::-1]
        if cfg.contrast:
            mean = x.mean()
            x = (x - mean) * np.float32(uniform(cfg.contrast)) + mean
        if cfg.brightness:
            x = x * np.float32(uniform(cfg.brightness))
        return np.clip(x, 0.0, 1.0, dtype=np.float32)[None]

    return augment

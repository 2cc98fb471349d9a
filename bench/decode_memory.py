"""Peak memory and CPU time of decoding one large film (8000x8000 = 64 Mpx, the default pixel cap).

Each decode runs in a fresh process (peak RSS is per process), twice per file:

* ``cxr``: :func:`cxr.preprocess.decode_image`, what screening and serving run;
* ``pydicom``: the textbook path for the same DICOM, ``pixel_array`` -> ``apply_modality_lut`` ->
  ``apply_voi_lut`` (a VOI LUT, else the window), float64 throughout, then scaled to [0, 1] in float32:
  the baseline, in the same run.

    .venv/bin/python bench/decode_memory.py             # ~1 min; writes its films to a temp folder
    .venv/bin/python bench/decode_memory.py --size 4000

Peak RSS includes the interpreter with numpy, PIL and pydicom loaded (the ``idle`` row) and the file's bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys
sys.path.insert(0, {root!r})
import numpy as np, pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from cxr.preprocess import decode_image

which, path = sys.argv[1], sys.argv[2]
data = open(path, "rb").read() if path else b""
def usage():  # VmHWM, not ru_maxrss: Linux carries the latter over from the parent across fork + exec
    r = resource.getrusage(resource.RUSAGE_SELF)
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return r.ru_utime + r.ru_stime, int(hwm.split()[1]) / 1024
cpu0, _ = usage()
if which == "cxr":
    out = decode_image(data)
elif which == "pydicom":
    import io
    ds = pydicom.dcmread(io.BytesIO(data))
    arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    out = ((arr - arr.min()) / max(1e-9, float(arr.max() - arr.min()))).astype(np.float32)
else:
    out = np.zeros(1, np.float32)
cpu1, peak = usage()
print(json.dumps({{"cpu_s": cpu1 - cpu0, "peak_mb": peak, "mean": float(out.mean())}}))
"""


def write_films(folder: Path, n: int) -> dict[str, Path]:
    """12-bit DICOMs (plain, VOI LUT, rescale + window), a 16-bit PNG and an 8-bit JPEG, n x n, random pixels."""
    import numpy as np
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.random.default_rng(0).integers(0, 4096, (n, n), dtype=np.uint16)

    def dicom(name: str, **extra) -> Path:
        meta = FileMetaDataset()
        meta.TransferSyntaxUID, meta.MediaStorageSOPClassUID = ExplicitVRLittleEndian, SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = Dataset()
        ds.file_meta = meta
        ds.Rows = ds.Columns = n
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = pixels.tobytes()
        for key, value in extra.items():
            setattr(ds, key, value)
        ds.save_as(folder / name, enforce_file_format=True)
        return folder / name

    voi = Dataset()
    voi.LUTDescriptor, voi.LUTData = [4096, 0, 16], (np.arange(4096) * 16).astype("<u2").tobytes()
    films = {
        "DICOM 12-bit": dicom("plain.dcm"),
        "DICOM + VOI LUT": dicom("voi.dcm", VOILUTSequence=[voi]),
        "DICOM + rescale + window": dicom("window.dcm", RescaleSlope=1, RescaleIntercept=-1024,
                                          WindowCenter=1000, WindowWidth=2000),
    }
    Image.fromarray(pixels * 16).save(folder / "film16.png", compress_level=1)
    Image.fromarray((pixels >> 4).astype(np.uint8)).save(folder / "film8.jpeg", quality=90)
    films["PNG 16-bit"], films["JPEG 8-bit"] = folder / "film16.png", folder / "film8.jpeg"
    return films


def measure(which: str, path: Path | None) -> dict:
    code = _CHILD.format(root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, which, str(path or "")], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8000, help="film side in pixels (8000: the 64 Mpx cap)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cxr-decode-") as tmp:
        films = write_films(Path(tmp), args.size)
        idle = measure("idle", None)
        print(f"{args.size}x{args.size} films; idle interpreter: {idle['peak_mb']:.0f} MB\n")
        print("| film | file MB | cxr peak MB | cxr CPU s | pydicom peak MB | pydicom CPU s | memory ratio | CPU ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for name, path in films.items():
            ours = measure("cxr", path)
            row = [name, f"{path.stat().st_size / 2**20:.0f}", f"{ours['peak_mb']:.0f}", f"{ours['cpu_s']:.2f}"]
            if path.suffix == ".dcm":
                base = measure("pydicom", path)
                row += [f"{base['peak_mb']:.0f}", f"{base['cpu_s']:.2f}",
                        f"{base['peak_mb'] / ours['peak_mb']:.2f}x", f"{base['cpu_s'] / max(ours['cpu_s'], 1e-3):.1f}x"]
            else:
                row += ["-", "-", "-", "-"]
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

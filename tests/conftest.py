"""Shared fixtures: the real data in ../shared, tiny exported models, a local Ray instance."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXR_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data" / "chest_xray"


def pytest_sessionstart(session: pytest.Session) -> None:
    if not (DATA / "MANIFEST.csv").is_file():
        pytest.exit(f"shared data missing: {DATA} (set CXR_SHARED)", returncode=2)


_EXIT_STATUS: list[int] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Exit with pytest's status once its summary is out, skipping the interpreter's teardown.

    Every test has run and been reported by now. What is left is the teardown of native
    libraries this process loaded as a Ray driver (Ray's core worker threads, ONNX Runtime,
    torch), and it segfaulted once after "162 passed" (2026-11-25), which turned a green run
    into a failed `make test`. Ray is shut down first, so no process of ours outlives the run.
    CXR_TEST_FULL_TEARDOWN=1 keeps the normal teardown, to chase such a crash.
    """
    if not _EXIT_STATUS or os.environ.get("CXR_TEST_FULL_TEARDOWN") == "1":
        return
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    status = _EXIT_STATUS[-1]
    left = _descendants_after(15.0)
    if left:  # a test that leaves a process behind fails the run (the teardown above would hide it)
        print("\nprocesses the tests left running:\n  " + "\n  ".join(left), file=sys.stderr)
        status = status or 3
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _descendants_after(grace_s: float) -> list[str]:
    """Command lines of this process's descendants still alive after ``grace_s`` (Ray's exit takes a moment)."""
    import time

    deadline = time.monotonic() + grace_s
    while True:
        found = _descendants(os.getpid())
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _descendants(root: int) -> list[str]:
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[0] == "Z":  # a zombie has exited; only its parent's wait is missing
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                names[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
            children.setdefault(int(fields[1]), []).append(int(entry))
        except OSError:  # exited while we looked
            continue
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(f"{pid} {names.get(pid, '?')}")
        todo += children.get(pid, [])
    return out


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The Kermany training split (read-only)."""
    return DATA


@pytest.fixture(scope="session")
def sample_images(data_dir: Path) -> list[Path]:
    """A few real X-rays: 4 normal, 4 pneumonia."""
    normal = sorted((data_dir / "train" / "NORMAL").glob("*.jpeg"))[:4]
    pneu = sorted((data_dir / "train" / "PNEUMONIA").glob("*.jpeg"))[:4]
    return normal + pneu


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported (untrained, seeded) binary model at 64 px: fast to score, real export format."""
    import torch

    from cxr.config import CLASSES, PreprocessConfig
    from cxr.export import ModelMetadata, save_export
    from cxr.model import build_model

    torch.manual_seed(0)
    model = build_model(2)
    # a few BN-statistics updates so outputs are not saturated at 0/1
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 1, 64, 64))
    out = tmp_path_factory.mktemp("model") / "model"
    save_export(out, model.eval(), ModelMetadata(classes=list(CLASSES["binary"]), preprocess=PreprocessConfig(image_size=64),
                                                 threshold=0.5, model_version="tiny-test"))
    return out


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray instance for one test module, shut down afterwards."""
    import ray

    from jobs.common import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=2, dashboard=False, log_to_driver=False)  # retried: a loaded machine can miss Ray's start-up wait
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def make_dicom():
    """Builds uncompressed DICOM bytes: ``make_dicom(pixels, photometric, **attributes)`` (16 bits stored).

    ``attributes`` set further data elements, e.g. ``NumberOfFrames=3`` or ``WindowWidth=0``.
    """
    import io

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def build(pixels, photometric: str = "MONOCHROME2", **attributes) -> bytes:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        for name, value in attributes.items():
            setattr(ds, name, value)
        ds.PixelData = np.asarray(pixels).astype(np.uint16).tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    return build

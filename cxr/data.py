"""Datasets on disk: discovery (Kaggle layout or manifest), labels, patient split.

Pure Python + pyarrow/sklearn: no Ray, no torch. The Ray jobs and the tests
build on these functions.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cxr.config import CLASSES
from cxr.errors import CxrError
from cxr.storage import is_uri

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ".webp"}
MANIFEST_NAMES = ("MANIFEST.csv", "manifest.csv", "manifest.parquet", "MANIFEST.parquet")
_LABELS = {"normal": "normal", "pneumonia": "pneumonia"}


@dataclass(frozen=True)
class Sample:
    """One labelled image. ``path`` is absolute; ``label`` is lower-case binary."""

    path: str
    label: str  # normal | pneumonia
    subtype: str  # normal | bacteria | virus | unknown
    patient_id: str
    split: str = "train"

    def target(self, task: str) -> int:
        """Class index of this sample for ``task`` (see cxr.config.CLASSES)."""
        name = self.label if task == "binary" else self.subtype
        classes = CLASSES[task]
        if name not in classes:
            raise CxrError(f"{self.path}: no {task} label (got {name!r}); subtype needs bacteria/virus in file names")
        return classes.index(name)


def subtype_from_name(name: str, label: str) -> str:
    """Kermany file names carry the pneumonia subtype: person1_bacteria_1.jpeg, person2_virus_3.jpeg."""
    if label == "normal":
        return "normal"
    low = name.lower()
    return "bacteria" if "bacteria" in low else "virus" if "virus" in low else "unknown"


_PERSON = re.compile(r"^(person\d+)_", re.I)
_IM = re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.I)


def patient_id_from_name(name: str) -> str:
    """personN_... -> personN; IM-0115-0001 -> IM-0115; NORMAL2-IM-1427-0001 -> NORMAL2-IM-1427; else the stem."""
    return known_patient_id(name) or Path(name).stem


def known_patient_id(name: str) -> str | None:
    """The patient a Kermany-style file name names (see :func:`patient_id_from_name`), else None."""
    m = _PERSON.match(name) or _IM.match(name)  # on the name itself: both patterns end before any suffix
    return m.group(1) if m else None


def normalise_label(raw: str, where: str) -> str:
    label = _LABELS.get(str(raw).strip().lower())
    if label is None:
        raise CxrError(f"{where}: unknown label {raw!r} (expected NORMAL or PNEUMONIA)")
    return label


def find_manifest(root: Path) -> Path | None:
    if root.is_file():
        return root
    for name in MANIFEST_NAMES:
        if (root / name).is_file():
            return root / name
    return None


def read_manifest_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV or Parquet manifest (training's --data, screening's --labels) as dicts of strings,
    with at least the columns path and label."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise CxrError(f"{path} is an image, not a manifest: give a folder of images (the Kaggle layout, or one "
                       "holding MANIFEST.csv) or a CSV/Parquet manifest with columns path,label")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = [{k: ("" if v is None else str(v)) for k, v in row.items()} for row in pq.read_table(path).to_pylist()]
        else:
            with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a byte-order mark
                rows = list(csv.DictReader(f))
    except Exception as exc:  # noqa: BLE001
        raise CxrError(f"cannot read manifest {path}: {exc}") from None
    if rows and not {"path", "label"} <= set(rows[0]):
        raise CxrError(f"manifest {path} needs columns path,label (has {sorted(rows[0])})")
    return rows


def manifest_entry_path(manifest: Path, path: str) -> str:
    """A manifest row's file: relative paths are relative to the manifest's folder; URIs stay as they are.

    The folder is resolved (symlinks, ``..``), as an archive's root is when it is listed; the file's own
    name is kept, so a symlinked file matches the listing's row. Folders are resolved once each: a
    ``resolve()`` per row made a million-row labels manifest take ~6 min."""
    if is_uri(path):
        return path
    # absolute before the cache: a relative manifest is relative to today's working directory
    full = os.path.join(_resolved_folder(os.path.abspath(manifest.parent)), path)
    folder, _, name = full.rpartition("/")
    return f"{_resolved_folder(folder or '/').rstrip('/')}/{name}"


@functools.lru_cache(maxsize=65_536)
def _resolved_folder(folder: str) -> str:
    """An absolute folder with its symlinks and ``..`` resolved (cached: a manifest names few folders)."""
    return str(Path(folder).resolve())


def discover(data: str | Path, split: str = "train") -> list[Sample]:
    """Labelled samples of one split from a manifest or the Kaggle folder layout.

    ``data`` is a manifest file (CSV/Parquet: path, label[, subtype, patient_id, split]),
    a folder holding one (MANIFEST.csv), or a folder ``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*``.
    """
    if is_uri(data):
        raise CxrError(f"--data must be a path every worker can read (local, or a filesystem mounted at the same "
                       f"path on every node), not a URI: {data}")
    root = Path(data).expanduser()
    if not root.exists():
        raise CxrError(f"data not found: {root}")
    manifest = find_manifest(root)
    samples = _from_manifest(manifest, split) if manifest else _from_folders(root, split)
    if not samples:
        where = f"manifest {manifest}" if manifest else f"{root}/{split}/{{NORMAL,PNEUMONIA}}/"
        raise CxrError(f"no images for split {split!r} in {where}")
    return sorted(samples, key=lambda s: s.path)


def _from_manifest(manifest: Path, split: str) -> list[Sample]:
    out = []
    for i, row in enumerate(read_manifest_rows(manifest)):
        if row.get("split") and row["split"] != split:
            continue
        label = normalise_label(row["label"], f"{manifest}:{i + 2}")  # training needs every label
        name = Path(row["path"]).name
        out.append(Sample(
            path=manifest_entry_path(manifest, row["path"]),
            label=label,
            subtype=(row.get("subtype") or subtype_from_name(name, label)).lower(),
            patient_id=row.get("patient_id") or patient_id_from_name(name),
            split=split,
        ))
    return out


def _from_folders(root: Path, split: str) -> list[Sample]:
    base = root / split if (root / split).is_dir() else root
    if not base.is_dir():
        raise CxrError(f"{root} has no {split}/ folder and no manifest")
    out = []
    for label_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        label = normalise_label(label_dir.name, str(label_dir))
        for p in sorted(label_dir.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                out.append(Sample(str(p.resolve()), label, subtype_from_name(p.name, label), patient_id_from_name(p.name), split))
    return out


def label_from_path(path: str) -> str | None:
    """Binary label from a Kaggle-layout path (.../NORMAL/x.jpeg), or None."""
    for part in reversed(Path(path).parts[:-1]):
        if part.lower() in _LABELS:
            return _LABELS[part.lower()]
    return None


def val_folds(val_fraction: float) -> int:
    """The number of folds k whose one fold, 1/k, is nearest ``val_fraction`` (the split holds out one fold)."""
    if not 0.0 < val_fraction < 0.5:
        raise CxrError(f"val fraction must be in (0, 0.5), got {val_fraction}")
    low = max(2, int(1.0 / val_fraction))  # 1/low >= val_fraction >= 1/(low + 1)
    return min((low, low + 1), key=lambda k: (abs(1.0 / k - val_fraction), k))


def split_by_patient(samples: list[Sample], val_fraction: float, seed: int, task: str = "binary") -> tuple[list[Sample], list[Sample]]:
    """Seeded train/val split grouped by patient and stratified by class.

    No patient appears on both sides (a patient's several films are near
    duplicates; splitting them would leak and inflate validation scores), even
    a patient with films of both labels. The held-out share is one fold of k,
    so it is approximately ``val_fraction``: the nearest 1/k (0.15 -> 1/7), up to
    the sizes of the patient groups.
    """
    n_splits = val_folds(val_fraction)
    from sklearn.model_selection import StratifiedGroupKFold

    y = [s.target(task) for s in samples]
    groups = [s.patient_id for s in samples]
    if len(set(groups)) < n_splits:
        raise CxrError(f"too few patients ({len(set(groups))}) for a {val_fraction:.0%} validation split")
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    try:
        train_idx, val_idx = next(cv.split(samples, y, groups))
    except ValueError as exc:  # e.g. a class with fewer images than folds
        raise CxrError(f"cannot hold out {val_fraction:.0%} of patients for validation: {exc}") from None
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


def check_split_classes(train: list[Sample], val: list[Sample], task: str) -> None:
    """Refuse a split a model cannot learn or be judged on: training must show every class, and validation
    normal films and others (without both, its AUC and the exported threshold are undefined). A missing
    NORMAL folder or a wrong label column used to train, and export, a model with a NaN AUC."""
    classes = CLASSES[task]

    def held(side: list[Sample]) -> str:
        counts = Counter(classes[s.target(task)] for s in side)
        return ", ".join(f"{n} {c}" for c, n in counts.most_common()) or "no images"

    lacking = [c for i, c in enumerate(classes) if not any(s.target(task) == i for s in train)]
    if lacking:
        raise CxrError(f"the training images hold no {' or '.join(lacking)} ({held(train)}): check --data's labels "
                       "(both class folders present? the manifest's label column?)")
    in_val = {s.target(task) for s in val}
    if 0 not in in_val or len(in_val) < 2:
        raise CxrError(f"the validation split holds {held(val)}: its AUC and the model's threshold would be "
                       "undefined; give more images of each class, or a larger --val-fraction")


def fingerprint(samples: list[Sample]) -> str:
    """sha256 over (relative name, label, patient) of a sample list: which data a model saw."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.path):
        h.update(f"{Path(s.path).parent.name}/{Path(s.path).name}\t{s.label}\t{s.subtype}\t{s.patient_id}\n".encode())
    return h.hexdigest()


def stratified_subset(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """A seeded, class-stratified subset of about ``limit`` samples (``--limit``: smoke runs and tests);
    at least 2 per class, so a patient split can still hold both classes on each side."""
    if not limit or limit >= len(samples):
        return samples
    import numpy as np

    rng = np.random.default_rng(seed)
    by_label: dict[str, list[Sample]] = {}
    for s in samples:
        by_label.setdefault(s.label, []).append(s)
    out: list[Sample] = []
    for group in by_label.values():
        k = max(2, round(limit * len(group) / len(samples)))
        out += [group[i] for i in rng.permutation(len(group))[:k]]
    return sorted(out, key=lambda s: s.path)


def write_split(path: Path, seed: int, val_fraction: float, train: list[Sample], val: list[Sample]) -> None:
    """Record the patient split so a run can be audited and reproduced."""
    def counts(ss: list[Sample]) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in ss:
            out[s.label] = out.get(s.label, 0) + 1
        return out

    path.write_text(json.dumps({
        "seed": seed, "val_fraction": val_fraction, "val_share": round(len(val) / len(train + val), 4),
        "grouped_by": "patient_id",
        "train": {"images": len(train), "patients": len({s.patient_id for s in train}), "by_label": counts(train)},
        "val": {"images": len(val), "patients": len({s.patient_id for s in val}), "by_label": counts(val),
                "patient_ids": sorted({s.patient_id for s in val}), "paths": [s.path for s in val],
                # named by --data but not on disk when the run started (the workers skip them): no reason to
                # refuse its --resume later (the start checks only a sample of the training paths)
                "missing": [s.path for s in val if not Path(s.path).exists()]},
        "fingerprint": fingerprint(train + val),
    }, indent=2) + "\n")


def saved_split(path: Path, samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """(train, val) of a run's split.json over today's ``samples``, or an error if the data changed under it."""
    try:
        saved = json.loads(path.read_text())
        saved["val"]["images"]  # noqa: B018 - the shape every use below relies on
    except (ValueError, TypeError, KeyError) as exc:
        raise CxrError(f"cannot --resume: {path} is damaged ({exc}); it is the run's validation split, so restore "
                       "it or start a new run with another --output") from None
    known = {s.path for s in samples}
    if "paths" in saved["val"]:
        val_paths = set(saved["val"]["paths"])
    else:  # split.json of an older cxr: the validation patients
        ids = set(saved["val"]["patient_ids"])
        val_paths = {s.path for s in samples if s.patient_id in ids}
    missing_at_start = set(saved["val"].get("missing", ()))
    gone = sorted(p for p in val_paths if p not in known or (p not in missing_at_start and not Path(p).exists()))
    if gone:
        raise CxrError(f"cannot --resume: {len(gone)} of the run's {len(val_paths)} validation images are not in "
                       f"--data any more (e.g. {gone[0]}); start a new run with another --output")
    if fingerprint(samples) != saved.get("fingerprint") or len(val_paths) != saved["val"]["images"]:
        raise CxrError(f"cannot --resume: the images in --data are not the ones of the run's split ({path}); "
                       "start a new run with another --output")
    return [s for s in samples if s.path not in val_paths], [s for s in samples if s.path in val_paths]

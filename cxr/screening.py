"""Screening results: the versioned Parquet schema and the pure helpers around it.

No Ray here: the Ray Data job (``jobs/screen.py``), ``cxr report`` and the
tests share these functions, so the on-disk contract lives in one place.

Output folder layout (``cxr screen ... --output OUT``)::

    OUT/_screen.json            which model owns the folder, schema version
    OUT/_screen.lock            advisory lock (local outputs): one run at a time
    OUT/results/part-*.parquet  result parts; each appears atomically when complete
    OUT/results/_tmp/           parts being written (removed at the next start)
    OUT/report/                 evaluation report when labels are known
    OUT/summary.json            the last run's summary

Schema (version :data:`SCHEMA_VERSION`), one row per input file:

=============== =========== ==================================================
column          type        meaning
=============== =========== ==================================================
path            string      absolute local path, or full URI (s3://b/k.dcm)
size_bytes      int64       file size
mtime_ns        int64       modification time (ns) when settled (a minute old); null otherwise (v2)
sha256          string      hex sha256 of the file content
width, height   int32       image size from its header (null when unreadable)
prob_<class>    float32     model probability per class (null on error rows)
label           string      predicted class (``cxr.metrics.decide``; null on error)
threshold       float64     decision threshold on P(not normal) from the export
model_id        string      sha256 of the export's weights
model_version   string      the export's human-readable version
scored_at       timestamp   UTC time the row was produced
error_code      string      ``cxr.errors.ImageError.CODES`` member; null when scored
error           string      human-readable error message; null when scored
true_label      string      ground truth from folder layout / --labels; null if unknown
=============== =========== ==================================================

A path rescored later (its content changed, or ``--force``) gets a new row in
a newer part; readers keep the newest row per path (:func:`dedupe_latest`,
:func:`read_results`).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cxr.config import ScreenConfig
from cxr.data import IMAGE_SUFFIXES, label_from_path, manifest_entry_path, normalise_label, read_manifest_rows
from cxr.errors import CxrError, first_line
from cxr.storage import join, open_fs, uri_prefix

#: 1: the columns of the issue; 2: ``mtime_ns`` (parts of either version read together; missing = null)
SCHEMA_VERSION = 2
STATE_FILE = "_screen.json"
LOCK_FILE = "_screen.lock"
RESULTS_DIR = "results"
TMP_DIR = "_tmp"
REPORT_DIR = "report"
REPLACED_DIR = "replaced"  # another model's results, set aside by --force
STATS_DIR = "stats"  # (path, size, mtime) of files found already scored whose rows lack it (record_stats)
SUMMARY_FILE = "summary.json"
#: error codes that mean "try again next run" rather than "this file is bad"
RETRY_CODES = frozenset({"read_failed", "out_of_memory"})
_SNIFF_BYTES = 132  # enough for every magic number, DICOM's "DICM" sits at 128
#: a file modified this close to the listing is not trusted by (size, mtime) alone: a rewrite within
#: the file system's timestamp granularity (a few ms, a second on S3), or by a server whose clock is
#: a little off, could keep both ("racy git"). Its mtime is not recorded; the next run hashes it and,
#: found unchanged and settled, records its stat (:func:`record_stats`).
SETTLED_NS = 60 * 10**9


# --------------------------------------------------------------------------- schema


def prob_column(name: str) -> str:
    return f"prob_{name}"


def result_schema(classes: Sequence[str]) -> pa.Schema:
    """The versioned Parquet schema of screening results for a model's classes."""
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("size_bytes", pa.int64()),
        pa.field("mtime_ns", pa.int64()),  # the file's modification time when listed; null: not trusted
        pa.field("sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        *[pa.field(prob_column(c), pa.float32()) for c in classes],
        pa.field("label", pa.string()),
        pa.field("threshold", pa.float64()),
        pa.field("model_id", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("scored_at", pa.timestamp("us", tz="UTC")),
        pa.field("error_code", pa.string()),
        pa.field("error", pa.string()),
        pa.field("true_label", pa.string()),
    ]
    meta = {"cxr.schema": "screening", "cxr.schema_version": str(SCHEMA_VERSION), "cxr.classes": json.dumps(list(classes))}
    return pa.schema(fields, metadata=meta)


def classes_of(schema: pa.Schema) -> list[str]:
    """Class names of a results schema (from its metadata, else from its prob_ columns)."""
    meta = schema.metadata or {}
    if b"cxr.classes" in meta:
        return list(json.loads(meta[b"cxr.classes"]))
    return [n[len("prob_"):] for n in schema.names if n.startswith("prob_")]


def build_rows(
    base: Mapping[str, Sequence[Any]],
    probs: np.ndarray,
    ok: np.ndarray,
    classes: Sequence[str],
    threshold: float,
    model_id: str,
    model_version: str,
    scored_at: datetime | None = None,
    true_label: Sequence[str | None] | None = None,
) -> pa.Table:
    """One results table from per-file fields and the engine's probabilities.

    ``base`` holds path, size_bytes, sha256, width, height, error_code, error and optionally
    mtime_ns (empty string / negative number = unknown); ``probs`` is N x C with rows for
    error files ignored; ``ok`` marks the rows that were scored. The decision is
    :func:`cxr.metrics.decide` at ``threshold``, the same rule serving uses.
    """
    from cxr.metrics import decide

    n = len(base["path"])
    ok = np.asarray(ok, dtype=bool).reshape(n)
    probs = np.asarray(probs, dtype=np.float32).reshape(n, len(classes)) if n else np.zeros((0, len(classes)), np.float32)
    labels = decide(probs, classes, threshold) if n else []
    when = scored_at or datetime.now(timezone.utc)

    def opt_str(values: Sequence[Any]) -> list[str | None]:
        return [None if v is None or v == "" else str(v) for v in values]

    def opt_int(values: Sequence[Any]) -> list[int | None]:
        return [None if v is None or int(v) < 0 else int(v) for v in values]

    cols: dict[str, Any] = {
        "path": [str(p) for p in base["path"]],
        "size_bytes": opt_int(base["size_bytes"]),
        "mtime_ns": opt_int(base["mtime_ns"]) if "mtime_ns" in base else [None] * n,
        "sha256": opt_str(base["sha256"]),
        "width": opt_int(base["width"]),
        "height": opt_int(base["height"]),
    }
    for j, c in enumerate(classes):
        cols[prob_column(c)] = pa.array(probs[:, j], pa.float32(), mask=~ok)
    cols["label"] = [lab if good else None for lab, good in zip(labels, ok)]
    cols["threshold"] = [float(threshold)] * n
    cols["model_id"] = [model_id] * n
    cols["model_version"] = [model_version] * n
    cols["scored_at"] = [when] * n
    codes = opt_str(base["error_code"])
    cols["error_code"] = [None if good else (code or "corrupt") for code, good in zip(codes, ok)]
    cols["error"] = [None if good else msg for msg, good in zip(opt_str(base["error"]), ok)]
    cols["true_label"] = list(true_label) if true_label is not None else [None] * n
    schema = result_schema(classes)
    return pa.table({f.name: pa.array(cols[f.name], f.type) if not isinstance(cols[f.name], pa.Array) else cols[f.name]
                     for f in schema}, schema=schema)


def empty_results(classes: Sequence[str]) -> pa.Table:
    return result_schema(classes).empty_table()


# --------------------------------------------------------------------------- resume keys


def resume_key(path: str, sha256: str) -> bytes:
    """16-byte key of (path, content): a row is done when this key was scored by the model.

    Keyed by path *and* sha256, so two identical files at different paths still
    get one row each, and a file whose content changed is scored again.
    """
    return hashlib.blake2b(f"{path}\0{sha256}".encode(), digest_size=16).digest()


def done_keys(results: pa.Table, model_id: str) -> np.ndarray:
    """Sorted ``S16`` array of resume keys whose *current* row (newest per path) ``model_id`` scored.

    Only the newest row of each path counts: a file whose latest row is a retryable
    error, or whose content came back to an earlier version, is scored again even
    though an older row once held that key. ``results`` needs path, sha256, model_id,
    error_code and scored_at. A sorted fixed-width array (not a Python set) so workers
    can share it zero-copy through Ray's object store and test membership with a binary search.
    """
    return resume_keys(results, model_id)[0]


def stat_key(path: str, size: int, mtime_ns: int) -> bytes:
    """16-byte key of (path, size, modification time): what a rerun checks before reading a file."""
    return hashlib.blake2b(f"{path}\0{size}\0{mtime_ns}".encode(), digest_size=16).digest()


def unchanged_keys(results: pa.Table, model_id: str) -> np.ndarray:
    """Sorted ``S16`` :func:`stat_key` array of the current rows ``model_id`` scored with a settled mtime.

    A listed file whose key is in it has the path, size and modification time of a file this model
    already scored: it is skipped without being read (a nightly rerun over a large archive would
    otherwise read every byte of it again to hash it). Same rules as :func:`done_keys` otherwise;
    ``results`` also needs size_bytes and mtime_ns (null in parts written before schema v2).
    """
    return resume_keys(results, model_id)[1]


class ResumeKeys(NamedTuple):
    done: np.ndarray  # :func:`done_keys`
    unchanged: np.ndarray  # :func:`unchanged_keys`, and the stat records that vouch for a current row
    #: (path, size) of the paths whose current row this model scored: the row's size where the row has a
    #: settled mtime (a same-size file with another mtime may hold the same bytes), null where it has none
    #: (its stat vouches for nothing: any listing may hold the same bytes). Arrow, not a dict: a million
    #: paths as Python objects held ~1 GB of the driver for the whole run. Read with :func:`scored_sizes`.
    scored: pa.Table


def scored_sizes(resume: ResumeKeys, paths: Sequence[str]) -> dict[str, int | None]:
    """:attr:`ResumeKeys.scored` for ``paths`` (those a rerun has left to check, usually few): path -> size or None."""
    if not paths or resume.scored.num_rows == 0:
        return {}
    hit = resume.scored.filter(pc.is_in(resume.scored["path"], value_set=pa.array(list(paths), pa.string())))
    return dict(zip(hit["path"].to_pylist(), hit["size"].to_pylist()))


_KEY_CHUNK = 65_536  # rows turned into Python strings at a time while hashing keys: bounded driver memory


def _keys(columns: Sequence[pa.ChunkedArray], key: Any) -> np.ndarray:
    """Sorted, distinct ``S16`` keys of ``key(*row)`` over the rows of ``columns``, a chunk at a time."""
    parts = [np.zeros(0, dtype="S16")]
    table = pa.table({str(i): c for i, c in enumerate(columns)})
    for batch in table.to_batches(max_chunksize=_KEY_CHUNK):
        rows = zip(*(col.to_pylist() for col in batch.columns))
        parts.append(np.array([key(*row) for row in rows], dtype="S16"))
    return np.unique(np.concatenate(parts))


def _scored_by(current: pa.Table, model_id: str) -> pa.Table:
    """(path, sha256, size, mtime) of the current rows ``model_id`` wrote, error rows included: what a rerun
    need not score again. A retryable error (:data:`RETRY_CODES`, e.g. ``read_failed``) is tried again."""

    def column(name: str, kind: pa.DataType) -> pa.ChunkedArray:
        if name not in current.column_names:
            return pa.chunked_array([pa.nulls(current.num_rows, kind)])
        return current[name].cast(kind)  # an all-null column may have come in as type null

    sha = column("sha256", pa.string())
    ok = pc.and_(pc.equal(column("model_id", pa.string()), model_id), pc.greater(pc.utf8_length(sha), 0))
    retry = pc.is_in(column("error_code", pa.string()), value_set=pa.array(sorted(RETRY_CODES)))
    ok = pc.and_(pc.fill_null(ok, False), pc.invert(pc.fill_null(retry, False)))
    return pa.table({"path": column("path", pa.string()), "sha256": sha, "size": column("size_bytes", pa.int64()),
                     "mtime": column("mtime_ns", pa.int64())}).filter(ok)


def resume_keys(results: pa.Table, model_id: str, stats: pa.Table | None = None) -> ResumeKeys:
    """:func:`done_keys` and :func:`unchanged_keys` from one pass over the current rows (a rerun needs
    both, and the newest-row-per-path sort is the costly part on a large results folder), plus the
    stat keys of ``stats`` records (:func:`record_stats`) whose (path, sha256) is a current row's.

    Selected in Arrow; only the keys' inputs become Python objects, a chunk at a time (the stat records,
    a few per run, at once)."""
    empty = np.zeros(0, dtype="S16")
    if results.num_rows == 0:
        return ResumeKeys(empty, empty, pa.table({"path": pa.array([], pa.string()), "size": pa.array([], pa.int64())}))
    mine = _scored_by(dedupe_latest(results), model_id)
    settled = pc.and_(pc.is_valid(mine["size"]), pc.is_valid(mine["mtime"]))
    done = _keys([mine["path"], mine["sha256"]], resume_key)
    stable = mine.filter(settled)
    unchanged = [_keys([stable["path"], stable["size"], stable["mtime"]], stat_key)]
    if stats is not None and stats.num_rows:
        vouched = stats.filter(pc.fill_null(pc.equal(stats["model_id"], model_id), False))
        recorded = [(p, n_, m) for p, s_, n_, m in zip(*(vouched[c].to_pylist() for c in
                                                         ("path", "sha256", "size_bytes", "mtime_ns")))
                    if is_done(done, resume_key(p, s_))]  # the content the current row scored
        unchanged.append(np.array([stat_key(*r) for r in recorded], dtype="S16"))
    scored = pa.table({"path": mine["path"], "size": pc.if_else(settled, mine["size"], pa.scalar(None, pa.int64()))})
    return ResumeKeys(done, np.unique(np.concatenate(unchanged)), scored)


_STATS_SCHEMA = pa.schema([("path", pa.string()), ("size_bytes", pa.int64()), ("mtime_ns", pa.int64()),
                           ("sha256", pa.string()), ("model_id", pa.string())])


def record_stats(location: str, records: Sequence[Mapping[str, Any]]) -> None:
    """Remember the settled (size, mtime) of files a run found already scored by content.

    A row carries the stat of its file when it was listed, and only when settled (:data:`SETTLED_NS`):
    a file copied in a minute before its first run, or changed between listing and reading, has a row
    without a usable one, and would be read and hashed again by every later run, Ray started for it.
    One small Parquet file per run under ``OUTPUT/stats/``; :func:`resume_keys` trusts a record only
    while its (path, sha256) is the path's current row."""
    if not records:
        return
    fs, out_dir = open_fs(location)
    fs.create_dir(f"{out_dir}/{STATS_DIR}", recursive=True)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(list(records), schema=_STATS_SCHEMA), sink)
    name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}.parquet"
    write_bytes_atomic(fs, f"{out_dir}/{STATS_DIR}/{name}", sink.getvalue().to_pybytes())


def read_stats(location: str) -> pa.Table | None:
    """Every record :func:`record_stats` wrote (None when there are none)."""
    fs, out_dir = open_fs(location)
    tables = []
    for name in _parquet_files(fs, f"{out_dir}/{STATS_DIR}"):
        try:
            tables.append(pq.read_table(name, filesystem=fs, schema=_STATS_SCHEMA))
        except Exception as exc:  # noqa: BLE001 - a cache: a damaged record file costs re-reads, not the run
            import logging

            logging.getLogger("cxr").warning("warning: ignoring unreadable stat records %s: %s", name,
                                             first_line(exc)[:200])
    return pa.concat_tables(tables) if tables else None


def is_done(keys: np.ndarray, key: bytes) -> bool:
    """Whether ``key`` is in the sorted ``done_keys`` array.

    The probe goes through the array's own dtype: numpy's ``S16`` drops trailing NUL bytes when an
    element is read back, so a raw 16-byte key ending in ``\\x00`` (1 in 256) would never compare equal
    and that file would be rescored, and duplicated, on every run.
    """
    if keys.size == 0:
        return False
    probe = np.array(key, dtype=keys.dtype)
    i = int(np.searchsorted(keys, probe))
    return i < keys.size and keys[i] == probe[()]


# --------------------------------------------------------------------------- reading results


def dedupe_latest(table: pa.Table) -> pa.Table:
    """One row per path: the newest by ``scored_at`` (later rows win ties).

    Sorted by Arrow itself: no Python object per row and no fixed-width copy of the
    paths (a numpy ``str`` array is rows x longest path x 4 bytes).
    """
    n = table.num_rows
    if n == 0:
        return table
    when = (table.column("scored_at").cast(pa.int64()).fill_null(-(2**62)) if "scored_at" in table.column_names
            else pa.array(np.zeros(n, np.int64)))  # no times: the later row wins
    keys = pa.table({
        "path": table.column("path"),
        "when": when,
        "row": pa.array(np.arange(n)),
    })
    idx = pc.sort_indices(keys, sort_keys=[("path", "ascending"), ("when", "descending"), ("row", "descending")])
    paths = keys.column("path").take(idx)
    first = np.ones(n, dtype=bool)
    if n > 1:
        first[1:] = pc.not_equal(paths.slice(1), paths.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    return table.take(pa.array(np.sort(idx.to_numpy()[first])))


def list_parts(fs: pafs.FileSystem, out_dir: str) -> list[str]:
    """Completed result parts, oldest first (part names start with a UTC timestamp)."""
    return _parquet_files(fs, f"{out_dir}/{RESULTS_DIR}")


def _parquet_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    """The finished ``.parquet`` files directly in ``folder``, sorted by name (none when it is missing)."""
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                  and not i.base_name.startswith(("_", ".")))


def read_parts(location: str, classes: Sequence[str] | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """All rows of all parts (duplicates by path included), in part order; optionally only ``columns``."""
    fs, out_dir = open_fs(location)
    parts = list_parts(fs, out_dir)
    if not parts:
        empty = empty_results(classes or read_state(location).get("classes") or [])
        return empty.select(list(columns)) if columns else empty
    tables = []
    for p in parts:
        try:
            tables.append(_read_part(fs, p, columns))
        except Exception as exc:  # noqa: BLE001
            raise CxrError(f"cannot read result part {p}: {exc}") from None
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowInvalid as exc:
        raise CxrError(f"result parts in {location} have different schemas: {exc}") from None


def _read_part(fs: pafs.FileSystem, path: str, columns: Sequence[str] | None) -> pa.Table:
    """One part; a column its (older) schema lacks comes back as nulls of the current type."""
    part = pq.ParquetFile(path, filesystem=fs)
    if not columns:
        return part.read()
    have = set(part.schema_arrow.names)
    table = part.read(columns=[c for c in columns if c in have])
    current = result_schema([])
    for c in columns:
        if c not in have:
            kind = current.field(c).type if c in current.names else pa.null()
            table = table.append_column(c, pa.nulls(table.num_rows, kind))
    return table.select(list(columns))


def read_results(location: str) -> pa.Table:
    """The current results of a screening folder: one row per path, newest first wins."""
    fs, out_dir = open_fs(location)
    if fs.get_file_info(out_dir).type != pafs.FileType.Directory:
        raise CxrError(f"screening folder not found: {location}")
    state = read_state(location)
    if not state and not list_parts(fs, out_dir):
        raise CxrError(f"{location} is not a cxr screening folder (no {STATE_FILE}, no {RESULTS_DIR}/part-*.parquet)")
    return dedupe_latest(read_parts(location, state.get("classes")))


# --------------------------------------------------------------------------- folder state


def read_state(location: str) -> dict[str, Any]:
    fs, out_dir = open_fs(location)
    path = f"{out_dir}/{STATE_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return {}
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except Exception as exc:  # noqa: BLE001
        raise CxrError(f"{join(location, STATE_FILE)} is unreadable ({exc}); remove it or use a new --output") from None


def check_owner(state: Mapping[str, Any], model_id: str, location: str, force: bool) -> None:
    """Refuse to mix models in one output folder unless ``--force`` or ``--new-model rescore``."""
    if not state:
        return
    if int(state.get("schema_version", SCHEMA_VERSION)) > SCHEMA_VERSION:
        raise CxrError(f"{location} was written by a newer cxr (schema v{state['schema_version']} > v{SCHEMA_VERSION})")
    owner = state.get("model_id")
    if owner and owner != model_id and not force:
        raise CxrError(
            f"{location} holds results of another model ({state.get('model_version') or '?'} {owner[:12]}), "
            f"not {model_id[:12]}; use a new --output, or --new-model rescore to set them aside (in replaced/) "
            "and score the archive with this model (later runs then resume as usual)"
        )


def write_state(location: str, model_id: str, model_version: str, classes: Sequence[str]) -> None:
    fs, out_dir = open_fs(location)
    fs.create_dir(out_dir, recursive=True)
    state = {"schema_version": SCHEMA_VERSION, "model_id": model_id, "model_version": model_version,
             "classes": list(classes), "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_bytes_atomic(fs, f"{out_dir}/{STATE_FILE}", (json.dumps(state, indent=2) + "\n").encode())


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


class PartWriter:
    """Buffers result rows and writes them as Parquet parts that appear atomically.

    A part is written to ``results/_tmp/`` and renamed into ``results/`` when
    complete, so a reader (or a rerun after SIGKILL) never sees half a part;
    rows still in the buffer when the process dies are simply scored again.
    """

    def __init__(self, location: str, schema: pa.Schema, part_rows: int = 256, part_seconds: float = 10.0) -> None:
        self.fs, self.out_dir = open_fs(location)
        self.schema = schema
        self.part_rows = max(1, part_rows)
        self.part_seconds = part_seconds
        self.run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.results = f"{self.out_dir}/{RESULTS_DIR}"
        self.tmp = f"{self.results}/{TMP_DIR}"
        self.fs.create_dir(self.tmp, recursive=True)
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.seq = 0
        self.rows_written = 0
        self.last_flush = time.monotonic()
        self.paths: list[str] = []

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.buffer.append(table.select(self.schema.names).cast(self.schema))
            self.buffered += table.num_rows
        if self.buffered >= self.part_rows or (self.buffered and time.monotonic() - self.last_flush >= self.part_seconds):
            self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        table = pa.concat_tables(self.buffer)
        name = f"part-{self.run_id}-{self.seq:05d}.parquet"
        tmp, final = f"{self.tmp}/{name}", f"{self.results}/{name}"
        pq.write_table(table, tmp, filesystem=self.fs, compression="zstd")
        self.fs.move(tmp, final)
        self.paths.append(final)
        self.seq += 1
        self.rows_written += table.num_rows
        self.buffer, self.buffered, self.last_flush = [], 0, time.monotonic()

    def close(self) -> None:
        """Flush, then remove the scratch folder (empty unless a part is being written)."""
        self.flush()
        with contextlib.suppress(OSError):
            if not self.fs.get_file_info(pafs.FileSelector(self.tmp, allow_not_found=True)):
                self.fs.delete_dir(self.tmp)


def clean_tmp(location: str) -> None:
    """Remove parts left half-written by a killed run."""
    fs, out_dir = open_fs(location)
    tmp = f"{out_dir}/{RESULTS_DIR}/{TMP_DIR}"
    if fs.get_file_info(tmp).type == pafs.FileType.Directory:
        fs.delete_dir_contents(tmp, missing_dir_ok=True)


def set_aside_results(location: str, owner: str) -> str:
    """``--force`` onto another model's folder: move its results, report and stat records out of the way,
    not delete them.

    They go to ``OUTPUT/replaced/<model id>-<UTC time>/`` (file by file: object stores move no folders),
    where no reader looks; the user deletes them when sure. Returns that folder.
    """
    fs, out_dir = open_fs(location)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = f"{out_dir}/{REPLACED_DIR}/{owner[:12]}-{stamp}"
    for sub in (RESULTS_DIR, REPORT_DIR, STATS_DIR):
        src = f"{out_dir}/{sub}"
        for info in fs.get_file_info(pafs.FileSelector(src, recursive=True, allow_not_found=True)):
            if info.type != pafs.FileType.File:
                continue
            dst = f"{target}/{sub}/{info.path[len(src) + 1:]}"
            fs.create_dir(str(PurePosixPath(dst).parent), recursive=True)
            fs.move(info.path, dst)
        if fs.get_file_info(src).type == pafs.FileType.Directory:
            fs.delete_dir(src)  # now empty folders only
    return target


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class InputFile:
    path: str  # user-facing path (absolute local path or full URI)
    fs_path: str  # path inside the filesystem
    size: int
    mtime_ns: int | None = None  # None: unknown, or too recent to trust (SETTLED_NS)


def _matches(rel: str, pattern: str) -> bool:
    """``--glob``: a pattern without '/' matches the file name, otherwise the path under the archive."""
    if "/" not in pattern:
        return fnmatch.fnmatchcase(PurePosixPath(rel).name, pattern)
    return fnmatch.fnmatchcase(rel, pattern) or fnmatch.fnmatchcase(rel, pattern.replace("**/", ""))


class Listing(NamedTuple):
    files: list[InputFile]
    fs: pafs.FileSystem
    not_images: int  # files that are not images by name or content (notes, manifests)
    unnamed: int  # files whose names are not UTF-8: no row could name them, so they are counted and warned of
    hidden: int = 0  # files and folders whose names start with '.' (left out, counted; see _hidden)
    unlisted: tuple[str, ...] = ()  # folders under the archive that could not be listed ("path: reason")


def list_archive(archive: str, glob: str | None = None, limit: int | None = None,
                 exclude: Iterable[str] = ()) -> Listing:
    """Input files under ``archive`` (local folder, single file or pyarrow URI), sorted by path.

    A file is an input when its name has an image suffix, or when its first
    bytes are an image (``cxr.preprocess.detect_format``: e.g. DICOM without an
    extension). Other files (notes, manifests) are ignored and counted, as are
    files whose names are not UTF-8. ``--limit`` keeps the first N inputs of the sorted listing.
    """
    fs, root = open_fs(archive)
    prefix = uri_prefix(archive)
    listed_ns = time.time_ns()
    try:
        info = fs.get_file_info(root)
    except Exception as exc:  # noqa: BLE001
        raise CxrError(f"cannot access archive {archive}: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        raise CxrError(f"archive not found: {archive}")
    base = root
    try:
        hidden, unlisted = 0, []
        if info.type == pafs.FileType.File:  # named by the user: screened whatever its name
            named, unnamed = _decodable([info])
            base = str(PurePosixPath(root).parent)
        elif isinstance(fs, pafs.LocalFileSystem):
            named, unnamed, hidden, unlisted = _walk_local(root, skip=exclude)
        else:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
            named, unnamed = _decodable(i for i in infos if i.type == pafs.FileType.File)
            visible = [i for i in named if not any(map(_hidden, i.path[len(root):].split("/")))]
            named, hidden = visible, len(named) - len(visible)
    except CxrError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CxrError(f"cannot list archive {archive}: {exc}") from None
    glob = _relative_glob(glob, base)
    excluded = [e.rstrip("/") + "/" for e in exclude]
    candidates = [fi for fi in sorted(named, key=lambda i: i.path)
                  if not any(fi.path.startswith(e) for e in excluded)
                  and not (glob and not _matches(fi.path[len(base):].lstrip("/"), glob))]
    files: list[InputFile] = []
    ignored = 0
    for fi, is_input in _inputs_by_content(fs, candidates):
        if not is_input:
            ignored += 1
            continue
        mtime = fi.mtime_ns
        settled = mtime if mtime is not None and mtime < listed_ns - SETTLED_NS else None
        files.append(InputFile(path=prefix + fi.path, fs_path=fi.path, size=int(fi.size or 0), mtime_ns=settled))
        if limit is not None and len(files) >= limit:
            break
    return Listing(files, fs, ignored, unnamed, hidden, tuple(unlisted))


# threads reading the first bytes of files without an image suffix: latency-bound on an object store; on a
# local or NFS mount more than a few contend for the GIL (30,000 such files, cold page cache: 3.1-4.0 s in
# one thread, 1.6-1.8 s in 4, 2.6-2.7 s in 16)
SNIFF_THREADS = {"local": 4, "remote": 16}
_SNIFF_WINDOW = 1024  # files decided at a time, so --limit stops the reads soon after its N inputs


def _inputs_by_content(fs: pafs.FileSystem, infos: Sequence[pafs.FileInfo]) -> Iterator[tuple[pafs.FileInfo, bool]]:
    """(file, whether it is an input), in order: a name with an image suffix is one; any other file is
    one when its first bytes are an image's (``cxr.preprocess.detect_format``; DICOMs named by UID, such as
    1.2.840.113619.2.55.3, have no image suffix). Those reads run in threads: one at a time, a million such
    files at ~1 ms an open (NFS) would take ~17 min of every night's listing, and ~6 h at ~20 ms (S3)."""
    from concurrent.futures import ThreadPoolExecutor

    def sniff(fi: pafs.FileInfo) -> bool:
        from cxr.preprocess import detect_format  # here: PIL only for odd names (the import lock serialises it)

        try:
            with fs.open_input_file(fi.path) as f:
                head = f.read(_SNIFF_BYTES)
        except Exception:  # noqa: BLE001 - unreadable: an input all the same, the job reports read_failed
            return True
        return detect_format(head) is not None

    threads = SNIFF_THREADS["local" if isinstance(fs, pafs.LocalFileSystem) else "remote"]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(infos), _SNIFF_WINDOW):
            window = infos[start:start + _SNIFF_WINDOW]
            odd = [fi for fi in window if os.path.splitext(fi.base_name)[1].lower() not in IMAGE_SUFFIXES]
            # one task per thread, each a slice of the window: a future per file cost more than a warm read
            slices = [odd[i::threads] for i in range(min(threads, len(odd)))]
            verdict = {fi.path: ok for part, oks in zip(slices, pool.map(lambda part: [sniff(fi) for fi in part], slices))
                       for fi, ok in zip(part, oks)}
            for fi in window:
                yield fi, verdict.get(fi.path, True)


def _hidden(name: str) -> bool:
    """A name starting with '.': a transfer in flight (rsync's .name.XXXXXX), a trash or snapshot folder
    (.Trash, .snapshot), editor and OS litter. Left out of the inputs, as Spark and Arrow's dataset
    discovery do: a temporary file would otherwise leave a truncated row under a name that never returns."""
    return name.startswith(".")


def _walk_local(root: str, skip: Iterable[str] = ()) -> tuple[list[pafs.FileInfo], int, int, list[str]]:
    """Every regular file under a local folder, following directory symlinks once.

    Arrow's recursive listing follows a symlink to a parent folder until the path is too long
    (40 levels: every image scored 40 times; two such links: 2^40 paths). Here a symlinked folder
    is walked only if it leads outside the archive, and no real folder is walked twice, so each
    file is listed under its own path, and ``skip`` (the output folder) is left out by where it
    really is, whatever link leads to it. Dangling links, sockets and FIFOs are not files.
    Names that are not UTF-8 (os.walk's surrogate escapes) are counted, not listed, as in
    :func:`_decodable`; so are hidden files and folders (:func:`_hidden`; a folder counts once, unwalked).
    A folder under the root that cannot be listed (no permission, an I/O error) is returned ("path: reason")
    and the walk goes on: one bad study folder must not hold back the night's others (its files get no rows
    and are listed again next run); the root itself unreadable is an error.
    """
    import stat

    root_real = os.path.realpath(root)
    seen: set[str] = {root_real, *(os.path.realpath(p) for p in skip)}
    out: list[pafs.FileInfo] = []
    unlisted: list[str] = []
    bad = hidden = 0

    def unreadable(exc: OSError) -> None:  # os.walk would skip the folder silently: its files would get no rows
        if isinstance(exc, (FileNotFoundError, NotADirectoryError)):  # moved or deleted since its parent was listed
            return
        if os.path.realpath(str(exc.filename)) == root_real:
            raise CxrError(f"cannot list {exc.filename}: {exc.strerror or exc}")
        unlisted.append(f"{exc.filename}: {exc.strerror or exc}")

    for folder, dirs, names in os.walk(root, onerror=unreadable, followlinks=True):
        keep = []
        hidden += sum(1 for n in names if _hidden(n))
        names = [n for n in names if not _hidden(n)]
        for d in sorted(dirs):
            if _hidden(d):
                hidden += 1
                continue
            full = os.path.join(folder, d)
            real = os.path.realpath(full)
            inside = real == root_real or real.startswith(root_real + "/")
            if (os.path.islink(full) and inside) or real in seen or root_real.startswith(real + "/"):
                continue  # a second view of folders listed at their own place, or a loop
            seen.add(real)
            keep.append(d)
        dirs[:] = keep
        for name in names:
            full = os.path.join(folder, name)
            try:
                st: os.stat_result | None = os.stat(full)
            except (FileNotFoundError, NotADirectoryError):  # a dangling link, or deleted since listed
                continue
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # a link to itself
                    continue
                st = None  # listed, not stat-able (its folder lacks execute permission): an input all the same,
                #            whose read gives a read_failed row rather than no row
            if st is not None and not stat.S_ISREG(st.st_mode):
                continue
            try:
                full.encode("utf-8")
            except UnicodeEncodeError:
                bad += 1
                continue
            out.append(pafs.FileInfo(full, type=pafs.FileType.File, size=st.st_size, mtime_ns=st.st_mtime_ns)
                       if st is not None else pafs.FileInfo(full, type=pafs.FileType.File, size=0))
    _warn_undecodable(bad)
    return out, bad, hidden, unlisted


def _relative_glob(glob: str | None, base: str) -> str | None:
    """``--glob`` as a pattern under the archive: './x/*' and '/archive/x/*' mean 'x/*'."""
    if not glob:
        return glob
    if glob.startswith("/"):
        if not glob.startswith(base.rstrip("/") + "/"):
            raise CxrError(f"--glob {glob} is an absolute path outside the archive {base}; "
                           "give a pattern under the archive, e.g. 'subfolder/*.dcm'")
        return glob[len(base.rstrip("/")) + 1:]
    return glob.removeprefix("./")


def _decodable(infos: Iterable[pafs.FileInfo]) -> tuple[list[pafs.FileInfo], int]:
    """The files whose names are text, and how many are not (bytes that are not UTF-8).

    Arrow cannot name such a file (``FileInfo.path`` raises), so it cannot be read or
    given a row; it is counted (``Listing.unnamed``) and named in one warning instead
    of ending the listing with a traceback.
    """
    ok: list[pafs.FileInfo] = []
    bad = 0
    for info in infos:
        try:
            info.path
        except UnicodeDecodeError:
            bad += 1
            continue
        ok.append(info)
    _warn_undecodable(bad)
    return ok, bad


def _warn_undecodable(count: int) -> None:
    if count:
        import logging

        logging.getLogger("cxr").warning(
            "warning: %d file name(s) in the archive are not valid UTF-8 and were skipped; rename them to screen them",
            count)


# --------------------------------------------------------------------------- labels


@dataclass
class LabelIndex:
    """Ground truth for result rows: a manifest's, by path then by content hash; else the label a
    row already holds; else, while screening, the archive's NORMAL/PNEUMONIA folder names."""

    by_path: dict[str, str] = field(default_factory=dict)
    by_sha: dict[str, str] = field(default_factory=dict)
    #: folder labels are read below this folder (its own name included) and nowhere else, so a bucket
    #: or a parent folder that happens to be called "normal" labels nothing; None: no folder labels
    folder_root: str | None = None

    def lookup(self, path: str, sha256: str | None) -> str | None:
        """The manifest's label, else the folder's (under ``folder_root``), else None."""
        return self.from_manifest(path, sha256) or self.from_folder(path)

    def from_manifest(self, path: str, sha256: str | None) -> str | None:
        if path in self.by_path:
            return self.by_path[path]
        return self.by_sha.get(sha256) if sha256 else None

    def from_folder(self, path: str) -> str | None:
        root = self.folder_root
        if root is None or not path.startswith(root.rstrip("/") + "/"):
            return None
        return label_from_path(PurePosixPath(root).name + path[len(root.rstrip("/")):])

    def apply(self, table: pa.Table) -> pa.Table:
        """Fill ``true_label``: the manifest wins, then a label the row already has, then the folder name."""
        paths = table.column("path").to_pylist()
        shas = table.column("sha256").to_pylist()
        old = table.column("true_label").to_pylist() if "true_label" in table.column_names else [None] * len(paths)
        new = [self.from_manifest(p, s) or o or self.from_folder(p) for p, s, o in zip(paths, shas, old)]
        idx = table.schema.get_field_index("true_label")
        col = pa.array(new, pa.string())
        return table.set_column(idx, "true_label", col) if idx >= 0 else table.append_column("true_label", col)

    def manifest_rows(self, table: pa.Table) -> int:
        """How many rows the manifest labels (by path or content): 0 usually means paths that do not match."""
        shas = table.column("sha256").to_pylist()
        return sum(self.from_manifest(p, s) is not None for p, s in zip(table.column("path").to_pylist(), shas))


def load_labels(manifest: str | None, classes: Sequence[str] = ("normal", "pneumonia"),
                folder_root: str | None = None) -> LabelIndex:
    """Labels from a manifest (CSV/Parquet: path,label[,subtype,sha256]; paths relative to it).

    For a subtype model (classes include bacteria/virus) the manifest's subtype
    is the true label, so it is comparable with the predicted ``label``.
    ``folder_root`` (the archive being screened) also allows labels from folder names under it.
    """
    index = LabelIndex(folder_root=folder_root)
    if not manifest:
        return index
    path = Path(os.path.expanduser(manifest))
    if not path.is_file():
        raise CxrError(f"labels manifest not found: {manifest}")
    rows = read_manifest_rows(path)
    subtype_model = "bacteria" in classes or "virus" in classes
    for i, row in enumerate(rows):
        if not (row["label"] or "").strip():  # a blank cell: this file's truth is not known (yet)
            continue
        label = normalise_label(row["label"], f"{manifest}:{i + 2}")
        subtype = (row.get("subtype") or "").strip().lower()
        if subtype_model and subtype in classes:  # "unknown" or a misspelling keeps the binary label
            label = subtype
        index.by_path[manifest_entry_path(path, row["path"])] = label
        if row.get("sha256"):
            index.by_sha[row["sha256"].strip().lower()] = label
    return index


# --------------------------------------------------------------------------- summary and metrics


def summarize_counts(processed: int, errors_by_code: Mapping[str, int], labelled: int, positives: int,
                     candidates: int, ignored: int, duration_s: float, model_id: str,
                     model_version: str, unnamed: int = 0, hidden: int = 0,
                     unlisted: Sequence[str] = ()) -> dict[str, Any]:
    """Figures of one run: scored now, skipped as already done, errors by code, throughput.

    ``processed`` rows were written by this run (scored + errors); every other
    input file was skipped because this model had already scored its content.
    """
    errors = sum(errors_by_code.values())
    return {
        "files": candidates,
        "processed": processed,
        "scored": processed - errors,
        "skipped": max(0, candidates - processed),
        "errors": errors,
        "errors_by_code": dict(sorted(errors_by_code.items())),
        "ignored_non_images": ignored,
        "unnamed_files": unnamed,
        "hidden_entries": hidden,
        "unlisted_folders": list(unlisted),
        "positives": positives,
        "positive_rate": positives / labelled if labelled else 0.0,
        "duration_s": round(duration_s, 3),
        "images_per_s": round(processed / duration_s, 2) if duration_s > 0 else 0.0,
        "model_id": model_id,
        "model_version": model_version,
    }


def format_summary(s: Mapping[str, Any]) -> str:
    errs = ", ".join(f"{k}={v}" for k, v in s["errors_by_code"].items()) or "none"
    lines = [
        f"files: {s['files']}  scored: {s['scored']}  skipped (already done): {s['skipped']}  errors: {s['errors']} ({errs})",
        (f"positives: {s['positives']} ({s['positive_rate']:.1%} of scored)  " if s["scored"] else "positives: n/a  ")
        + f"time: {s['duration_s']:.1f} s  "
        + (f"throughput: {s['images_per_s']:.1f} images/s" if s["processed"] else "nothing new to score"),
        f"model: {s['model_version'] or '-'} {s['model_id'][:12]}",
    ]
    if s.get("ignored_non_images"):
        lines.append(f"ignored (not images by name or content): {s['ignored_non_images']}")
    if s.get("hidden_entries"):
        lines.append(f"left out (hidden: names starting with '.'): {s['hidden_entries']} file(s)/folder(s)")
    if s.get("unnamed_files"):
        lines.append(f"NOT SCREENED: {s['unnamed_files']} file(s) whose names are not valid UTF-8; rename them")
    if s.get("unlisted_folders"):
        shown = "; ".join(s["unlisted_folders"][:3]) + (" ..." if len(s["unlisted_folders"]) > 3 else "")
        lines.append(f"NOT SCREENED: {len(s['unlisted_folders'])} folder(s) could not be listed, their files "
                     f"have no rows (listed again next run): {shown}")
    return "\n".join(lines)


def metrics_registry(s: Mapping[str, Any], success: bool = True):
    """The run's figures as Prometheus gauges in their own registry (textfile collector / Pushgateway)."""
    from prometheus_client import CollectorRegistry, Gauge

    reg = CollectorRegistry()
    mid = {"model_id": s["model_id"], "model_version": s.get("model_version") or ""}
    Gauge("cxr_screen_model_info", "Model that produced the results (value always 1)", list(mid), registry=reg).labels(**mid).set(1)
    Gauge("cxr_screen_files", "Input files found in the archive", registry=reg).set(s["files"])
    Gauge("cxr_screen_scored_files", "Files scored by this run", registry=reg).set(s["scored"])
    Gauge("cxr_screen_skipped_files", "Files skipped as already scored by this model", registry=reg).set(s["skipped"])
    err = Gauge("cxr_screen_error_files", "Files that could not be scored, by error code", ["code"], registry=reg)
    from cxr.errors import ImageError

    for code in ImageError.CODES:
        err.labels(code=code).set(s["errors_by_code"].get(code, 0))
    Gauge("cxr_screen_ignored_files", "Files under the archive that are not images (by name and content)",
          registry=reg).set(s.get("ignored_non_images", 0))
    Gauge("cxr_screen_unnamed_files", "Files not screened because their names are not valid UTF-8",
          registry=reg).set(s.get("unnamed_files", 0))
    Gauge("cxr_screen_hidden_entries", "Hidden files and folders (names starting with '.') left out of the inputs",
          registry=reg).set(s.get("hidden_entries", 0))
    Gauge("cxr_screen_unlisted_folders", "Folders under the archive that could not be listed (not screened)",
          registry=reg).set(len(s.get("unlisted_folders", ())))
    # rates of a run that scored nothing are not 0 but unknown: left out, so a quiet night is a gap in a
    # panel, not a collapse to zero
    if s["scored"]:
        Gauge("cxr_screen_positive_rate", "Fraction of scored files predicted positive",
              registry=reg).set(s["positive_rate"])
    if s["processed"]:
        Gauge("cxr_screen_images_per_second", "Files processed per second of wall time (Ray's start included)",
              registry=reg).set(s["images_per_s"])
    Gauge("cxr_screen_duration_seconds", "Wall time of the run", registry=reg).set(s["duration_s"])
    return _outcome(reg, success)


def failure_metrics_registry():
    """What a run that failed before its summary exports: that it failed, and when. It is pushed and written
    *over* the last run's figures (:func:`push_metrics`, :func:`write_metrics_file` with ``merge``), so the
    last success's time and figures stay visible beside ``cxr_screen_success 0``."""
    from prometheus_client import CollectorRegistry

    return _outcome(CollectorRegistry(), success=False)


def _outcome(reg: Any, success: bool) -> Any:
    from prometheus_client import Gauge

    now = time.time()
    Gauge("cxr_screen_last_run_timestamp_seconds", "Unix time the run finished, failed or not", registry=reg).set(now)
    Gauge("cxr_screen_success", "1 if the run completed (and passed --fail-on-error)", registry=reg).set(1 if success else 0)
    if success:  # what a staleness alert needs: a job failing every night keeps the line above fresh
        Gauge("cxr_screen_last_success_timestamp_seconds", "Unix time of the last run that succeeded",
              registry=reg).set(now)
    return reg


def write_metrics_file(registry: Any, path: str, merge: bool = False) -> None:
    """Prometheus text format, written atomically (node_exporter may read it at any time). ``merge`` keeps
    the file's other metrics (a failed run's two lines over the last success's figures, as a Pushgateway
    POST does)."""
    from prometheus_client import write_to_textfile

    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    if merge and target.is_file() and target.stat().st_size < 2**20:  # ours is a few KB; a bigger one is not ours
        registry.register(_Kept(target.read_text(errors="replace"), {m.name for m in registry.collect()}))
    write_to_textfile(str(target), registry)  # writes a temp file and renames it


class _Kept:
    """A prometheus-client collector of the cxr_screen_* families of an earlier text-format file, less
    ``replaced`` (another exporter's lines, or a family twice, are not carried over)."""

    def __init__(self, text: str, replaced: set[str]) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        families: dict[str, Any] = {}
        try:
            for m in text_string_to_metric_families(text):
                if m.name.startswith("cxr_screen_") and m.name not in replaced:
                    families.setdefault(m.name, m)
        except ValueError:  # damaged: the new lines alone
            families = {}
        self.families = list(families.values())

    def collect(self) -> list[Any]:
        return self.families


#: seconds before each retry of a Pushgateway push: a night's figures outlive a brief outage
PUSH_RETRY_DELAYS = (2.0, 8.0)


def push_metrics(registry: Any, url: str, job: str = "cxr_screen", replace: bool = True,
                 retry_delays: Sequence[float] = PUSH_RETRY_DELAYS) -> None:
    """Push to a Pushgateway, retried after ``retry_delays``. ``replace`` (PUT) swaps the job's whole group
    for these figures; otherwise (POST) only the metrics of the same names are replaced, as for a failed run."""
    from prometheus_client import push_to_gateway, pushadd_to_gateway

    push = push_to_gateway if replace else pushadd_to_gateway
    for delay in (*retry_delays, None):
        try:
            push(url, job=job, registry=registry, timeout=10)
            return
        except Exception as exc:  # noqa: BLE001 - URLError, HTTPError, OSError
            if delay is None or (getattr(exc, "code", 500) or 500) < 500:  # a 4xx will not mend by waiting
                raise CxrError(f"cannot push metrics to the Pushgateway at {url}: {exc}") from None
            time.sleep(delay)


@dataclass
class RunStats:
    """Counts over the rows this run wrote (kept incrementally: memory stays flat)."""

    rows: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)
    labelled: int = 0
    positives: int = 0

    def add(self, table: pa.Table, normal: str) -> None:
        self.rows += table.num_rows
        for code in table.column("error_code").to_pylist():
            if code:
                self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1
        for lab in table.column("label").to_pylist():
            if lab:
                self.labelled += 1
                self.positives += lab != normal

    @property
    def errors(self) -> int:
        return sum(self.errors_by_code.values())


@dataclass
class Topology:
    actors: int
    threads: int
    actor_cpus: float
    actor_gpus: float
    task_cpus: float


BLOCKS_TARGET = 1000  # past this, Ray Data's per-block cost (~12 ms each on 2 cores) outweighs finer streaming
BLOCK_IMAGE_BYTES = 64 * 2**20  # the decoded float32 images one read block may hold


def files_per_block(files: int, batch: int, image_size: int) -> int:
    """How many files one read-and-decode task takes: the engine's batch for up to ``BLOCKS_TARGET`` batches,
    so a small job streams its first batch to the actors at once; then more per block, up to what keeps a
    block's decoded images under ``BLOCK_IMAGE_BYTES``. At 16 files a block, a million-file night had 62,500
    blocks, at ~12 ms of Ray Data's overhead each (bench/read_blocks.py, 100,000 files: 80.4 s in 6,250
    blocks against 12.0 s in 1,000; BENCHMARKS.md)."""
    by_memory = max(1, BLOCK_IMAGE_BYTES // (4 * image_size * image_size))
    return max(batch, min(by_memory, math.ceil(files / BLOCKS_TARGET)))


def plan_topology(cfg: ScreenConfig, cluster_cpus: float, cluster_gpus: float,
                  autoscaling: bool = False) -> Topology:
    """How many inference actors, engine threads each, and the logical CPUs Ray reserves.

    CPU: actors x threads ~= the CPUs, keeping ~10 % (at least half a CPU) for the
    decode tasks, which cost ~1/20 of a ResNet-50 forward pass. One thread per
    actor scales best on small machines (2 x 1-thread bf16 actors: 2 x 20 img/s
    vs 34 for one 2-thread process; BENCHMARKS.md), so the default is one actor per CPU.
    GPU: one actor per ``--gpus-per-worker`` share of the GPUs.

    Without ``--workers`` the pool fits the cluster as it is when the job starts. With it, on a
    running cluster (``autoscaling``), every actor reserves its whole share (``--threads-per-worker``
    CPUs when given, or its GPUs) even beyond what the nodes have now: the actors that do not fit
    wait, and Ray's autoscaler adds the nodes they ask for, while the job starts on the first actor
    that does. Threads derived from today's CPUs mean "fit what is up", so they are squeezed as locally.
    """
    cpus = max(1.0, cluster_cpus)
    grow = bool(cfg.workers and autoscaling)  # ask for --workers full shares: the autoscaler adds the nodes
    if cfg.gpus_per_worker > 0:
        if not grow and cluster_gpus < cfg.gpus_per_worker:
            hint = "; on an autoscaling cluster, --workers N asks for N GPU actors and the nodes for them" \
                if autoscaling else ""
            raise CxrError(f"--gpus-per-worker {cfg.gpus_per_worker} but the Ray cluster has {cluster_gpus:g} GPUs{hint}")
        actors = cfg.workers or max(1, int(cluster_gpus // cfg.gpus_per_worker))
        threads = cfg.threads_per_worker or 1
        return Topology(actors, threads, 1.0 if cpus >= actors + 1 or grow else 0.5, cfg.gpus_per_worker, 0.5)
    reserve = max(0.5, 0.1 * cpus)
    if cfg.workers:
        actors = cfg.workers
        threads = cfg.threads_per_worker or max(1, int(cpus // actors))
    else:
        threads = cfg.threads_per_worker or 1
        actors = max(1, int(cpus // threads))
    if grow and cfg.threads_per_worker:
        actor_cpus = float(threads)  # not squeezed onto today's nodes: what does not fit scales the cluster out
    else:
        actor_cpus = max(0.1, min(float(threads), (cpus - reserve) / actors))
    return Topology(actors, threads, round(actor_cpus, 3), 0.0, 0.5)

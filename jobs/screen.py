"""The screening job: an archive of X-rays -> Parquet, on Ray Data.

Pipeline (streaming; Ray Data's backpressure keeps memory bounded)::

    listing (driver)                  pyarrow.fs: local folder or URI, sorted, --glob/--limit
      -> from_items                   path + size only (a few hundred bytes per file)
      -> map_batches(prepare)         CPU tasks: read bytes, sha256, drop rows already done,
                                      decode + preprocess with cxr.preprocess.preprocess
      -> map_batches(Scorer)          actor pool: cxr.engine.load_engine once per actor,
                                      batched predict_proba, cxr.metrics.decide
      -> iter_batches (driver)        labels joined, PartWriter: atomic Parquet parts

Reads, decode and hashing are fused into one task per block so raw bytes never
enter the object store; only the preprocessed tensors travel to the actors.
Writing happens in the driver because result rows are tiny and it gives us
exact progress, atomic parts and a run summary without another pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from cxr import screening as S
from cxr.config import PreprocessConfig, ScreenConfig
from cxr.errors import CxrError, interrupt_on_termination, termination_as_interrupt
from cxr.storage import child_uri, exclusive, open_fs, uri_prefix, writable_folder

if TYPE_CHECKING:  # the decode workers need no model code
    from cxr.export import ModelMetadata

ProgressFn = Callable[["Progress"], None]


@dataclass
class Progress:
    done: int
    total: int
    errors: int
    elapsed_s: float
    stage: str = ""  # before the first rows land: what the run is waiting for (Ray, the actors)

    @property
    def rate(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0


# --------------------------------------------------------------------------- worker side


def _open(fs: pafs.FileSystem | None, fs_path: str) -> Any:
    # local: plain open() is the fastest path and handles any file name
    return open(fs_path, "rb") if fs is None else fs.open_input_file(fs_path)


def _read(fs: pafs.FileSystem | None, fs_path: str) -> bytes:
    with _open(fs, fs_path) as f:
        return f.read()


def _sha256_in_chunks(fs: pafs.FileSystem | None, fs_path: str) -> str:
    with _open(fs, fs_path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def prepare(batch: dict[str, np.ndarray], *, fs: pafs.FileSystem | None, pre: dict[str, Any],
            done: Any) -> dict[str, np.ndarray] | pa.Table:
    """Read, hash and preprocess one block of files (a Ray Data CPU task).

    Rows whose (path, sha256) this model already scored are dropped here, before
    the expensive decode. Unusable inputs become error rows (typed code) with a
    zero tensor, so the actor stage sees a fixed-shape column and the job never
    fails because of one file. A file over the size cap is hashed in chunks and
    refused without being read into memory, so a stray multi-GB file cannot take
    the decode worker (and with it the run) down.
    """
    import ray

    from cxr.errors import ImageError
    from cxr.preprocess import image_size_of, max_file_bytes, preprocess

    cfg = PreprocessConfig(**pre)
    keys = ray.get(done) if isinstance(done, ray.ObjectRef) else done
    size = cfg.image_size
    cap = max_file_bytes(cfg.max_pixels)
    out: dict[str, list[Any]] = {k: [] for k in ("path", "size_bytes", "mtime_ns", "sha256", "width", "height",
                                                 "error_code", "error")}
    images: list[np.ndarray] = []

    def add(path: str, nbytes: int, mtime: int, sha: str, width: int, height: int, code: str, msg: str,
            tensor: np.ndarray | None) -> None:
        for column, value in zip(out, (path, nbytes, mtime, sha, width, height, code, msg), strict=True):
            out[column].append(value)
        images.append(tensor if tensor is not None else np.zeros((1, size, size), np.float32))

    for path, fs_path, nbytes, mtime in zip(batch["path"], batch["fs_path"], batch["size"], batch["mtime_ns"]):
        path, fs_path = str(path), str(fs_path)
        code, msg, sha, width, height = "", "", "", -1, -1
        tensor, data = None, None
        try:
            if int(nbytes) > cap:
                sha = _sha256_in_chunks(fs, fs_path)
                code, msg = "too_large", f"file is {int(nbytes)} bytes, over the cap of {cap} bytes for one image"
            else:
                data = _read(fs, fs_path)
                if len(data) != int(nbytes):  # changed since listed: the listing's mtime does not vouch for these bytes
                    mtime = -1
                sha, nbytes = hashlib.sha256(data).hexdigest(), len(data)
        except OSError as exc:
            code, msg = "read_failed", f"cannot read file: {exc}"
        except MemoryError:
            code, msg = "out_of_memory", f"ran out of memory reading the file ({int(nbytes)} bytes)"
        if sha and keys is not None and S.is_done(keys, S.resume_key(path, sha)):
            continue
        if data is not None:
            try:
                tensor = preprocess(data, cfg)
            except ImageError as exc:
                code, msg = exc.code, str(exc)
            except Exception as exc:  # noqa: BLE001 - a decoder bug must not kill the job
                code, msg = "corrupt", f"decoding failed: {type(exc).__name__}: {exc}"
            wh = image_size_of(data) if data else None
            if wh:
                width, height = wh
        add(path, int(nbytes), int(mtime), sha, width, height, code, msg, tensor)
    skipped_all = not images
    if skipped_all:  # a 0-row 4-D array has no Arrow tensor type (Ray Data would pickle it, with a warning):
        add("", 0, -1, "", -1, -1, "", "", None)  # type the block from one placeholder row, then drop the row
    result: dict[str, np.ndarray] = {
        "path": np.array(out["path"], dtype=object),
        "size_bytes": np.array(out["size_bytes"], dtype=np.int64),
        "mtime_ns": np.array(out["mtime_ns"], dtype=np.int64),
        "sha256": np.array(out["sha256"], dtype=object),
        "width": np.array(out["width"], dtype=np.int64),
        "height": np.array(out["height"], dtype=np.int64),
        "error_code": np.array(out["error_code"], dtype=object),
        "error": np.array(out["error"], dtype=object),
        "image": np.stack(images),
    }
    if skipped_all:
        from ray.data.block import BlockAccessor

        return BlockAccessor.batch_to_block(result).slice(0, 0)
    return result


class Scorer:
    """One inference actor: the engine is loaded once, then scores batches of tensors."""

    def __init__(self, model_dir: str, backend: str, threads: int, gpu: bool = False) -> None:
        from cxr.engine import load_engine

        self.engine = load_engine(model_dir, backend, threads=threads, gpu=gpu)
        meta = self.engine.meta
        self.classes = list(meta.classes)
        self.threshold = float(meta.threshold)
        self.model_id = meta.model_id
        self.model_version = meta.model_version

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = np.array([not c for c in batch["error_code"]], dtype=bool)
        n = ok.size
        probs = np.zeros((n, len(self.classes)), np.float32)
        if ok.any():
            probs[ok] = self.engine.predict_proba(batch["image"][ok])
        base = {k: batch[k] for k in ("path", "size_bytes", "mtime_ns", "sha256", "width", "height", "error_code",
                                      "error")}
        lost = ok & ~np.isfinite(probs).all(axis=1)
        if lost.any():  # never label a NaN: an error row says what happened instead
            ok &= ~lost
            base["error_code"] = np.where(lost, "corrupt", base["error_code"]).astype(object)
            base["error"] = np.where(lost, "the model gave non-finite probabilities for this image",
                                     base["error"]).astype(object)
        return S.build_rows(base, probs, ok, self.classes, self.threshold, self.model_id, self.model_version,
                            scored_at=datetime.now(timezone.utc))


# --------------------------------------------------------------------------- driver side


def _model_of_part(fs: pafs.FileSystem, part: str) -> str | None:
    """The model that wrote a result part (a folder whose state file was lost still has an owner)."""
    import pyarrow.parquet as pq

    col = pq.read_table(part, filesystem=fs, columns=["model_id"]).column("model_id")
    return col[0].as_py() if len(col) else None


def _label_root(archive: str, fs: pafs.FileSystem, root: str) -> str:
    """The folder whose NORMAL/PNEUMONIA names label the rows: the archive (a single file's own folder)."""
    try:
        is_file = fs.get_file_info(root).type == pafs.FileType.File
    except Exception:  # noqa: BLE001 - list_archive reports an unreachable archive
        is_file = False
    return uri_prefix(archive) + (str(PurePosixPath(root).parent) if is_file else root)


def run_screen(cfg: ScreenConfig, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Score ``cfg.archive`` into ``cfg.output``; returns the run summary (cxr.screening.summarize_counts).

    SIGTERM and SIGHUP stop it as Ctrl-C does (what was scored is flushed) from its first step, listing
    included; the caller's handlers are back when it returns."""
    with termination_as_interrupt():
        return _run_screen(cfg, on_progress)


def _run_screen(cfg: ScreenConfig, on_progress: ProgressFn | None) -> dict[str, Any]:
    from cxr.export import check_export

    t0 = time.perf_counter()
    meta = check_export(cfg.model, cfg.engine)
    classes = list(meta.classes)
    out_fs, out_dir = open_fs(cfg.output)
    arch_fs, arch_root = open_fs(cfg.archive)
    labels = S.load_labels(cfg.labels, classes, folder_root=_label_root(cfg.archive, arch_fs, arch_root))
    same_fs = type(out_fs) is type(arch_fs)
    if same_fs and (arch_root == out_dir or arch_root.startswith(out_dir.rstrip("/") + "/")):
        raise CxrError(f"--output {cfg.output} is the archive or holds it; give a folder outside the archive "
                       "(a folder inside it is fine: it is left out of the inputs)")
    files, fs, ignored, unnamed, hidden, unlisted = S.list_archive(cfg.archive, cfg.glob, cfg.limit,
                                                                   exclude=[out_dir] if same_fs else [])
    for folder in unlisted:
        print(f"warning: cannot list {folder}: its files are not screened this run", file=sys.stderr)
    if not files:  # an unmounted share looks like an empty folder: a quiet night must not look like this
        where = f"{cfg.archive}" + (f" matching --glob {cfg.glob}" if cfg.glob else "")
        print(f"warning: no input files under {where} (is it mounted? is the pattern right?)", file=sys.stderr)

    with exclusive(cfg.output, S.LOCK_FILE, f"another `cxr screen` is writing to {cfg.output}; wait for it or use "
                   "another --output"):
        state = S.read_state(cfg.output)
        parts = S.list_parts(out_fs, out_dir)  # listed once: on an object store each listing is a request
        # a folder without results belongs to no model (say, its first run failed before scoring anything)
        owner = (state.get("model_id") or _model_of_part(out_fs, parts[-1])) if parts else None
        S.check_owner({**state, "model_id": owner}, meta.model_id, cfg.output,
                      cfg.force or cfg.new_model == "rescore")
        if owner and owner != meta.model_id:  # --force/--new-model rescore: the folder changes hands, once
            kept = S.set_aside_results(cfg.output, owner)
            flag = "--force" if cfg.force else "--new-model rescore"
            print(f"{flag}: model {meta.model_id[:12]} takes the folder over: the results of model {owner[:12]} "
                  f"were moved to {uri_prefix(cfg.output)}{kept} (delete that folder when no longer needed); "
                  "every selected file is scored again", file=sys.stderr)
        S.clean_tmp(cfg.output)
        S.write_state(cfg.output, meta.model_id, meta.model_version, classes)
        if cfg.force:  # rescore the selected files; their new rows supersede the old ones (newest wins)
            keys, todo = np.zeros(0, dtype="S16"), files
        else:
            done = S.read_parts(cfg.output, classes, columns=["path", "size_bytes", "mtime_ns", "sha256", "model_id",
                                                              "error_code", "scored_at"])
            resume = S.resume_keys(done, meta.model_id, S.read_stats(cfg.output))
            del done
            keys = resume.done
            todo = [f for f in files if f.mtime_ns is None  # unchanged since scored: not even read
                    or not S.is_done(resume.unchanged, S.stat_key(f.path, f.size, f.mtime_ns))]

            def stage(text: str) -> None:
                if on_progress:
                    on_progress(Progress(0, len(files), 0, time.perf_counter() - t0, text))

            todo = _recheck_scored(todo, fs, resume, cfg.output, meta.model_id, stage)
        stats = _execute(cfg, meta, todo, fs, keys, labels, on_progress, t0, total=len(files))
        duration = time.perf_counter() - t0
        summary = S.summarize_counts(
            processed=stats.rows, errors_by_code=stats.errors_by_code, labelled=stats.labelled,
            positives=stats.positives, candidates=len(files), ignored=ignored, duration_s=duration,
            model_id=meta.model_id, model_version=meta.model_version, unnamed=unnamed, hidden=hidden,
            unlisted=unlisted)
        summary["output"] = cfg.output
        if cfg.report:
            summary["report"] = _maybe_report(cfg.output, classes, labels if cfg.labels else None)
        S.write_bytes_atomic(out_fs, f"{out_dir}/{S.SUMMARY_FILE}",
                             (json.dumps(summary, indent=2, default=str) + "\n").encode())
    return summary


def _recheck_scored(files: list[S.InputFile], fs: pafs.FileSystem, resume: S.ResumeKeys, output: str,
                    model_id: str, stage: Callable[[str], None]) -> list[S.InputFile]:
    """``files`` less those at paths this model scored whose content is still what it scored.

    Their stat did not vouch for them: a file listed under a minute after it was written, or read at
    another size than listed, has a row without an mtime; one rewritten at the same size, or touched, a
    row of another mtime. Those are hashed here, in threads, before Ray is started for them. The same
    content is skipped and its settled stat recorded (:func:`cxr.screening.record_stats`), so the next
    run skips it unread; other content is scored (read again by Ray). A file whose size differs from its
    row's goes to Ray unhashed: its content changed.
    """
    scored = S.scored_sizes(resume, [f.path for f in files])
    suspects = [f for f in files if f.path in scored and scored[f.path] in (None, f.size)]
    if not suspects:
        return files
    stage(f"checking {len(suspects)} file(s) scored before, by content")
    reader = None if isinstance(fs, pafs.LocalFileSystem) else fs

    def digest(f: S.InputFile) -> tuple[str | None, bool]:
        """(sha256, whether the listing's stat still holds after the read: only then may it be recorded)."""
        try:
            sha = _sha256_in_chunks(reader, f.fs_path)
            if reader is not None:
                info = reader.get_file_info(f.fs_path)
                return sha, (info.size, info.mtime_ns) == (f.size, f.mtime_ns)
            st = os.stat(f.fs_path)
            return sha, (st.st_size, st.st_mtime_ns) == (f.size, f.mtime_ns)
        except OSError:
            return None, False  # unreadable now: the scoring step writes its read_failed row

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=16) as pool:  # reads: I/O-bound, hashlib releases the GIL
        shas = dict(zip((f.path for f in suspects), pool.map(digest, suspects)))
    todo, records = [], []
    for f in files:
        sha, stable = shas.get(f.path, (None, False))
        if sha and S.is_done(resume.done, S.resume_key(f.path, sha)):
            if f.mtime_ns is not None and stable:  # settled, and unchanged while hashed: it vouches from now on
                records.append({"path": f.path, "size_bytes": f.size, "mtime_ns": f.mtime_ns, "sha256": sha,
                                "model_id": model_id})
            continue
        todo.append(f)
    S.record_stats(output, records)
    return todo


def _execute(cfg: ScreenConfig, meta: "ModelMetadata", files: list[S.InputFile], fs: pafs.FileSystem,
             keys: np.ndarray, labels: S.LabelIndex, on_progress: ProgressFn | None, t0: float,
             total: int) -> S.RunStats:
    """Run the Ray Data pipeline over ``files`` (``total`` input files, the rest unchanged) and write the rows
    as parts. Nothing to read: no Ray at all (a quiet night costs the listing, not Ray's start)."""
    stats = S.RunStats()
    normal = "normal"
    if not files:
        return stats
    import dataclasses

    import ray
    import ray.data

    from cxr.engine import preferred_batch, resolve_backend
    from jobs.common import cluster_address, init_ray

    def report(stage: str = "") -> None:
        if on_progress:
            on_progress(Progress(stats.rows, total, stats.errors, time.perf_counter() - t0, stage))

    if not ray.is_initialized():
        address = cluster_address()
        report(f"connecting to the Ray cluster at {address}" if address else "starting a local Ray instance")
    started = init_ray(dashboard=False)  # a local screening run needs no dashboard: ~2 s and a CPU-hungry agent less
    interrupt_on_termination()  # again: ray.init installed its own (sys.exit, no flush)
    try:
        _quiet_ray_data()
        res = ray.cluster_resources()
        topo = S.plan_topology(cfg, float(res.get("CPU", 1)), float(res.get("GPU", 0)), autoscaling=bool(cluster_address()))
        keys_ref = ray.put(keys) if keys.size else None
        items = [{"path": f.path, "fs_path": f.fs_path, "size": f.size,
                  "mtime_ns": -1 if f.mtime_ns is None else f.mtime_ns} for f in files]
        engine = resolve_backend(cfg.engine, gpu=topo.actor_gpus > 0)
        batch = cfg.batch_size or preferred_batch(engine, gpu=topo.actor_gpus > 0)
        blocks = max(1, math.ceil(len(items) / S.files_per_block(len(items), batch, meta.preprocess.image_size)))
        # each actor costs seconds of start-up (a worker process, Ray Data, the engine): small jobs get fewer
        topo.actors = max(1, min(topo.actors, math.ceil(len(items) / batch) // 4))
        report(f"starting {topo.actors} scoring actor(s): {engine} engine, {topo.threads} thread(s) each, "
               f"batch {batch}" + (f", {topo.actor_gpus:g} GPU each" if topo.actor_gpus else ""))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        local = isinstance(fs, pafs.LocalFileSystem)
        ds = ds.map_batches(
            prepare, batch_size=None, batch_format="numpy", num_cpus=topo.task_cpus,
            fn_kwargs={"fs": None if local else fs, "pre": dataclasses.asdict(meta.preprocess), "done": keys_ref},
        )
        ds = ds.map_batches(
            Scorer, batch_size=batch, batch_format="numpy", zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(size=topo.actors),
            fn_constructor_kwargs={"model_dir": str(Path(cfg.model).resolve()), "backend": cfg.engine,
                                   "threads": topo.threads, "gpu": topo.actor_gpus > 0},
            num_cpus=topo.actor_cpus, num_gpus=topo.actor_gpus or None,
        )
        writer = S.PartWriter(cfg.output, S.result_schema(list(meta.classes)), cfg.part_rows, cfg.part_seconds)
        try:
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
                if block.num_rows == 0:
                    continue
                block = labels.apply(block)
                writer.add(block)
                stats.add(block, normal)
                report()
        except CxrError:
            raise
        except Exception as exc:  # noqa: BLE001 - actor start-up failures surface here, wrapped by Ray
            raise CxrError(f"screening failed: {_root_message(exc)}") from None
        finally:  # also on Ctrl-C: keep what was scored, a rerun resumes from it
            writer.close()
    finally:
        if started:
            ray.shutdown()
    return stats


def _quiet_ray_data() -> None:
    """Our own progress line and summary replace Ray Data's bars and per-dataset logs."""
    import logging
    import warnings

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*minimum number of concurrent actors.*")
    from ray.util.debug import log_once

    ctx = ray.data.DataContext.get_current()
    ctx.print_on_execution_start = False
    ctx.enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # consume Ray's one-time 'Progress bars disabled' warning


def _root_message(exc: BaseException) -> str:
    """The innermost useful line of a (Ray-wrapped) exception."""
    seen = exc
    while getattr(seen, "cause", None) is not None or seen.__cause__ is not None:
        seen = getattr(seen, "cause", None) or seen.__cause__  # type: ignore[assignment]
    text = str(seen).strip().splitlines()
    for i, line in enumerate(text):  # Ray Data appends its retry advice to the task's own message: cut it
        if _RAY_RETRY_HINT.match(line):
            text = text[:i]
            break
    lines = [ln for ln in text if ln.strip() and not ln.startswith(("Traceback", "  "))]
    return (lines[-1] if lines else type(seen).__name__)[:500]


#: the first line of the suffix ray.data._internal.util._annotate_exception_with_retry_context adds
_RAY_RETRY_HINT = re.compile(r"^Failed to .* after \d+/\d+ attempts|^To change retry attempts")


def _maybe_report(output: str, classes: list[str], labels: S.LabelIndex | None = None) -> str | None:
    """Write OUTPUT/report when the results carry true labels; None when there is nothing to report.

    ``--labels`` applies to every current row, also those scored by earlier runs (their Parquet rows
    keep the label they were written with), so a corrected manifest corrects the report.
    """
    table = S.read_results(output)
    if labels is not None and table.num_rows:
        table = labels.apply(table)
    if table.num_rows == 0 or table.column("true_label").null_count == table.num_rows:
        return None
    try:
        from cxr.report import write_report
    except ImportError as exc:
        print(f"report skipped: cxr.report is not available ({exc})", file=sys.stderr)
        return None
    target = child_uri(output, f"{open_fs(output)[1]}/{S.REPORT_DIR}")  # a URI keeps its ?query and credentials
    with writable_folder(target) as folder:
        write_report(table, folder, classes)
    return target

"""The pure parts of screening (cxr/screening.py): schema, rows, resume keys, parts, listing, labels, metrics.

No Ray here; tests/test_screen.py runs the real job.
"""

from __future__ import annotations

import http.server
import shlex
import shutil
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cxr import screening as S
from cxr.storage import child_uri, is_local, is_uri, join, open_fs
from cxr.errors import CxrError

CLASSES = ["normal", "pneumonia"]


def _base(paths: list[str], codes: list[str] | None = None) -> dict[str, list]:
    n = len(paths)
    codes = codes or [""] * n
    return {"path": paths, "size_bytes": [10] * n, "sha256": [f"{i:064x}" for i in range(n)],
            "width": [224] * n, "height": [224] * n, "error_code": codes,
            "error": ["bad" if c else "" for c in codes]}


def test_schema_is_versioned_and_names_every_column() -> None:
    schema = S.result_schema(CLASSES)
    assert schema.names == ["path", "size_bytes", "mtime_ns", "sha256", "width", "height", "prob_normal", "prob_pneumonia",
                            "label", "threshold", "model_id", "model_version", "scored_at", "error_code", "error",
                            "true_label"]
    assert schema.metadata[b"cxr.schema_version"] == str(S.SCHEMA_VERSION).encode()
    assert S.classes_of(schema) == CLASSES
    sub = S.result_schema(["normal", "bacteria", "virus"])
    assert {"prob_bacteria", "prob_virus"} <= set(sub.names)


def test_build_rows_uses_the_shared_decision_and_blanks_error_rows() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.0, 0.0], [0.6, 0.4]], np.float32)
    t = S.build_rows(_base(["a", "b", "c", "d"], ["", "", "corrupt", ""]), probs, [True, True, False, True], CLASSES,
                     threshold=0.35, model_id="m" * 64, model_version="v1", true_label=["normal", None, None, "pneumonia"])
    assert t.schema == S.result_schema(CLASSES)
    rows = t.to_pylist()
    assert [r["label"] for r in rows] == ["normal", "pneumonia", None, "pneumonia"]  # 0.4 >= 0.35
    assert rows[2]["prob_normal"] is None and rows[2]["error_code"] == "corrupt" and rows[2]["error"] == "bad"
    assert rows[0]["error_code"] is None and rows[0]["error"] is None
    assert rows[0]["prob_pneumonia"] == pytest.approx(0.1)
    assert [r["true_label"] for r in rows] == ["normal", None, None, "pneumonia"]
    assert rows[0]["model_id"] == "m" * 64 and rows[0]["threshold"] == 0.35


def test_resume_keys_are_per_path_and_content() -> None:
    t = S.build_rows(_base(["/a/x.jpeg", "/b/x.jpeg", "/c/y.jpeg"], ["", "", "read_failed"]), np.zeros((3, 2)),
                     [True, True, False], CLASSES, 0.5, "model-1", "v")
    keys = S.done_keys(t, "model-1")
    sha = t.column("sha256").to_pylist()
    assert S.is_done(keys, S.resume_key("/a/x.jpeg", sha[0]))
    assert S.is_done(keys, S.resume_key("/b/x.jpeg", sha[1]))
    assert not S.is_done(keys, S.resume_key("/a/x.jpeg", sha[1]))  # same path, new content: rescore
    assert not S.is_done(keys, S.resume_key("/c/y.jpeg", sha[2]))  # I/O failures are retried
    assert S.done_keys(t, "model-2").size == 0  # another model's rows do not count
    assert not S.is_done(np.zeros(0, "S16"), S.resume_key("/a/x.jpeg", sha[0]))


def test_resume_keys_follow_the_newest_row_per_path() -> None:
    """An older row must not mark a file done once a newer row replaced it: a transient read failure
    after a good score is retried, and content that went back to an earlier version is rescored."""
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)

    def rows(sha: str, code: str, day: int) -> pa.Table:
        base = {**_base(["/a.png"], [code]), "sha256": [sha]}
        return S.build_rows(base, np.zeros((1, 2)), [not code], CLASSES, 0.5, "m", "v",
                            scored_at=t0 + timedelta(days=day))

    x, y = "aa" * 32, "bb" * 32
    flaky = pa.concat_tables([rows(x, "", 0), rows("", "read_failed", 1)])
    assert not S.is_done(S.done_keys(flaky, "m"), S.resume_key("/a.png", x))
    short_of_memory = pa.concat_tables([rows(x, "", 0), rows(x, "out_of_memory", 1)])  # the worker's, not the file's
    assert not S.is_done(S.done_keys(short_of_memory, "m"), S.resume_key("/a.png", x))
    assert S.is_done(S.done_keys(pa.concat_tables([rows(x, "", 0), rows(x, "corrupt", 1)]), "m"),
                     S.resume_key("/a.png", x))  # a file found bad stays done
    back = pa.concat_tables([rows(x, "", 0), rows(y, "", 1)])
    keys = S.done_keys(back, "m")
    assert S.is_done(keys, S.resume_key("/a.png", y)) and not S.is_done(keys, S.resume_key("/a.png", x))


def test_resume_keys_ending_in_nul_are_found() -> None:
    """numpy's S16 strips trailing NULs on read; 1 key in 256 ends in one (a kill -9 rerun once
    rescored and duplicated such a row)."""
    paths = [f"/archive/{i}.jpeg" for i in range(2000)]
    keys = [S.resume_key(p, "ab" * 32) for p in paths]
    assert any(k.endswith(b"\0") for k in keys)
    t = pa.table({"path": paths, "sha256": ["ab" * 32] * len(paths), "model_id": ["m"] * len(paths),
                  "error_code": [None] * len(paths)})
    done = S.done_keys(t, "m")
    assert all(S.is_done(done, k) for k in keys)
    assert not S.is_done(done, S.resume_key("/archive/new.jpeg", "ab" * 32))


def test_dedupe_keeps_the_newest_row_per_path() -> None:
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    old = S.build_rows(_base(["p1", "p2"]), np.array([[0.9, 0.1], [0.9, 0.1]]), [True, True], CLASSES, 0.5, "m", "v",
                       scored_at=t0)
    new = S.build_rows(_base(["p1"]), np.array([[0.1, 0.9]]), [True], CLASSES, 0.5, "m", "v",
                       scored_at=t0 + timedelta(days=1))
    both = pa.concat_tables([new, old])  # order on disk must not matter
    d = S.dedupe_latest(both)
    got = {r["path"]: r["label"] for r in d.to_pylist()}
    assert got == {"p1": "pneumonia", "p2": "normal"}


def test_part_writer_writes_complete_parts_atomically(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    w = S.PartWriter(out, S.result_schema(CLASSES), part_rows=3, part_seconds=1e9)
    for i in range(7):
        w.add(S.build_rows(_base([f"p{i}"]), np.zeros((1, 2)), [True], CLASSES, 0.5, "m", "v"))
    assert len(w.paths) == 2 and not list((tmp_path / "out/results/_tmp").iterdir())
    w.flush()
    assert len(S.list_parts(*open_fs(out))) == 3
    (tmp_path / "out/results/_tmp/part-dead.parquet").write_bytes(b"half a part")
    S.clean_tmp(out)
    assert not list((tmp_path / "out/results/_tmp").iterdir())
    table = S.read_parts(out)
    assert table.num_rows == 7 and sorted(table.column("path").to_pylist()) == [f"p{i}" for i in range(7)]
    assert pq.read_schema(w.paths[0]).metadata[b"cxr.schema"] == b"screening"


def test_folder_owner_check(tmp_path: Path) -> None:
    out = str(tmp_path)
    S.write_state(out, "a" * 64, "v1", CLASSES)
    state = S.read_state(out)
    S.check_owner(state, "a" * 64, out, force=False)
    with pytest.raises(CxrError, match="another model"):
        S.check_owner(state, "b" * 64, out, force=False)
    S.check_owner(state, "b" * 64, out, force=True)


def test_listing_by_content_glob_and_limit(tmp_path: Path, sample_images: list[Path]) -> None:
    jpeg = sample_images[0].read_bytes()
    (tmp_path / "a b/ü").mkdir(parents=True)
    (tmp_path / "a b/ü/Röntgen 1.jpeg").write_bytes(jpeg)
    (tmp_path / "a b/scan_without_extension").write_bytes(jpeg)  # recognised by content
    (tmp_path / "fake.png").write_bytes(b"plain text")  # image name: an input (becomes a not_image row)
    (tmp_path / "notes.txt").write_text("not an input")
    (tmp_path / "z.dcm").write_bytes(b"")
    files, _, ignored, _, _, _ = S.list_archive(str(tmp_path))
    names = [Path(f.path).name for f in files]
    assert names == ["scan_without_extension", "Röntgen 1.jpeg", "fake.png", "z.dcm"]
    assert ignored == 1
    assert all(Path(f.path).is_absolute() for f in files)
    assert [Path(f.path).name for f in S.list_archive(str(tmp_path), glob="*.jpeg")[0]] == ["Röntgen 1.jpeg"]
    assert [Path(f.path).name for f in S.list_archive(str(tmp_path), glob="a b/**")[0]] == [
        "scan_without_extension", "Röntgen 1.jpeg"]
    assert len(S.list_archive(str(tmp_path), limit=2)[0]) == 2
    assert len(S.list_archive(str(tmp_path), exclude=[str(tmp_path / "a b")])[0]) == 2
    assert len(S.list_archive("file://" + str(tmp_path))[0]) == 4
    with pytest.raises(CxrError, match="archive not found"):
        S.list_archive(str(tmp_path / "missing"))


def test_stat_records_vouch_only_for_the_content_of_the_current_row(tmp_path: Path) -> None:
    """A stat record (a file found already scored by its hash) lets later runs skip the file unread, while
    the path's current row is the content it was recorded for, and for that model only."""
    rows = S.build_rows(_base(["/a.png", "/b.png"]), np.array([[0.9, 0.1], [0.2, 0.8]]), [True, True], CLASSES,
                        0.5, "m", "v")  # no mtimes: both files were fresh when listed
    sha_a, sha_b = rows.column("sha256").to_pylist()
    out = str(tmp_path / "o")
    S.record_stats(out, [{"path": "/a.png", "size_bytes": 10, "mtime_ns": 5, "sha256": sha_a, "model_id": "m"},
                         {"path": "/b.png", "size_bytes": 10, "mtime_ns": 6, "sha256": "f" * 64, "model_id": "m"},
                         {"path": "/b.png", "size_bytes": 10, "mtime_ns": 7, "sha256": sha_b, "model_id": "other"}])
    S.record_stats(out, [])  # nothing to record: no file
    (tmp_path / "o" / S.STATS_DIR / "20990101T000000Z-damaged.parquet").write_bytes(b"garbage")  # a cache: skipped
    stats = S.read_stats(out)
    assert stats.num_rows == 3 and len(list((tmp_path / "o" / S.STATS_DIR).iterdir())) == 2
    keys = S.resume_keys(rows, "m", stats)
    assert S.is_done(keys.unchanged, S.stat_key("/a.png", 10, 5))
    assert not S.is_done(keys.unchanged, S.stat_key("/b.png", 10, 6))  # recorded for other content
    assert not S.is_done(keys.unchanged, S.stat_key("/b.png", 10, 7))  # recorded for another model
    assert S.scored_sizes(keys, ["/a.png", "/b.png", "/z.png"]) == {"/a.png": None, "/b.png": None}
    assert S.resume_keys(rows, "m").unchanged.size == 0
    settled = S.build_rows({**_base(["/c.png"]), "mtime_ns": [9]}, np.array([[0.9, 0.1]]), [True], CLASSES, 0.5, "m", "v")
    assert S.scored_sizes(S.resume_keys(settled, "m"), ["/c.png"]) == {"/c.png": 10}  # same size: maybe same bytes
    assert S.scored_sizes(S.resume_keys(settled, "other model"), ["/c.png"]) == {}
    assert S.read_stats(str(tmp_path / "empty")) is None


def test_parts_written_before_schema_v2_read_with_null_mtimes(tmp_path: Path) -> None:
    """A folder screened by an earlier cxr (no mtime_ns column) keeps working: its files are simply read again."""
    out = str(tmp_path / "o")
    old = S.build_rows(_base(["/a.png"]), np.array([[0.9, 0.1]]), [True], CLASSES, 0.5, "m", "v").drop_columns(["mtime_ns"])
    (tmp_path / "o" / S.RESULTS_DIR).mkdir(parents=True)
    pq.write_table(old, tmp_path / "o" / S.RESULTS_DIR / "part-old-00000.parquet")
    writer = S.PartWriter(out, S.result_schema(CLASSES))
    new = S.build_rows({**_base(["/b.png"]), "mtime_ns": [123]}, np.array([[0.2, 0.8]]), [True], CLASSES, 0.5, "m", "v")
    writer.add(new)
    writer.flush()
    done = S.read_parts(out, CLASSES, columns=["path", "size_bytes", "mtime_ns", "sha256", "model_id", "error_code",
                                               "scored_at"])
    assert dict(zip(done.column("path").to_pylist(), done.column("mtime_ns").to_pylist())) == {"/a.png": None,
                                                                                             "/b.png": 123}
    keys = S.unchanged_keys(done, "m")
    size_b = done.column("size_bytes").to_pylist()[1]
    assert keys.size == 1 and S.is_done(keys, S.stat_key("/b.png", size_b, 123))
    assert not S.is_done(keys, S.stat_key("/b.png", size_b, 124))
    assert S.read_results(out).num_rows == 2


def test_listing_follows_folder_links_once_and_never_loops(tmp_path: Path) -> None:
    """Arrow's own listing follows a link to a parent 40 levels deep: one image, 40 rows (2^40 with two links)."""
    archive, outside = tmp_path / "archive", tmp_path / "elsewhere"
    (archive / "sub").mkdir(parents=True)
    outside.mkdir()
    (archive / "sub/a.png").write_bytes(b"x")
    (outside / "b.png").write_bytes(b"x")
    (archive / "sub/up").symlink_to("..")  # a loop
    (archive / "sub/again").symlink_to("../sub")  # a second view of a folder listed at its own place
    (archive / "disk2").symlink_to(outside)  # a folder on another disk: its files are inputs
    (outside / "back").symlink_to(archive)  # ... with a way back in
    (archive / "sub/gone.png").symlink_to(tmp_path / "nothing")  # dangling
    (archive / "results").mkdir()
    (archive / "results/part.png").write_bytes(b"x")
    (archive / "view").symlink_to(archive / "results")  # the output folder, reached through a link
    files, _, ignored, _, _, _ = S.list_archive(str(archive), exclude=[str(archive / "results")])
    assert [f.path for f in files] == [str(archive / "disk2/b.png"), str(archive / "sub/a.png")]
    assert ignored == 0
    assert [f.path for f in S.list_archive(str(archive), glob="./sub/*")[0]] == [str(archive / "sub/a.png")]
    assert len(S.list_archive(str(archive), glob=f"{archive}/sub/*")[0]) == 1
    with pytest.raises(CxrError, match="outside the archive"):
        S.list_archive(str(archive), glob="/somewhere/else/*")


def test_hidden_files_and_folders_are_left_out_and_counted(tmp_path: Path, sample_images: list[Path]) -> None:
    """rsync's in-flight .name.XXXXXX, .Trash, .snapshot: no rows (a temporary file would leave a truncated
    row under a name that never returns), but counted; a hidden file named as the archive is screened."""
    jpeg = sample_images[0].read_bytes()
    (tmp_path / "NORMAL/.snapshot/hourly").mkdir(parents=True)
    (tmp_path / "NORMAL/a.jpeg").write_bytes(jpeg)
    (tmp_path / "NORMAL/.a.jpeg.Xy12ab").write_bytes(jpeg[:100])
    (tmp_path / "NORMAL/.snapshot/hourly/a.jpeg").write_bytes(jpeg)
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    listing = S.list_archive(str(tmp_path))
    assert [Path(f.path).name for f in listing.files] == ["a.jpeg"] and listing.hidden == 3
    assert len(S.list_archive(str(tmp_path / "NORMAL/.a.jpeg.Xy12ab")).files) == 1
    summary = S.summarize_counts(processed=1, errors_by_code={}, labelled=0, positives=0, candidates=1, ignored=0,
                                 duration_s=1.0, model_id="m" * 64, model_version="v", hidden=listing.hidden)
    assert "left out (hidden: names starting with '.'): 3" in S.format_summary(summary)


def test_a_folder_that_cannot_be_listed_is_reported_and_the_rest_screened(tmp_path: Path) -> None:
    """One study folder without read permission must not hold back the night's others: its files get no rows,
    the folder is named (summary, metric); the archive itself unreadable is still an error. Root ignores
    permissions, so as root the listing runs with those capabilities dropped (capsh)."""
    import json
    import os
    import subprocess
    import sys

    archive = tmp_path / "archive"
    (archive / "ok").mkdir(parents=True)
    (archive / "locked").mkdir()
    (archive / "ok/a.png").write_bytes(b"x")
    (archive / "locked/b.png").write_bytes(b"x")
    code = ("import json, sys\nfrom cxr import screening as S\nfrom cxr.errors import CxrError\n"
            "listing = S.list_archive(sys.argv[1])\n"
            "print(json.dumps([[f.path for f in listing.files], list(listing.unlisted)]))\n"
            "try:\n    S.list_archive(sys.argv[2])\nexcept CxrError as exc:\n    print(exc)\n")
    cmd = [sys.executable, "-c", code, str(archive), str(archive / "locked")]
    if os.geteuid() == 0:
        if not shutil.which("capsh"):
            pytest.skip("root without capsh: permissions cannot be enforced")
        cmd = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", " ".join(map(shlex.quote, cmd))]
    (archive / "locked").chmod(0)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    finally:
        (archive / "locked").chmod(0o755)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 2, out.stderr
    files, unlisted = json.loads(lines[0])
    assert files == [str(archive / "ok/a.png")]
    assert unlisted == [f"{archive / 'locked'}: Permission denied"]
    assert lines[1] == f"cannot list {archive / 'locked'}: Permission denied"
    summary = S.summarize_counts(processed=1, errors_by_code={}, labelled=0, positives=0, candidates=1, ignored=0,
                                 duration_s=1.0, model_id="m" * 64, model_version="v", unlisted=unlisted)
    assert "NOT SCREENED: 1 folder(s) could not be listed" in S.format_summary(summary)
    from prometheus_client import generate_latest

    assert b"cxr_screen_unlisted_folders 1.0" in generate_latest(S.metrics_registry(summary))


def test_folders_moved_away_while_listed_are_skipped_not_fatal(tmp_path: Path) -> None:
    """An ingest step moving study folders while the night's listing runs: a folder gone between its parent's
    listing and its own is like a deleted file (it made the whole run refuse, exit 2: 393 of 816 listings)."""
    archive = tmp_path / "archive"
    for i in range(40):
        (archive / f"s{i:02d}").mkdir(parents=True)
        (archive / f"s{i:02d}/a.png").write_bytes(b"x")
    stop = threading.Event()

    def churn() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            incoming = archive / f"incoming{k}"
            (incoming / "sub").mkdir(parents=True)
            (incoming / "sub/b.png").write_bytes(b"x")
            shutil.rmtree(incoming)

    mover = threading.Thread(target=churn, daemon=True)
    mover.start()
    try:
        for _ in range(150):
            files = S.list_archive(str(archive))[0]
            assert len([f for f in files if f.path.startswith(str(archive / "s"))]) == 40
    finally:
        stop.set()
        mover.join(10)


def test_listing_skips_names_that_are_not_utf8(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Arrow cannot decode such a name; the listing must go on and say so, not end in a traceback."""
    (tmp_path / "ok.png").write_bytes(b"x")
    open(bytes(tmp_path) + b"/\xff\xfe.png", "wb").close()
    files, _, ignored, unnamed, _, _ = S.list_archive(str(tmp_path))
    assert [Path(f.path).name for f in files] == ["ok.png"] and (ignored, unnamed) == (0, 1)
    assert "not valid UTF-8" in caplog.text


def test_child_uris_keep_the_location_query() -> None:
    """Checkpoint URIs rebuilt from a listing must keep ?endpoint_override= (MinIO), or they name AWS."""
    loc = "s3://bucket/ckpt?endpoint_override=minio:9000&region=eu-1"
    assert child_uri(loc, "bucket/ckpt/cxr/checkpoint_1") == \
        "s3://bucket/ckpt/cxr/checkpoint_1?endpoint_override=minio:9000&region=eu-1"
    assert child_uri("gs://b/x", "b/x/y") == "gs://b/x/y"
    assert child_uri("/local/dir", "/local/dir/y") == "/local/dir/y"
    assert child_uri("s3://KEY:SECRET@b/x?region=r", "b/x/y") == "s3://KEY:SECRET@b/x/y?region=r"
    assert child_uri("file:///a/b", "/a/b/c") == "file:///a/b/c"
    assert child_uri("s3://b?endpoint_override=u@h:9000", "b/r") == "s3://b/r?endpoint_override=u@h:9000"  # '@' in a query


def test_join_keeps_a_uris_query_at_the_end() -> None:
    """Appending to the string would put the name inside the query: s3://b/out?region=x/report."""
    assert join("s3://b/out?region=x", "report") == "s3://b/out/report?region=x"
    assert join("s3://b/out/", "results", "p.parquet") == "s3://b/out/results/p.parquet"
    assert join("screens/a?b", "report") == "screens/a?b/report"  # a local folder may have '?' in its name


def test_locations_local_or_uri() -> None:
    """file:// is local (locks, saved config); s3:// is not; a path with a colon is still a path."""
    assert is_local("/data/x") and is_local("rel/x:y") and is_local("file:///data/x")
    assert not is_local("s3://b/x") and is_uri("s3://b/x") and is_uri(Path("rel")) is False


def test_files_without_an_image_suffix_are_inputs_by_content_or_when_unreadable(tmp_path: Path) -> None:
    """A DICOM named by UID is an input by its bytes; notes and empty files are not; a file that cannot be
    read (listed without a stat, in a folder without execute permission) is, so its read gives a row."""
    (tmp_path / "1.2.840.113619.2.55.3").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (tmp_path / "notes").write_text("not an image " * 20)
    (tmp_path / "empty").write_bytes(b"")
    infos = [pafs.FileInfo(str(tmp_path / n), type=pafs.FileType.File, size=(tmp_path / n).stat().st_size)
             for n in ("1.2.840.113619.2.55.3", "notes", "empty")]
    infos.append(pafs.FileInfo(str(tmp_path / "gone" / "1.2.3"), type=pafs.FileType.File, size=0))
    verdicts = [(Path(fi.path).name, ok) for fi, ok in S._inputs_by_content(pafs.LocalFileSystem(), infos)]
    assert verdicts == [("1.2.840.113619.2.55.3", True), ("notes", False), ("empty", False), ("1.2.3", True)]


def test_labels_by_path_then_sha_then_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    man = tmp_path / "labels.csv"
    man.write_text("path,label,subtype,sha256\nimgs/a.png,PNEUMONIA,virus,\nelsewhere/b.png,NORMAL,normal," + "f" * 64 + "\n")
    idx = S.load_labels(str(man), CLASSES, folder_root="/x")
    assert idx.lookup(str(tmp_path / "imgs/a.png"), None) == "pneumonia"
    assert idx.lookup("/copy/of/b.png", "f" * 64) == "normal"  # joined by content
    assert idx.lookup("/x/NORMAL/c.png", None) == "normal"  # Kaggle folder layout under the archive
    assert idx.lookup("/x/other/c.png", None) is None
    assert S.load_labels(str(man), ["normal", "bacteria", "virus"]).lookup(str(tmp_path / "imgs/a.png"), None) == "virus"
    # folder names above the archive (a bucket or parent called "normal") label nothing; the archive's own name does
    assert S.LabelIndex(folder_root="s3://pneumonia/xrays").lookup("s3://pneumonia/xrays/2024/a.dcm", None) is None
    assert S.LabelIndex(folder_root="/srv/normal/archive").lookup("/srv/normal/archive/x.png", None) is None
    assert S.LabelIndex(folder_root="/d/test/NORMAL").lookup("/d/test/NORMAL/x.png", None) == "normal"
    assert S.LabelIndex().lookup("/x/NORMAL/c.png", None) is None  # `cxr report`: no folder guessing
    # a manifest's subtype is the true label only when it is one of the model's classes
    odd = tmp_path / "odd.csv"
    odd.write_text("path,label,subtype\nb.png,PNEUMONIA,unknown\n")
    assert S.load_labels(str(odd), ["normal", "bacteria", "virus"]).lookup(str(tmp_path / "b.png"), None) == "pneumonia"
    blank = tmp_path / "blank.csv"  # a file not read yet by a radiologist: unknown, not a broken manifest
    blank.write_text("path,label\na.png,\nb.png,NORMAL\n")
    idx = S.load_labels(str(blank), CLASSES)
    assert idx.lookup(str(tmp_path / "a.png"), None) is None and idx.lookup(str(tmp_path / "b.png"), None) == "normal"
    # a symlinked file keeps its own name, as the archive's listing gives it (its target's name never matched)
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "0001.png").write_bytes(b"x")
    (tmp_path / "alias.png").symlink_to(tmp_path / "store" / "0001.png")
    linked = tmp_path / "linked.csv"
    linked.write_text("path,label\nalias.png,PNEUMONIA\n")
    assert S.load_labels(str(linked), CLASSES).lookup(str(tmp_path / "alias.png"), None) == "pneumonia"
    monkeypatch.chdir(tmp_path / "store")  # a manifest named relative to the working directory, whichever it is
    assert S.load_labels("../linked.csv", CLASSES).lookup(str(tmp_path / "alias.png"), None) == "pneumonia"
    monkeypatch.chdir(tmp_path)
    assert S.load_labels("linked.csv", CLASSES).lookup(str(tmp_path / "alias.png"), None) == "pneumonia"
    odd.write_text("path,label\nb.png,sick\n")
    with pytest.raises(CxrError, match="sick"):  # a label that is there but wrong still fails loudly
        S.load_labels(str(odd), CLASSES)


def test_stored_true_labels_beat_folder_names_but_not_the_manifest(tmp_path: Path) -> None:
    """`cxr report --labels`: the manifest overrides a stored label; a path it does not list keeps its own."""
    man = tmp_path / "labels.csv"
    man.write_text("path,label\nNORMAL/a.png,PNEUMONIA\n")
    rows = S.build_rows(_base([str(tmp_path / "NORMAL/a.png"), str(tmp_path / "NORMAL/b.png")]), np.zeros((2, 2)),
                        [True, True], CLASSES, 0.5, "m", "v", true_label=["normal", "pneumonia"])
    got = S.load_labels(str(man), CLASSES, folder_root=str(tmp_path)).apply(rows).column("true_label").to_pylist()
    assert got == ["pneumonia", "pneumonia"]
    with pytest.raises(CxrError):
        S.load_labels(str(tmp_path / "nope.csv"))


def _summary() -> dict:
    return S.summarize_counts(processed=10, errors_by_code={"corrupt": 2, "empty": 1}, labelled=7, positives=3,
                              candidates=15, ignored=1, duration_s=4.0, model_id="ab" * 32, model_version="v1",
                              unnamed=2)


def test_summary_and_prometheus_text_round_trip(tmp_path: Path) -> None:
    s = _summary()
    assert (s["scored"], s["skipped"], s["errors"], s["images_per_s"]) == (7, 5, 3, 2.5)
    assert "errors: 3 (corrupt=2, empty=1)" in S.format_summary(s)
    path = tmp_path / "m/screen.prom"
    S.write_metrics_file(S.metrics_registry(s), str(path))
    fams = {f.name: f for f in text_string_to_metric_families(path.read_text())}
    value = {f: fams[f].samples[0].value for f in ("cxr_screen_scored_files", "cxr_screen_skipped_files",
                                                    "cxr_screen_positive_rate", "cxr_screen_images_per_second")}
    assert value == {"cxr_screen_scored_files": 7, "cxr_screen_skipped_files": 5,
                     "cxr_screen_positive_rate": pytest.approx(3 / 7), "cxr_screen_images_per_second": 2.5}
    errors = {smp.labels["code"]: smp.value for smp in fams["cxr_screen_error_files"].samples}
    assert errors["corrupt"] == 2 and errors["empty"] == 1 and errors["too_large"] == 0
    assert fams["cxr_screen_model_info"].samples[0].labels["model_id"] == "ab" * 32
    assert fams["cxr_screen_ignored_files"].samples[0].value == 1
    assert fams["cxr_screen_unnamed_files"].samples[0].value == 2  # real files without a row: not "ignored"
    assert "NOT SCREENED: 2 file(s) whose names are not valid UTF-8" in S.format_summary(s)
    assert not list(path.parent.glob("*.tmp*"))


def test_a_run_with_nothing_new_exports_no_rates() -> None:
    """A quiet night's positive rate and speed are unknown, not 0 (a 0 reads as a collapse in a panel)."""
    quiet = S.summarize_counts(processed=0, errors_by_code={}, labelled=0, positives=0, candidates=15, ignored=0,
                               duration_s=9.0, model_id="ab" * 32, model_version="v1")
    from prometheus_client import generate_latest

    names = {f.name for f in text_string_to_metric_families(generate_latest(S.metrics_registry(quiet)).decode())}
    assert "cxr_screen_positive_rate" not in names and "cxr_screen_images_per_second" not in names
    assert {"cxr_screen_skipped_files", "cxr_screen_success", "cxr_screen_duration_seconds"} <= names


def test_push_to_a_real_http_gateway() -> None:
    """A success replaces the job's group (PUT); a failure replaces only its own lines (POST), so the last
    success's time and figures stay beside cxr_screen_success 0; a 5xx is retried, a 4xx is not."""
    received: list[tuple[str, str, bytes]] = []
    group: dict[str, str] = {}  # metric name -> its text, as a Pushgateway keeps one job's group
    answers = [503]  # the first request meets a gateway restarting

    class Gateway(http.server.BaseHTTPRequestHandler):
        def _push(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.command, self.path, body))
            status = answers.pop(0) if answers else 200
            if status == 200:
                fams = {f.name: body for f in text_string_to_metric_families(body.decode())}
                if self.command == "PUT":
                    group.clear()
                group.update(fams)
            self.send_response(status)
            self.end_headers()

        do_PUT = do_POST = _push  # noqa: N815 - http.server naming

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        S.push_metrics(S.metrics_registry(_summary()), url, retry_delays=(0.1,))
        assert [r[0] for r in received] == ["PUT", "PUT"]  # the 503 was retried
        S.push_metrics(S.failure_metrics_registry(), url, replace=False, retry_delays=())
        answers.append(400)
        with pytest.raises(CxrError, match="Pushgateway"):
            S.push_metrics(S.metrics_registry(_summary()), url, retry_delays=(0.1, 0.1))
    finally:
        server.shutdown()
        server.server_close()
    assert [r[0] for r in received] == ["PUT", "PUT", "POST", "PUT"]  # the 400 was not retried
    assert received[1][1] == "/metrics/job/cxr_screen" and b"cxr_screen_scored_files 7.0" in received[1][2]
    assert {"cxr_screen_scored_files", "cxr_screen_last_success_timestamp_seconds"} <= set(group)
    assert b"cxr_screen_success 0.0" in group["cxr_screen_success"]
    assert b"last_success" not in received[2][2]
    with pytest.raises(CxrError, match="Pushgateway"):
        S.push_metrics(S.metrics_registry(_summary()), "http://127.0.0.1:9", retry_delays=())  # nothing listens


def test_a_failed_run_keeps_the_last_successful_runs_lines_in_the_metrics_file(tmp_path: Path) -> None:
    path = tmp_path / "screen.prom"
    S.write_metrics_file(S.metrics_registry(_summary()), str(path))
    path.write_text(path.read_text() + "# TYPE other_exporter gauge\nother_exporter 1.0\n")  # not ours: dropped
    S.write_metrics_file(S.failure_metrics_registry(), str(path), merge=True)
    assert "other_exporter" not in path.read_text()
    fams = {f.name: f for f in text_string_to_metric_families(path.read_text())}
    assert fams["cxr_screen_success"].samples[0].value == 0
    assert fams["cxr_screen_scored_files"].samples[0].value == 7
    assert fams["cxr_screen_last_success_timestamp_seconds"].samples[0].value <= \
        fams["cxr_screen_last_run_timestamp_seconds"].samples[0].value
    assert [ln for ln in path.read_text().splitlines() if ln.startswith("cxr_screen_success ")] == ["cxr_screen_success 0.0"]
    S.write_metrics_file(S.metrics_registry(_summary()), str(path))  # a success writes its own lines only
    path.write_text("not prometheus text {")
    S.write_metrics_file(S.failure_metrics_registry(), str(path), merge=True)  # a damaged file: the new lines
    assert {f.name for f in text_string_to_metric_families(path.read_text())} == \
        {"cxr_screen_last_run_timestamp_seconds", "cxr_screen_success"}


def test_read_blocks_stay_batch_sized_for_small_jobs_and_few_for_big_ones() -> None:
    """A small archive streams one engine batch per read task (its first batch reaches the actors at once);
    a million files make ~3,000 blocks, not 62,500 (Ray Data's cost per block), each under the memory cap."""
    per = S.files_per_block
    assert [per(n, 16, 224) for n in (1, 624, 6000, 16_000)] == [16] * 4
    assert per(624, 64, 224) == 64
    assert -(-100_000 // per(100_000, 16, 224)) == S.BLOCKS_TARGET
    assert -(-1_000_000 // per(1_000_000, 16, 224)) < 3_000
    assert all(per(n, 16, 224) * 4 * 224 * 224 <= S.BLOCK_IMAGE_BYTES for n in (10**5, 10**6, 10**7))
    assert per(1_000_000, 16, 1024) == 16  # big images: the batch, whatever the memory cap says


def test_topology_fits_the_cluster_or_asks_its_autoscaler_for_more() -> None:
    """Without --workers the actor pool fits the cluster as it is; with it, on a running cluster, every
    actor keeps its full share so the ones that do not fit make Ray's autoscaler add nodes."""
    from cxr.config import ScreenConfig
    from cxr.screening import plan_topology

    here = plan_topology(ScreenConfig(), 2.0, 0.0)
    assert (here.actors, here.threads, here.actor_cpus) == (2, 1, 0.75)  # half a CPU kept for decoding
    wide = ScreenConfig(workers=8, threads_per_worker=2)
    assert plan_topology(wide, 8.0, 0.0).actor_cpus < 1  # one machine: squeezed onto its cores
    assert plan_topology(wide, 8.0, 0.0, autoscaling=True).actor_cpus == 2.0  # a cluster: 16 CPUs asked for
    # threads derived from the CPUs that are up mean "fit them": room is kept for decoding, or nothing would run
    assert plan_topology(ScreenConfig(workers=1), 2.0, 0.0, autoscaling=True).actor_cpus == 1.5
    with pytest.raises(CxrError, match="--workers N asks for N GPU actors"):
        plan_topology(ScreenConfig(gpus_per_worker=1), 8.0, 0.0, autoscaling=True)
    gpu = plan_topology(ScreenConfig(gpus_per_worker=1, workers=4), 8.0, 0.0, autoscaling=True)
    assert (gpu.actors, gpu.actor_gpus, gpu.actor_cpus) == (4, 1, 1.0)
    with pytest.raises(CxrError, match="has 0 GPUs$"):  # a local instance has no autoscaler to wait for
        plan_topology(ScreenConfig(gpus_per_worker=1, workers=4), 8.0, 0.0)

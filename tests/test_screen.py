"""`cxr screen` / `cxr report` end to end on a real local Ray, real X-rays and bad files made here.

One archive is screened once per module (the `screened` fixture) and the
tests read its results; the SIGKILL test runs `cxr screen` as a subprocess.
Images are scored by the 64 px `tiny_model`, so a run costs seconds.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from cxr import screening as S
from cxr.storage import open_fs
from cxr.cli import main
from cxr.preprocess import decode_image

ROOT = Path(__file__).resolve().parents[1]
CXR = [str(Path(sys.executable).parent / "cxr")]


# --------------------------------------------------------------------------- inputs made by the tests


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming 10 gigapixels, with almost no data: caught by the pixel cap before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def png16_from(jpeg: bytes) -> bytes:
    """The 8-bit image as a 16-bit grayscale PNG (v * 257: the exact 16-bit equivalent)."""
    arr = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), dtype=np.uint16) * 257
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    return buf.getvalue()


def dicom_from(jpeg: bytes, bits: int = 16, monochrome1: bool = False) -> bytes:
    """A minimal valid DICOM (Explicit VR Little Endian) holding the JPEG's pixels at ``bits`` depth."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    arr = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), dtype=np.uint16)
    if bits == 16:
        arr = arr * 257
    maxval = 2**bits - 1
    if monochrome1:
        arr = maxval - arr
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CR", "TEST"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.PixelData = arr.astype(np.uint16 if bits > 8 else np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


BAD = {  # name -> (expected error_code, content maker)
    "bad-empty.jpeg": "empty",
    "bad-text.jpeg": "not_image",
    "bad-truncated.jpeg": "truncated",
    "bad-corrupt.png": "corrupt",
    "bad-bomb.png": "too_large",
    "bad-garbage.dcm": "dicom_invalid",
}


def make_archive(root: Path, normal: list[Path], pneumonia: list[Path]) -> dict[str, Path]:
    """Kaggle-layout archive with awkward names, derived formats and every kind of bad file."""
    (root / "NORMAL").mkdir(parents=True)
    nested = root / "PNEUMONIA" / "batch 1" / "Zürich ü"
    nested.mkdir(parents=True)
    for p in normal:
        shutil.copy(p, root / "NORMAL" / p.name)
    for i, p in enumerate(pneumonia):
        shutil.copy(p, nested / (f"film {i} é.jpeg" if i == 0 else p.name))
    jpeg = normal[0].read_bytes()
    made = {
        "jpeg": root / "NORMAL" / normal[0].name,
        "copy": root / "NORMAL" / "copy of first.jpeg",  # identical content, another path: its own row
        "png16": root / "NORMAL" / "first 16bit.png",
        "dicom16": root / "NORMAL" / "first_dicom_no_extension",  # recognised by content
        "dicom8_mono1": root / "NORMAL" / "first mono1.dcm",
    }
    made["copy"].write_bytes(jpeg)
    made["png16"].write_bytes(png16_from(jpeg))
    made["dicom16"].write_bytes(dicom_from(jpeg, bits=16))
    made["dicom8_mono1"].write_bytes(dicom_from(jpeg, bits=8, monochrome1=True))
    bad = root / "NORMAL"
    (bad / "bad-empty.jpeg").write_bytes(b"")
    (bad / "bad-text.jpeg").write_text("this is a radiology report, not an image")
    (bad / "bad-truncated.jpeg").write_bytes(jpeg[: len(jpeg) // 2])
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(png, format="PNG")
    raw = bytearray(png.getvalue())
    start = raw.index(b"IDAT") + 4
    raw[start:start + 200] = os.urandom(200)
    (bad / "bad-corrupt.png").write_bytes(bytes(raw))
    (bad / "bad-bomb.png").write_bytes(png_bomb())
    (bad / "bad-garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(300))
    (root / "README.txt").write_text("not an image: ignored")
    return made


def invoke(*args: str) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# --------------------------------------------------------------------------- one screened archive


@pytest.fixture(scope="module")
def screened(tmp_path_factory, ray_local, tiny_model, data_dir):
    root = tmp_path_factory.mktemp("screen")
    normal = sorted((data_dir / "train" / "NORMAL").glob("*.jpeg"))[:4]
    pneumonia = sorted((data_dir / "train" / "PNEUMONIA").glob("*.jpeg"))[:4]
    archive = root / "archive"
    made = make_archive(archive, normal, pneumonia)
    out = root / "out"
    t0 = time.perf_counter()
    res = invoke("screen", str(archive), "--model", str(tiny_model), "--output", str(out), "-q",
                 "--metrics-file", str(root / "screen.prom"), "--batch-size", "8")
    return {"archive": archive, "out": out, "made": made, "result": res, "root": root,
            "model": tiny_model, "seconds": time.perf_counter() - t0}


def _rows(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in S.read_results(str(out)).to_pylist()}


N_INPUTS = 4 + 4 + 4 + len(BAD)  # real films, copy + png16 + 2 dicom, bad files (README.txt is ignored)


def test_exactly_one_row_per_input_file_with_typed_errors(screened) -> None:
    res = screened["result"]
    assert res.exit_code == 0, res.output
    raw = S.read_parts(str(screened["out"]))
    paths = raw.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == N_INPUTS
    rows = _rows(screened["out"])
    for name, code in BAD.items():
        row = rows[str(screened["archive"] / "NORMAL" / name)]
        assert row["error_code"] == code, (name, row["error"])
        assert row["error"] and row["prob_normal"] is None and row["label"] is None
    scored = [r for r in rows.values() if r["error_code"] is None]
    assert len(scored) == N_INPUTS - len(BAD)
    assert all(r["label"] in ("normal", "pneumonia") and r["width"] == 224 and len(r["sha256"]) == 64 for r in scored)
    assert {r["true_label"] for r in scored} == {"normal", "pneumonia"}  # from the folder layout
    assert rows[str(screened["archive"] / "NORMAL" / "bad-bomb.png")]["width"] == 100_000
    assert "errors: 6 (corrupt=1, dicom_invalid=1, empty=1, not_image=1, too_large=1, truncated=1)" in res.output
    summary = json.loads((screened["out"] / S.SUMMARY_FILE).read_text())
    assert (summary["scored"], summary["errors"], summary["skipped"], summary["ignored_non_images"]) == (12, 6, 0, 1)
    # the codes are exactly those of the one preprocessing function
    for name, code in BAD.items():
        with pytest.raises(Exception) as exc:
            decode_image((screened["archive"] / "NORMAL" / name).read_bytes())
        assert getattr(exc.value, "code", None) == code


def test_decisions_follow_the_exports_threshold(screened) -> None:
    from cxr.export import read_metadata
    from cxr.metrics import decide

    meta = read_metadata(screened["model"])
    rows = [r for r in _rows(screened["out"]).values() if r["error_code"] is None]
    probs = np.array([[r["prob_normal"], r["prob_pneumonia"]] for r in rows])
    assert [r["label"] for r in rows] == decide(probs, meta.classes, meta.threshold)
    assert all(r["threshold"] == meta.threshold and r["model_id"] == meta.model_id for r in rows)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_16bit_png_and_dicom_score_like_their_8bit_jpeg(screened) -> None:
    rows = _rows(screened["out"])
    made = screened["made"]
    ref = rows[str(made["jpeg"])]["prob_pneumonia"]
    # the comparison means something only if this (untrained) model tells films apart by far more than 1e-3
    films = [r["prob_pneumonia"] for r in rows.values() if r["prob_pneumonia"] is not None]
    assert max(films) - min(films) > 0.01, films  # 0.03 with the seeded tiny model
    for key in ("copy", "png16", "dicom16", "dicom8_mono1"):
        row = rows[str(made[key])]
        assert row["error_code"] is None, (key, row["error"])
        assert abs(row["prob_pneumonia"] - ref) < 1e-3, key
    assert rows[str(made["copy"])]["sha256"] == rows[str(made["jpeg"])]["sha256"]


def test_prometheus_file_parses_back(screened) -> None:
    text = (screened["root"] / "screen.prom").read_text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["cxr_screen_scored_files"].samples[0].value == 12
    assert fams["cxr_screen_success"].samples[0].value == 1
    errors = {s.labels["code"]: s.value for s in fams["cxr_screen_error_files"].samples}
    assert errors["too_large"] == 1 and errors["read_failed"] == 0
    assert fams["cxr_screen_images_per_second"].samples[0].value > 0
    info = fams["cxr_screen_model_info"].samples[0].labels
    assert info["model_version"] == "tiny-test" and len(info["model_id"]) == 64


def test_a_failed_run_marks_the_metrics_file_failed_and_keeps_the_last_successs_figures(screened, tmp_path) -> None:
    prom = tmp_path / "screen.prom"
    prom.write_text((screened["root"] / "screen.prom").read_text())
    res = invoke("screen", str(screened["archive"]), "--model", str(tmp_path / "no-model"), "--output",
                 str(tmp_path / "o"), "-q", "--metrics-file", str(prom))
    assert res.exit_code == 2, res.output
    fams = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    assert fams["cxr_screen_success"].samples[0].value == 0
    assert fams["cxr_screen_scored_files"].samples[0].value == 12  # the last success's, kept
    assert fams["cxr_screen_last_success_timestamp_seconds"].samples[0].value < \
        fams["cxr_screen_last_run_timestamp_seconds"].samples[0].value


def test_rerun_scores_only_new_or_changed_files(screened, data_dir) -> None:
    out, archive = screened["out"], screened["archive"]
    parts_before = S.list_parts(*open_fs(str(out)))
    res = invoke("screen", str(archive), "--model", str(screened["model"]), "--output", str(out), "-q")
    assert res.exit_code == 0, res.output
    assert f"scored: 0  skipped (already done): {N_INPUTS}  errors: 0" in res.output
    assert "positives: n/a" in res.output and "nothing new to score" in res.output
    assert S.list_parts(*open_fs(str(out))) == parts_before
    # one file changes content, one new file arrives: exactly two rows are added
    changed = screened["made"]["copy"]
    changed.write_bytes(sorted((data_dir / "train" / "NORMAL").glob("*.jpeg"))[10].read_bytes())
    new = archive / "NORMAL" / "new arrival.jpeg"
    shutil.copy(sorted((data_dir / "train" / "NORMAL").glob("*.jpeg"))[11], new)
    res = invoke("screen", str(archive), "--model", str(screened["model"]), "--output", str(out), "-q")
    assert res.exit_code == 0, res.output
    assert f"scored: 2  skipped (already done): {N_INPUTS - 1}  errors: 0" in res.output
    raw = S.read_parts(str(out)).column("path").to_pylist()
    assert len(raw) == N_INPUTS + 2 and raw.count(str(changed)) == 2
    rows = _rows(out)
    assert len(rows) == N_INPUTS + 1
    import hashlib

    assert rows[str(changed)]["sha256"] == hashlib.sha256(changed.read_bytes()).hexdigest()  # newest row wins


def test_a_rerun_skips_unchanged_files_without_reading_them(ray_local, tiny_model, tmp_path, sample_images) -> None:
    """Path, size and modification time as last scored: not read, not hashed, no Ray pipeline at all.
    A file modified within the last minute (SETTLED_NS) is not trusted this way: it is read again."""
    archive, out = tmp_path / "a", tmp_path / "out"
    archive.mkdir()
    hour_ago = time.time_ns() - 3600 * 10**9
    for i, src in enumerate(sample_images[:3]):
        shutil.copy(src, archive / f"{i}.jpeg")
        if i < 2:
            os.utime(archive / f"{i}.jpeg", ns=(hour_ago, hour_ago))
    args = ["screen", str(archive), "-m", str(tiny_model), "-o", str(out), "--no-report"]
    assert invoke(*args).exit_code == 0
    rows = _rows(out)
    assert [rows[str(archive / f"{i}.jpeg")]["mtime_ns"] for i in range(3)] == [hour_ago, hour_ago, None]
    res = invoke(*args)  # the fresh file is hashed again (by the driver, no Ray: found done); the others are not
    assert res.exit_code == 0 and "scored: 0  skipped (already done): 3" in res.output, res.output
    assert "scoring actor" not in res.output and S.read_stats(str(out)) is None  # not settled: nothing recorded
    # a minute later its row still has no mtime: the next run hashes it once more, records its settled stat,
    # and the run after that skips it unread (before, every later run read it and started Ray for it)
    os.utime(archive / "2.jpeg", ns=(hour_ago + 5 * 10**9, hour_ago + 5 * 10**9))
    assert "scoring actor" not in invoke(*args).output
    stats = S.read_stats(str(out))
    assert stats is not None and stats.column("path").to_pylist() == [str(archive / "2.jpeg")]
    assert stats.column("mtime_ns").to_pylist() == [hour_ago + 5 * 10**9]
    res = invoke(*args)
    assert "scored: 0  skipped (already done): 3" in res.output and S.read_stats(str(out)).num_rows == 1
    settled = [*args, "--glob", "[01].jpeg"]
    res = invoke(*settled)
    assert "scored: 0  skipped (already done): 2" in res.output and "scoring actor" not in res.output, res.output
    data = bytearray((archive / "0.jpeg").read_bytes())  # changed: new content, same size, another time
    data[-3] ^= 0xFF
    (archive / "0.jpeg").write_bytes(bytes(data))
    os.utime(archive / "0.jpeg", ns=(hour_ago + 10**9, hour_ago + 10**9))
    res = invoke(*settled)
    assert "scored: 1  skipped (already done): 1" in res.output, res.output
    assert "checking 1 file(s) scored before" in res.output  # same size: maybe the same bytes, hashed first
    with open(archive / "1.jpeg", "ab") as f:  # another size: changed for sure, straight to the scoring step
        f.write(b"\0")
    os.utime(archive / "1.jpeg", ns=(hour_ago + 2 * 10**9, hour_ago + 2 * 10**9))
    res = invoke(*settled)
    assert "scored: 1  skipped (already done): 1" in res.output and "checking" not in res.output, res.output


def test_fail_on_error_exits_non_zero(screened, tmp_path) -> None:
    prom = tmp_path / "screen.prom"
    prom.write_text((screened["root"] / "screen.prom").read_text())  # a successful night's file
    res = invoke("screen", str(screened["archive"]), "--model", str(screened["model"]), "--output",
                 str(tmp_path / "o"), "--glob", "bad-*", "--fail-on-error", "--no-report", "--metrics-file", str(prom))
    assert res.exit_code == 1
    assert "6 file(s) could not be scored" in res.output
    fams = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    assert fams["cxr_screen_success"].samples[0].value == 0 and fams["cxr_screen_scored_files"].samples[0].value == 0
    assert "cxr_screen_last_success_timestamp_seconds" in fams  # kept: the staleness alert still has its series
    # progress (not a terminal: one line per event): what start-up waits for, then the rows
    assert "screen: 6 files  starting 1 scoring actor(s): " in res.output
    assert "screen: 6/6 new rows (100% of files)" in res.output and "errors 6" in res.output
    assert S.read_results(str(tmp_path / "o")).num_rows == len(BAD)


def test_report_command_from_existing_results(screened, tmp_path) -> None:
    manifest = tmp_path / "labels.csv"
    lines = ["path,label"] + [f"{p},PNEUMONIA" for p in _rows(screened["out"]) if "PNEUMONIA" in p]
    manifest.write_text("\n".join(lines) + "\n")
    res = invoke("report", str(screened["out"]), "--output", str(tmp_path / "rep"), "--labels", str(manifest))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "metrics.json").is_file() and (tmp_path / "rep" / "report.html").is_file()
    assert (screened["out"] / S.REPORT_DIR / "metrics.json").is_file()  # written by `cxr screen` itself


def test_a_report_to_an_object_store_uri_is_uploaded_not_written_to_a_local_s3_folder(screened, tmp_path,
                                                                                      monkeypatch) -> None:
    """`--output s3://b/rep` used to write ./s3:/b/rep and say it wrote s3://b/rep. pyarrow's in-memory
    mock:// filesystem stands in for the bucket (each URI opens a fresh one, so the upload itself is
    checked on a real non-local filesystem below)."""
    monkeypatch.chdir(tmp_path)
    res = invoke("report", str(screened["out"]), "--output", "mock:///bucket/rep")
    assert res.exit_code == 0, res.output
    assert "report: mock:///bucket/rep" in res.output and not (tmp_path / "mock:").exists()
    import pyarrow.fs as pafs

    from cxr.storage import upload_folder, writable_folder

    bucket = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    with writable_folder(str(tmp_path / "staged")) as folder:  # local: the folder itself
        assert folder == tmp_path / "staged"
        from cxr.report import write_report

        write_report(S.read_results(str(screened["out"])), folder)
    upload_folder(folder, bucket, "reports/nightly")
    assert {i.base_name for i in bucket.get_file_info(pafs.FileSelector("reports/nightly"))} >= {"metrics.json",
                                                                                                "report.html"}


def test_a_rerun_with_corrected_labels_corrects_the_report(screened, tmp_path) -> None:
    """--labels applies to every current row, also rows an earlier run scored (and this one skips)."""
    out = screened["out"]

    def support() -> dict[str, int]:
        per_class = json.loads((out / S.REPORT_DIR / "metrics.json").read_text())["classification"]["per_class"]
        return {c: per_class[c]["support"] for c in ("normal", "pneumonia")}

    before = support()
    flip = {"normal": "PNEUMONIA", "pneumonia": "NORMAL"}
    manifest = tmp_path / "flipped.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{flip[r['true_label']]}\n"
                                                 for p, r in _rows(out).items() if r["true_label"]))
    res = invoke("screen", str(screened["archive"]), "--model", str(screened["model"]), "--output", str(out), "-q",
                 "--labels", str(manifest))
    assert res.exit_code == 0 and "scored: 0" in res.output, res.output
    assert "AUC" in res.output  # the report's headline, as `cxr report` prints it
    assert support() == {"normal": before["pneumonia"], "pneumonia": before["normal"]}


# --------------------------------------------------------------------------- one clear line, non-zero


def _one_error_line(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_missing_archive_unreadable_model_and_foreign_folder(ray_local, tiny_model, tmp_path, sample_images) -> None:
    archive = tmp_path / "a"
    archive.mkdir()
    shutil.copy(sample_images[0], archive)
    assert "archive not found" in _one_error_line(invoke("screen", str(tmp_path / "nope"), "-m", str(tiny_model),
                                                         "-o", str(tmp_path / "o1")))
    assert "model not found" in _one_error_line(invoke("screen", str(archive), "-m", str(tmp_path / "no-model"),
                                                       "-o", str(tmp_path / "o2")))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model.onnx").write_bytes(b"\x08\x07garbage")
    assert "unreadable model" in _one_error_line(invoke("screen", str(archive), "-m", str(broken), "-o", str(tmp_path / "o3")))
    classes = ["normal", "pneumonia"]
    foreign = tmp_path / "foreign"
    _folder_of_another_model(foreign)
    line = _one_error_line(invoke("screen", str(archive), "-m", str(tiny_model), "-o", str(foreign)))
    assert "another model" in line and "--new-model rescore" in line
    # a folder another model claimed but never wrote a result to (its run failed first) is free
    claimed = tmp_path / "claimed"
    S.write_state(str(claimed), "e" * 64, "failed-run", classes)
    res = invoke("screen", str(archive), "-m", str(tiny_model), "-o", str(claimed), "-q", "--no-report")
    assert res.exit_code == 0 and S.read_results(str(claimed)).num_rows == 1, res.output
    assert not (claimed / S.RESULTS_DIR / S.TMP_DIR).exists()  # no empty scratch folder left behind
    assert "not a cxr screening folder" in _one_error_line(invoke("report", str(archive), "-o", str(tmp_path / "r")))


def test_file_system_mistakes_are_one_line_each(ray_local, tiny_model, tmp_path, sample_images) -> None:
    """An output that is a file, the archive as its own output, a stale export: no traceback, exit 2."""
    archive = tmp_path / "a"
    archive.mkdir()
    shutil.copy(sample_images[0], archive)
    (tmp_path / "afile").write_text("x")
    assert "File exists" in _one_error_line(invoke("screen", str(archive), "-m", str(tiny_model), "-o",
                                                   str(tmp_path / "afile")))
    assert "is the archive or holds it" in _one_error_line(invoke("screen", str(archive), "-m", str(tiny_model),
                                                                  "-o", str(archive)))
    assert "is the archive or holds it" in _one_error_line(invoke("screen", str(archive), "-m", str(tiny_model),
                                                                  "-o", str(tmp_path)))
    stale = tmp_path / "stale"
    shutil.copytree(tiny_model, stale)
    meta = json.loads((stale / "metadata.json").read_text())
    meta["preprocess"]["image_size"] *= 2  # metadata of another export than the graph's
    (stale / "metadata.json").write_text(json.dumps(meta))
    assert "export the model again" in _one_error_line(invoke("screen", str(archive), "-m", str(stale), "-o",
                                                              str(tmp_path / "o")))
    empty = tmp_path / "empty"
    empty.mkdir()
    res = invoke("screen", str(empty), "-m", str(tiny_model), "-o", str(tmp_path / "oe"), "-q")
    assert res.exit_code == 0 and "warning: no input files under" in res.output, res.output


def test_a_second_run_on_a_busy_output_exits_75_and_reports_no_failure(screened, tmp_path) -> None:
    """An overlapping nightly run (a retried cron) is refused before anything starts: EX_TEMPFAIL, and no
    cxr_screen_success 0 for a run that is healthy in the other process."""
    import fcntl

    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(str(out / S.LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the running `cxr screen` holds
        res = invoke("screen", str(screened["archive"]), "-m", str(screened["model"]), "-o", str(out), "-q",
                     "--metrics-file", str(tmp_path / "m.prom"))
    finally:
        os.close(fd)
    assert res.exit_code == 75, res.output
    assert res.output.strip().splitlines() == [f"error: another `cxr screen` is writing to {out}; wait for it or "
                                               "use another --output"], res.output
    assert not (tmp_path / "m.prom").exists()


def test_a_metrics_file_that_cannot_be_written_fails_after_the_summary(screened, tmp_path) -> None:
    (tmp_path / "m.prom").mkdir()  # a folder where the file should go
    res = invoke("screen", str(screened["archive"]), "--model", str(screened["model"]), "--output",
                 str(screened["out"]), "-q", "--no-report", "--metrics-file", str(tmp_path / "m.prom"))
    assert res.exit_code == 2 and "scored: 0" in res.output, res.output  # the results are not hidden
    assert res.output.strip().splitlines()[-1].startswith("error: Is a directory"), res.output
    (tmp_path / "afile").write_text("x")
    line = _one_error_line(invoke("report", str(screened["out"]), "-o", str(tmp_path / "afile")))
    assert line.startswith("error: File exists") and "afile" in line
    os.environ["CXR_DEBUG"] = "1"  # the traceback behind the line, on request
    try:
        with pytest.raises(FileExistsError):
            invoke("report", str(screened["out"]), "-o", str(tmp_path / "afile"))
    finally:
        del os.environ["CXR_DEBUG"]


def _folder_of_another_model(out: Path) -> None:
    classes = ["normal", "pneumonia"]
    S.write_state(str(out), "f" * 64, "old-model", classes)
    writer = S.PartWriter(str(out), S.result_schema(classes))
    writer.add(pa.Table.from_pylist([{"path": "/elsewhere/x.jpeg", "model_id": "f" * 64}], schema=writer.schema))
    writer.flush()
    S.record_stats(str(out), [{"path": "/elsewhere/x.jpeg", "size_bytes": 1, "mtime_ns": 1, "sha256": "0" * 64,
                               "model_id": "f" * 64}])


@pytest.mark.parametrize("flag", ["--force", "--new-model=rescore"])
def test_force_sets_another_models_results_aside(ray_local, tiny_model, tmp_path, sample_images, flag) -> None:
    """--force (or --new-model rescore) onto a folder of another model's results moves them to replaced/
    instead of deleting them."""
    archive = tmp_path / "a"
    archive.mkdir()
    shutil.copy(sample_images[0], archive)
    out = tmp_path / "out"
    _folder_of_another_model(out)
    screen = ["screen", str(archive), "-m", str(tiny_model), "-o", str(out), "-q", "--no-report"]
    refused = CliRunner().invoke(main, screen, catch_exceptions=False)
    assert refused.exit_code == 2 and "--new-model rescore" in refused.output, refused.output
    res = CliRunner().invoke(main, [*screen, flag], catch_exceptions=False)
    assert res.exit_code == 0 and "moved to" in res.output, res.output
    kept = list((out / S.REPLACED_DIR).glob(f"{'f' * 12}-*/{S.RESULTS_DIR}/part-*.parquet"))
    assert len(kept) == 1 and pq.read_table(kept[0]).column("model_id")[0].as_py() == "f" * 64
    assert S.read_stats(str(out)) is None and len(list((out / S.REPLACED_DIR).glob(f"*/{S.STATS_DIR}/*"))) == 1
    assert {r["path"] for r in S.read_results(str(out)).to_pylist()} == {str(archive / sample_images[0].name)}
    if flag.startswith("--new-model"):  # a nightly job keeps the flag: the next night resumes, it does not rescore
        again = CliRunner().invoke(main, [*screen, flag], catch_exceptions=False)
        assert again.exit_code == 0 and "skipped (already done): 1" in again.output, again.output
        assert len(list((out / S.REPLACED_DIR).iterdir())) == 1 and len(S.list_parts(*open_fs(str(out)))) == 1


def test_a_task_failure_is_reported_by_its_cause_not_by_rays_retry_advice() -> None:
    from ray.data._internal.util import _annotate_exception_with_retry_context

    from jobs.screen import _root_message

    exc = _annotate_exception_with_retry_context(
        RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got: 64 Expected: 224"), description="run a task",
        attempts=1, max_attempts=1, total_backoff_s=0.0, exception_str="")
    assert "To change retry attempts" in str(exc)  # what Ray appends (the test must see it to mean anything)
    assert _root_message(exc) == "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got: 64 Expected: 224"


# --------------------------------------------------------------------------- SIGKILL mid-run, then resume


def test_kill9_then_rerun_equals_an_uninterrupted_run(screened, ray_local, tmp_path, data_dir) -> None:
    files = sorted((data_dir / "train" / "PNEUMONIA").glob("*.jpeg"))[:60]
    archive = tmp_path / "arch"
    archive.mkdir()
    for p in files:
        os.symlink(p, archive / p.name)
    model = str(screened["model"])
    killed = tmp_path / "killed"
    # the job connects to the running Ray instance like a nightly job to its cluster; SIGKILL takes
    # the driver down and Ray cleans up the job's tasks and actors
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*CXR, "screen", str(archive), "-m", model, "-o", str(killed), "--batch-size", "2",
                             "--part-rows", "2", "--no-report", "-q"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(S.list_parts(*open_fs(str(killed)))) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read().decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started (its own session)
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    partial = S.read_parts(str(killed)).num_rows
    assert 0 < partial < len(files)

    res = invoke("screen", str(archive), "-m", model, "-o", str(killed), "-q", "--no-report", "--batch-size", "8")
    assert res.exit_code == 0, res.output
    assert f"scored: {len(files) - partial}  skipped (already done): {partial}" in res.output
    ref_out = tmp_path / "reference"
    assert invoke("screen", str(archive), "-m", model, "-o", str(ref_out), "-q", "--no-report").exit_code == 0

    raw = S.read_parts(str(killed)).column("path").to_pylist()
    assert len(raw) == len(set(raw)) == len(files)  # nothing duplicated, nothing missing
    got, ref = _rows(killed), _rows(ref_out)
    assert got.keys() == ref.keys()
    for path, r in ref.items():
        g = got[path]
        assert (g["label"], g["sha256"], g["error_code"]) == (r["label"], r["sha256"], r["error_code"])
        assert abs(g["prob_pneumonia"] - r["prob_pneumonia"]) < 1e-5
    assert not (killed / "results" / "_tmp").exists()  # the rerun cleared what the kill left half-written
    assert all(pq.read_metadata(p).num_rows > 0 for p in S.list_parts(*open_fs(str(killed))))


def test_sigterm_flushes_what_was_scored_and_exits_143(screened, ray_local, tmp_path, data_dir) -> None:
    """Kubernetes stops a job with SIGTERM: Ctrl-C's path (rows flushed, one line), not Ray's sys.exit or
    its core worker's stack dump and abort (exit 134); the rerun completes the archive exactly once."""
    files = sorted((data_dir / "train" / "NORMAL").glob("*.jpeg"))[:40]
    archive = tmp_path / "arch"
    archive.mkdir()
    for p in files:
        os.symlink(p, archive / p.name)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*CXR, "screen", str(archive), "-m", str(screened["model"]), "-o", str(out),
                             "--batch-size", "2", "--part-rows", "2", "--no-report", "-q",
                             "--metrics-file", str(tmp_path / "m.prom")], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and len(S.list_parts(*open_fs(str(out)))) < 2:
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before SIGTERM:\n{proc.stdout.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGTERM)  # the driver only, as the kubelet does to a container's process
        text = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, text[-2000:]
    assert text.strip().splitlines()[-1] == "terminated (SIGTERM)", text[-2000:]
    assert "SIGTERM received" not in text and "Traceback" not in text, text[-2000:]
    assert "cxr_screen_success 0.0" in (tmp_path / "m.prom").read_text()
    partial = S.read_parts(str(out)).num_rows
    assert 0 < partial < len(files)
    res = invoke("screen", str(archive), "-m", str(screened["model"]), "-o", str(out), "-q", "--no-report")
    assert res.exit_code == 0 and f"skipped (already done): {partial}" in res.output, res.output
    paths = S.read_parts(str(out)).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == len(files)


def test_scorer_turns_non_finite_probabilities_into_error_rows(tiny_model) -> None:
    """The actor class alone (no Ray): a NaN input that got past decoding must give an error row, not a label."""
    from jobs.screen import Scorer

    scorer = Scorer(str(tiny_model), "onnx", threads=1)
    images = np.zeros((3, 1, 64, 64), np.float32)
    images[1, 0, 5, 5] = np.nan
    batch = {"path": np.array(["a", "b", "c"], dtype=object), "size_bytes": np.array([1, 1, 1]),
             "sha256": np.array(["1" * 64, "2" * 64, "3" * 64], dtype=object), "width": np.array([64] * 3),
             "height": np.array([64] * 3), "error_code": np.array(["", "", "empty"], dtype=object),
             "error": np.array(["", "", "empty input"], dtype=object), "image": images,
             "mtime_ns": np.array([-1, 7, -1])}
    rows = scorer(batch).to_pylist()
    assert rows[0]["label"] in ("normal", "pneumonia") and rows[0]["error_code"] is None
    assert rows[1]["label"] is None and rows[1]["error_code"] == "corrupt" and "non-finite" in rows[1]["error"]
    assert rows[2]["error_code"] == "empty" and rows[2]["error"] == "empty input"
    assert [r["mtime_ns"] for r in rows] == [None, 7, None]


def test_prepare_refuses_a_file_over_the_size_cap_without_reading_it(tmp_path, sample_images) -> None:
    """The decode task alone (no Ray): a sparse 65 MiB 'image' is hashed in chunks and becomes a too_large row."""
    import dataclasses
    import hashlib

    from cxr.config import PreprocessConfig
    from jobs.screen import prepare

    big = tmp_path / "huge.dcm"
    with open(big, "wb") as f:
        f.truncate(65 << 20)  # over max(64 MiB, 8 bytes x 1000 pixels)
    good = sample_images[0]
    batch = {"path": np.array([str(big), str(good)], dtype=object),
             "fs_path": np.array([str(big), str(good)], dtype=object),
             "size": np.array([big.stat().st_size, good.stat().st_size]), "mtime_ns": np.array([-1, -1])}
    pre = dataclasses.asdict(PreprocessConfig(image_size=32, max_pixels=1000))
    out = prepare(batch, fs=None, pre=pre, done=None)
    assert list(out["error_code"]) == ["too_large", "too_large"]  # the 224x224 film is over 1000 px as well
    assert "over the cap of 67108864 bytes" in out["error"][0] and "pixels exceeds the cap" in out["error"][1]
    assert out["sha256"][0] == hashlib.sha256(bytes(65 << 20)).hexdigest()
    assert out["size_bytes"][0] == 65 << 20 and out["image"].shape == (2, 1, 32, 32)


def test_prepare_types_a_block_whose_files_are_all_done(tmp_path, sample_images, caplog) -> None:
    """A rerun's block with nothing new is a 0-row table with the tensor column's type: Ray Data does not
    fall back to pickling it (and say so on every rerun)."""
    import dataclasses
    import hashlib
    import logging

    from cxr.config import PreprocessConfig
    from jobs.screen import prepare

    good = sample_images[0]
    batch = {"path": np.array([str(good)], dtype=object), "fs_path": np.array([str(good)], dtype=object),
             "size": np.array([good.stat().st_size]), "mtime_ns": np.array([-1])}
    pre = dataclasses.asdict(PreprocessConfig(image_size=32))
    keys = np.array([S.resume_key(str(good), hashlib.sha256(good.read_bytes()).hexdigest())], dtype="S16")
    with caplog.at_level(logging.WARNING):
        table = prepare(batch, fs=None, pre=pre, done=keys)
    assert isinstance(table, pa.Table) and table.num_rows == 0
    image_type = table.schema.field("image").type
    assert "Tensor" in type(image_type).__name__ and image_type.shape == (1, 32, 32), image_type
    assert table.schema.field("path").type == pa.string()
    assert "Failed to convert" not in caplog.text
    assert prepare(batch, fs=None, pre=pre, done=None)["image"].shape == (1, 1, 32, 32)

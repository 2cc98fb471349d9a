"""`cxr screen`, `cxr report` and `cxr train --storage` against a real S3 protocol endpoint.

Production archives, results and checkpoints live in object stores (S3, MinIO, GCS); a local folder
does not exercise what differs there: no real directories, a ``?endpoint_override=`` query that
every rebuilt URI must keep, reports written locally and uploaded. moto's S3 server runs as its own
process on 127.0.0.1 and pyarrow's real S3 client (in the driver and in every Ray worker) talks HTTP
to it, as it would to MinIO. Credentials come from the environment, as on a cluster.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from click.testing import CliRunner

from cxr import screening as S
from cxr.cli import main

BUCKET = "xrays"
SAMPLES = Path(__file__).resolve().parents[1] / "cxr" / "assets" / "samples" / "train"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "cxr-test", "AWS_SECRET_ACCESS_KEY": "cxr-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3:
    """A moto S3 server process and pyarrow's client for it."""

    def __init__(self, port: int) -> None:
        self.query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        self.fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                                    allow_bucket_creation=True)

    def uri(self, key: str) -> str:
        return f"s3://{BUCKET}/{key}?{self.query}"

    def put(self, key: str, data: bytes) -> None:
        with self.fs.open_output_stream(f"{BUCKET}/{key}") as f:
            f.write(data)

    def keys(self, prefix: str) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
        return sorted(i.path.removeprefix(f"{BUCKET}/") for i in infos if i.type == pafs.FileType.File)


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[S3]:
    """The endpoint, with AWS credentials in the environment before this module's Ray starts (its workers
    inherit them)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with pytest.MonkeyPatch.context() as mp, open(log, "w") as out:
        for key, value in AWS_ENV.items():
            mp.setenv(key, value)
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}") from None
                    time.sleep(0.2)
            store = S3(port)
            store.fs.create_dir(BUCKET)
            yield store
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def ray_s3(s3, ray_local):
    """This module's local Ray, started after ``s3`` set the credentials."""
    yield ray_local


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_screen_resume_and_report_on_an_object_store(s3, ray_s3, tiny_model, tmp_path) -> None:
    films = sorted(SAMPLES.glob("NORMAL/*.jpeg"))[:4] + sorted(SAMPLES.glob("PNEUMONIA/*.jpeg"))[:4]
    for film in films:
        s3.put(f"archive/{film.parent.name}/{film.name}", film.read_bytes())
    s3.put("archive/NORMAL/bad-text.jpeg", b"a radiology report, not an image")
    s3.put("archive/notes.txt", b"ignored")
    s3.put("archive/.staging/NORMAL/x.jpeg", films[0].read_bytes())  # hidden: a transfer in flight
    s3.put("archive/NORMAL/.x.jpeg.Xy12ab", b"\xff\xd8\xff half a JPEG")
    archive, out, prom = s3.uri("archive"), s3.uri("screens"), tmp_path / "screen.prom"

    res = invoke("screen", archive, "--model", str(tiny_model), "--output", out, "--metrics-file", str(prom), "-q")
    assert res.exit_code == 0, res.output
    # the report went to the bucket and its headline was read back from there (it used to be a local read)
    assert f"results: s3://{BUCKET}/screens/results?{s3.query}" in res.output and "AUC " in res.output
    assert {"screens/report/metrics.json", "screens/report/report.html", "screens/report/roc.png"} <= set(
        s3.keys("screens/report"))
    metrics_text = prom.read_text()  # written after the report's headline: it used to be lost with it
    assert "cxr_screen_scored_files 8.0" in metrics_text and "cxr_screen_success 1.0" in metrics_text
    assert "cxr_screen_hidden_entries 2.0" in metrics_text  # the two hidden objects: no rows
    rows = {r["path"]: r for r in S.read_results(out).to_pylist()}
    assert len(rows) == 9 and all(p.startswith(f"s3://{BUCKET}/archive/") for p in rows)
    assert rows[f"s3://{BUCKET}/archive/NORMAL/bad-text.jpeg"]["error_code"] == "not_image"
    assert {r["true_label"] for r in rows.values()} == {"normal", "pneumonia"}  # from the folders in the bucket
    parts = s3.keys("screens/results")

    again = invoke("screen", archive, "--model", str(tiny_model), "--output", out, "-q")
    assert again.exit_code == 0, again.output
    assert "skipped (already done): 9" in again.output and s3.keys("screens/results") == parts  # no new part, no row twice

    rep = invoke("report", out, "--output", s3.uri("reports/nightly"))
    assert rep.exit_code == 0, rep.output
    metrics = json.loads(s3.fs.open_input_stream(f"{BUCKET}/reports/nightly/metrics.json").read())
    assert metrics["classification"]["per_class"]["normal"]["support"] == 4


def test_train_checkpoints_to_an_object_store_and_resumes_from_it(s3, ray_s3, tmp_path) -> None:
    storage, out = s3.uri("ckpt/r1"), tmp_path / "run"
    tiny = ["--data", str(SAMPLES.parent), "--output", str(out), "--preset", "tiny", "--image-size", "32",
            "--batch-size", "4", "--workers", "2", "--storage", storage]
    res = invoke("train", *tiny)
    assert res.exit_code == 0, res.output
    assert any(k.startswith("ckpt/r1/train/checkpoint_") for k in s3.keys("ckpt/r1/train"))
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()  # nothing landed in a local "s3:" folder
    model_id = json.loads((out / "model" / "metadata.json").read_text())["model_id"]

    refused = invoke("train", *tiny)  # the same run again without --resume: its checkpoint in the bucket counts
    assert refused.exit_code == 2 and f"s3://{BUCKET}/ckpt/r1/train?{s3.query}" in refused.output

    (out / "model" / "metadata.json").unlink()
    resumed = invoke("train", "--data", str(SAMPLES.parent), "--output", str(out), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "the run had finished" in resumed.output  # read back from the bucket's checkpoint, no training
    assert json.loads((out / "model" / "metadata.json").read_text())["model_id"] == model_id

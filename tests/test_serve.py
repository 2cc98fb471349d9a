"""`cxr serve`: the real app over HTTP on 127.0.0.1 in a local Ray instance (tiny 64-px model).

One Ray instance and one deployment for the module (Ray start dominates the
time); a separate test runs the `cxr serve` command itself and stops it with
Ctrl-C. Never port 8000: every port is picked free.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import os
import re
import signal
import subprocess
import threading
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cxr.config import AutoscalingConfig, ServeConfig, from_dict
from cxr.errors import CxrError
from serve.schema import DEPLOYMENT_NAME, app_args, serve_config_document, to_yaml

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ------------------------------------------------------------------ no Ray needed
def test_every_image_error_code_has_its_http_status() -> None:
    """A new ImageError code must be given a status on purpose (the fallback 422 would blame the image)."""
    from cxr.errors import ImageError
    from serve.app import IMAGE_ERROR_STATUS

    assert set(IMAGE_ERROR_STATUS) == set(ImageError.CODES)
    assert IMAGE_ERROR_STATUS["out_of_memory"] == 503 and IMAGE_ERROR_STATUS["too_large"] == 413


def test_config_yaml_is_generated_from_serve_config() -> None:
    """serve/config.yaml == serve_config_document(ServeConfig()) and is a valid Serve config."""
    from ray.serve.schema import ServeDeploySchema

    committed = (ROOT / "serve" / "config.yaml").read_text()
    doc = serve_config_document(ServeConfig())
    assert yaml.safe_load(committed) == doc, "serve/config.yaml drifted: run `python -m serve.schema > serve/config.yaml`"
    assert committed == to_yaml(doc)
    ServeDeploySchema.model_validate(doc)
    app = doc["applications"][0]
    assert app["import_path"] == "serve.app:build_app" and app["deployments"][0]["name"] == DEPLOYMENT_NAME


def test_config_document_follows_the_typed_config() -> None:
    cfg = ServeConfig(model="/m", gpus_per_replica=0.5, max_batch_size=8, max_queued_requests=10,
                      overload_status_code=429, autoscaling=AutoscalingConfig(min_replicas=2, max_replicas=6))
    dep = serve_config_document(cfg)["applications"][0]["deployments"][0]
    assert dep["ray_actor_options"]["num_gpus"] == 0.5
    assert dep["autoscaling_config"]["min_replicas"] == 2 and dep["autoscaling_config"]["max_replicas"] == 6
    assert dep["user_config"] == {"max_batch_size": 8, "batch_wait_ms": 10.0}
    assert dep["max_queued_requests"] == 10 and dep["backpressure_config"]["status_code"] == 429
    assert serve_config_document(cfg)["applications"][0]["args"]["model"] == "/m"


def test_replica_args_carry_every_field_the_replica_reads() -> None:
    """The replica rebuilds its ServeConfig from ``app_args`` alone: with engine_threads 0 its engine runs
    cpus_per_replica threads, so that field must travel too (it used to arrive as the default 1.0)."""
    cfg = ServeConfig(model="/m", engine="onnx", engine_threads=0, cpus_per_replica=3.0, preprocess_threads=5,
                      max_batch_images=7, max_body_mb=2.5, request_timeout_s=9.0)
    back = from_dict(ServeConfig, app_args(cfg))
    for name in ("model", "engine", "engine_threads", "cpus_per_replica", "preprocess_threads", "max_batch_images",
                 "max_body_mb", "request_timeout_s"):
        assert getattr(back, name) == getattr(cfg, name), name


def test_multipart_parser_keeps_binary_bytes() -> None:
    import httpx

    from serve.app import image_parts, parse_multipart

    blob = bytes(range(256)) * 4 + b"\r\n--\r\n\r\n" + bytes(range(256))
    req = httpx.Request("POST", "http://x/", files=[("files", ("a.png", blob, "image/png")),
                                                   ("files", ("b.dcm", b"\r\n", "application/dicom"))],
                        data={"note": "not a file"})
    body = req.read()
    parts = parse_multipart(req.headers["content-type"], body)
    assert [p[1] for p in parts] == [None, "a.png", "b.dcm"] or [p[1] for p in parts] == ["a.png", "b.dcm", None]
    files = image_parts(parts)
    assert [f for f, _ in files] == ["a.png", "b.dcm"] and files[0][1] == blob and files[1][1] == b"\r\n"


def test_multipart_limits_come_before_the_parsing() -> None:
    """The stdlib's parameter parser is quadratic: a 209 KB part header held a replica's event loop for
    35 s, its health checks included (a security review). Long headers and surplus parts are refused."""
    from serve.app import ApiError, MAX_HEADER_BYTES, parse_multipart

    ctype = "multipart/form-data; boundary=XyZ"
    evil = b'--XyZ\r\nContent-Disposition: form-data; name="file"; x="' + b';"' * 100_000 + b'\r\n\r\nabc\r\n--XyZ--\r\n'
    t0 = time.perf_counter()
    with pytest.raises(ApiError) as err:
        parse_multipart(ctype, evil)
    assert err.value.code == "bad_multipart" and time.perf_counter() - t0 < 1.0
    with pytest.raises(ApiError) as err:
        parse_multipart(ctype + "; x=" + '";' * MAX_HEADER_BYTES, b"")
    assert err.value.code == "bad_multipart"
    many = b"".join(b'--XyZ\r\nContent-Disposition: form-data; name="f"\r\n\r\n\r\n' for _ in range(40)) + b"--XyZ--\r\n"
    with pytest.raises(ApiError) as err:
        parse_multipart(ctype, many, max_parts=32)
    assert err.value.status == 413 and err.value.code == "too_many_parts"
    assert len(parse_multipart(ctype, many, max_parts=40)) == 40


def test_cli_help_and_print_config() -> None:
    from click.testing import CliRunner

    from cxr.cli import main

    out = CliRunner().invoke(main, ["serve", "--help"])
    assert out.exit_code == 0
    for flag in ("--model", "--host", "--port", "--metrics-port", "--min-replicas", "--max-replicas",
                 "--gpus-per-replica", "--max-batch-size", "--batch-wait-ms"):
        assert flag in out.output
    out = CliRunner().invoke(main, ["serve", "--print-config", "--max-replicas", "3", "--gpus-per-replica", "0.25"])
    assert out.exit_code == 0, out.output
    doc = yaml.safe_load(out.output)
    assert doc["applications"][0]["deployments"][0]["autoscaling_config"]["max_replicas"] == 3
    assert doc["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] == 0.25


def test_print_config_for_a_cluster_keeps_host_and_model_path(tmp_path: Path) -> None:
    """What the README tells you to run for `serve deploy`: the host and the model path as given
    (a models/current symlink stays the symlink, so a promoted model is what new replicas load)."""
    from click.testing import CliRunner

    from cxr.cli import main

    (tmp_path / "models" / "m1").mkdir(parents=True)
    (tmp_path / "models" / "current").symlink_to("m1")
    current = str(tmp_path / "models" / "current")
    out = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--model", current, "--cpus-per-replica", "2",
                                    "--print-config"])
    assert out.exit_code == 0, out.output
    doc = yaml.safe_load(out.output)
    assert "do not edit" not in out.output and "serve deploy" in out.output  # the user's copy, to edit
    assert doc["http_options"]["host"] == "0.0.0.0"
    args = doc["applications"][0]["args"]
    assert args["model"] == current and args["cpus_per_replica"] == 2.0


@pytest.mark.parametrize("flags,expected", [
    (["--max-batch-size", "0"], "--max-batch-size"),
    (["--batch-wait-ms", "-1"], "--batch-wait-ms"),
    (["--max-ongoing-requests", "0"], "--max-ongoing-requests"),
    (["--max-queued-requests", "-2"], "--max-queued-requests"),
    (["--max-queued-requests", "0"], "error: invalid Serve config: "),  # Ray's schema refuses it: one line
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cli_refuses_out_of_range_values_in_one_line(flags: list[str], expected: str) -> None:
    from click.testing import CliRunner

    from cxr.cli import main

    out = CliRunner().invoke(main, ["serve", *flags, "--print-config"])
    assert out.exit_code == 2 and expected in out.output, out.output
    assert "Traceback" not in out.output and not isinstance(out.exception, (ValueError, TypeError)), out.output


def test_cxr_serve_refuses_a_broken_export_before_ray_starts(tiny_model: Path, tmp_path: Path) -> None:
    """A corrupt model.onnx used to pass the metadata check and crash every replica as it loaded."""
    import shutil

    from serve.runner import free_port

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model.onnx").write_bytes(b"\x08\x07garbage")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CXR_API_TOKEN")}
    t0 = time.monotonic()
    proc = subprocess.run([str(Path(sys.executable).with_name("cxr")), "serve", "--model", str(broken), "--engine", "onnx",
                           "--port", str(free_port()), "--metrics-port", str(free_port()), "--num-cpus", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "unreadable model" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and time.monotonic() - t0 < 60  # no Ray started, no replica waited for


def test_api_token_is_read_the_same_by_cli_and_replicas(monkeypatch) -> None:
    """One function for both: unset = no auth; a Secret file's newline stripped; blank = an error."""
    from serve.schema import api_token

    monkeypatch.delenv("CXR_API_TOKEN", raising=False)
    assert api_token() is None
    monkeypatch.setenv("CXR_API_TOKEN", " s3cret\n")
    assert api_token() == "s3cret"
    monkeypatch.setenv("CXR_API_TOKEN", " \n")
    with pytest.raises(CxrError, match="set but empty"):
        api_token()


def test_an_empty_api_token_is_refused_not_taken_for_no_auth(tiny_model: Path) -> None:
    """CXR_API_TOKEN=' ' used to print 'bearer token required' and then serve without auth."""
    from serve.runner import free_port

    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "CXR_API_TOKEN": " \n"}
    proc = subprocess.run([str(Path(sys.executable).with_name("cxr")), "serve", "--model", str(tiny_model),
                           "--port", str(free_port()), "--metrics-port", str(free_port()), "--num-cpus", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "CXR_API_TOKEN is set but empty" in errors[0], proc.stderr


def test_cxr_serve_refuses_gpu_replicas_on_a_local_ray_without_gpus(tiny_model: Path) -> None:
    """It used to wait 300 s for a replica that could never be placed, then blame the app."""
    from serve.runner import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CXR_API_TOKEN")}
    t0 = time.monotonic()
    proc = subprocess.run([str(Path(sys.executable).with_name("cxr")), "serve", "--model", str(tiny_model),
                           "--gpus-per-replica", "1", "--port", str(free_port()), "--metrics-port", str(free_port()),
                           "--num-cpus", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "--gpus-per-replica 1 but this machine has 0 GPU" in proc.stderr, proc.stderr
    assert time.monotonic() - t0 < 120


# ------------------------------------------------------------------ `cxr serve` itself, Ctrl-C
@pytest.mark.slow
def test_cxr_serve_command_starts_answers_and_drains_on_sigterm(tiny_model: Path, sample_images: list[Path]) -> None:
    import httpx

    from serve.runner import free_port, port_free

    port, mport = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CXR_API_TOKEN")}
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("cxr")), "serve", "--model", str(tiny_model), "--port", str(port), "--metrics-port", str(mport),
         "--num-cpus", "2", "--max-replicas", "1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []  # read by a thread: the deadline holds, and the server never blocks on a full pipe
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not any("Ctrl-C to stop" in ln for ln in lines):
            time.sleep(0.5)
        text = "".join(lines)
        assert f"http://127.0.0.1:{port}/v1/predict" in text and f"http://127.0.0.1:{port}/docs" in text, text
        assert f"http://127.0.0.1:{mport}/metrics" in text, text
        r = httpx.post(f"http://127.0.0.1:{port}/v1/predict", content=sample_images[0].read_bytes(),
                       headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert r.status_code == 200 and r.json()["label"] in ("normal", "pneumonia")
        # the model-info gauge (the dashboard's cluster selector) outlives Ray's gauge expiry, ~20-30 s after
        # it was last set at Ray's default report interval, which this server keeps: it is set again on
        # every health check
        seen = []
        for _ in range(12):
            text_m = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=10).text
            seen.append(len(re.findall(r"^ray_cxr_model_info\{", text_m, re.M)))
            time.sleep(3.0)
        first = next((i for i, n in enumerate(seen) if n), None)
        assert first is not None and min(seen[first:]) >= 1, seen
        # SIGTERM (what docker/Kubernetes send) while requests are in flight: each still gets its answer
        big = io.BytesIO()  # ~36 Mpx: a second or so to decode, so the requests are in flight at the signal
        Image.linear_gradient("L").resize((6000, 6000)).save(big, format="PNG")
        answers: list[object] = []
        answered_at: list[float] = []

        def post() -> None:
            try:
                answers.append(httpx.post(f"http://127.0.0.1:{port}/v1/predict", content=big.getvalue(),
                                          headers={"Content-Type": "image/png"}, timeout=60).status_code)
            except httpx.HTTPError as exc:  # a connection dropped mid-request: what a drain must prevent
                answers.append(type(exc).__name__)
            answered_at.append(time.monotonic())

        clients = [threading.Thread(target=post) for _ in range(3)]
        for t in clients:
            t.start()
        time.sleep(0.5)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in clients:
            t.join(90)
        proc.wait(timeout=120)
        reader.join(10)
        rest = "".join(lines)
        assert answers == [200, 200, 200], (answers, rest[-3000:])
        assert max(answered_at) > signalled, "no request was in flight at the signal: the drain went untested"
        assert proc.returncode == 0, rest
        assert "draining" in rest and "stopped." in rest
        assert port_free("127.0.0.1", port) and port_free("127.0.0.1", mport)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


# ------------------------------------------------------------------ the app over HTTP
@pytest.fixture(scope="module")
def server(tiny_model: Path):
    """Local Ray (metrics reported every second) + the app, with a bearer token and small limits."""
    from serve import runner

    os.environ.pop("RAY_ADDRESS", None)
    old_token = os.environ.get("CXR_API_TOKEN")
    # before ray.init: replicas inherit the environment; the trailing newline is what a Secret file often has
    os.environ["CXR_API_TOKEN"] = TOKEN + "\n"
    cfg = ServeConfig(model=str(tiny_model), port=runner.free_port(), metrics_port=runner.free_port(),
                      max_body_mb=1.0, max_ongoing_requests=2, max_queued_requests=2, max_batch_size=4,
                      batch_wait_ms=20.0, health_check_period_s=2.0, cpus_per_replica=2.0,
                      autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1))
    started = runner.start(cfg, num_cpus=2, metrics_report_interval_ms=1000)
    try:
        yield started
    finally:
        runner.stop(started)
        if old_token is None:
            os.environ.pop("CXR_API_TOKEN", None)
        else:
            os.environ["CXR_API_TOKEN"] = old_token


@pytest.fixture(scope="module")
def client(server):
    import httpx

    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def expected(tiny_model: Path, sample_images: list[Path]) -> dict[Path, np.ndarray]:
    """What `cxr screen` computes: the same engine and THE preprocess, in-process."""
    from cxr.engine import load_engine
    from cxr.preprocess import preprocess

    engine = load_engine(tiny_model)
    pre = engine.meta.preprocess
    return {p: engine.predict_proba(preprocess(p.read_bytes(), pre)[None])[0] for p in sample_images}


def _predict(client, data: bytes, ctype: str = "image/jpeg", headers: dict | None = None):
    return client.post("/v1/predict", content=data, headers={"Content-Type": ctype, **AUTH, **(headers or {})})


def test_predict_equals_the_screening_engine(client, sample_images, expected, tiny_model) -> None:
    from cxr.export import read_metadata

    meta = read_metadata(tiny_model)
    for path in (sample_images[0], sample_images[-1]):
        r = _predict(client, path.read_bytes(), headers={"X-Request-ID": f"t-{path.stem}"})
        assert r.status_code == 200, r.text
        body = r.json()
        got = np.array([body["probabilities"][c] for c in meta.classes])
        np.testing.assert_allclose(got, expected[path], atol=1e-5)
        assert body["model_id"] == meta.model_id and body["threshold"] == pytest.approx(meta.threshold)
        assert body["label"] == ("normal" if 1 - got[0] < meta.threshold else "pneumonia")
        assert body["request_id"] == f"t-{path.stem}" and body["latency_ms"] > 0
        assert r.headers["x-model-id"] == meta.model_id
    # multipart gives the same answer as the raw body
    path = sample_images[1]
    r = client.post("/v1/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")}, headers=AUTH)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose([r.json()["probabilities"][c] for c in meta.classes], expected[path], atol=1e-5)


def test_png_and_dicom_bodies(client) -> None:
    from PIL import Image

    arr = (np.linspace(0, 255, 96 * 80).reshape(96, 80)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    assert _predict(client, buf.getvalue(), "image/png").status_code == 200
    dcm = _dicom_bytes(arr.astype(np.uint16) * 16)
    r = _predict(client, dcm, "application/dicom")
    assert r.status_code == 200, r.text


def _dicom_bytes(pixels: np.ndarray) -> bytes:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def test_batch_endpoint_with_a_bad_item(client, sample_images, expected) -> None:
    good = sample_images[2:4]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in good]
    files.append(("files", ("cut.jpeg", good[0].read_bytes()[:600], "image/jpeg")))
    r = client.post("/v1/predict/batch", files=files, headers=AUTH)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == [0, 1, 2]
    for item, path in zip(results[:2], good):
        np.testing.assert_allclose([item["probabilities"]["normal"], item["probabilities"]["pneumonia"]],
                                   expected[path], atol=1e-5)
    assert results[2]["error"]["code"] in ("truncated", "corrupt") and "probabilities" not in results[2]


def test_model_health_ready_docs(client, tiny_model) -> None:
    from cxr.export import read_metadata

    meta = read_metadata(tiny_model)
    r = client.get("/v1/model", headers=AUTH)
    assert r.status_code == 200 and r.json()["model_id"] == meta.model_id
    assert r.json()["classes"] == ["normal", "pneumonia"] and r.json()["serving"]["auth"] is True
    assert r.json()["serving"]["engine_threads"] == 2  # engine_threads 0 = cpus_per_replica (2 here)
    assert not {"data", "output", "storage"} & set(r.json().get("train_config") or {})
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    assert client.get("/docs").status_code == 200
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    assert r.headers["cache-control"] == "no-store"  # answers about patients are not for caches
    # no trailing-slash redirect: its Location would be built from the Host header the client sent
    moved = client.post("/v1/predict/", headers={**AUTH, "Host": "evil.example"}, content=b"x")
    assert moved.status_code == 404 and "location" not in moved.headers


def test_model_info_leaves_out_the_training_machines_paths() -> None:
    from serve.app import _public

    meta = {"model_id": "m", "train_config": {"data": "/mnt/x/manifest.parquet", "output": "runs/r1",
                                              "storage": "s3://bucket/ckpt", "pretrained": "/home/me/r50.pt",
                                              "epochs": 12, "lr": 1e-3}}
    assert _public(meta) == {"model_id": "m", "train_config": {"epochs": 12, "lr": 1e-3}}
    assert _public({"train_config": {"pretrained": "imagenet"}})["train_config"] == {"pretrained": "imagenet"}
    assert _public({"model_id": "m"}) == {"model_id": "m"}  # an export without train_config stays without


def _lab_tiff() -> bytes:
    """A valid TIFF that PIL cannot convert to grayscale (ValueError: conversion from LAB to RGB not supported)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("LAB", (80, 96), (50, 0, 0)).save(buf, format="TIFF")
    return buf.getvalue()


def _inf_tiff() -> bytes:
    """A float TIFF with one inf pixel: min-max scaling turns it into NaNs, and the model answers NaN."""
    from PIL import Image

    arr = np.linspace(0, 1, 96 * 80, dtype=np.float32).reshape(96, 80)
    arr[3, 3] = np.inf
    buf = io.BytesIO()
    Image.fromarray(arr, mode="F").save(buf, format="TIFF")
    return buf.getvalue()


def _dicom_window_width_0() -> bytes:
    """A DICOM whose VOI window has width 0 (pydicom: ValueError, window width must be >= 1)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(_dicom_bytes((np.arange(96 * 80).reshape(96, 80) % 4096).astype(np.uint16))))
    ds.WindowCenter, ds.WindowWidth = 2048, 0
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def test_an_image_the_decoder_chokes_on_is_a_4xx_for_that_image_only(client, sample_images, expected) -> None:
    """Images the decoding libraries raise their own errors on (PIL: no LAB to grey conversion; pydicom:
    window width 0) get that image's 4xx: alone, and inline in a batch whose other images are answered
    (never a 503 internal_error that invites a retry)."""
    bad = [("lab.tiff", _lab_tiff(), "image/tiff"), ("ww0.dcm", _dicom_window_width_0(), "application/dicom")]
    for (name, data, ctype), status, code in zip(bad, (415, 422), ("unsupported", "dicom_invalid")):
        r = _predict(client, data, ctype)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.json()["code"] == code and "retry-after" not in r.headers, r.text
    good = sample_images[4]
    files = [("files", bad[0]), ("files", (good.name, good.read_bytes(), "image/jpeg")), ("files", bad[1])]
    r = client.post("/v1/predict/batch", files=files, headers=AUTH)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[0]["error"]["code"] == "unsupported" and results[2]["error"]["code"] == "dicom_invalid"
    np.testing.assert_allclose([results[1]["probabilities"][c] for c in ("normal", "pneumonia")], expected[good],
                               atol=1e-5)


def test_a_non_finite_image_fails_alone_in_its_dynamic_batch(client, sample_images, expected) -> None:
    """An image with an inf pixel gets 422 corrupt; the images batched with it get their answers."""
    good = sample_images[5:8]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in good]
    files.insert(1, ("files", ("inf.tiff", _inf_tiff(), "image/tiff")))
    r = client.post("/v1/predict/batch", files=files, headers=AUTH)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[1]["error"]["code"] == "corrupt" and "probabilities" not in results[1]
    for item, path in zip(results[:1] + results[2:], good):
        np.testing.assert_allclose([item["probabilities"][c] for c in ("normal", "pneumonia")], expected[path],
                                   atol=1e-5)
    r = _predict(client, _inf_tiff(), "image/tiff")
    assert r.status_code == 422 and r.json()["code"] == "corrupt", r.text
    assert client.get("/readyz").status_code == 200


def test_infer_judges_each_row_and_bad_images_are_no_engine_failure(server, client, sample_images, expected,
                                                                     tiny_model) -> None:
    """Straight to the batched method (Serve's handle API): a NaN row comes back None beside answered rows,
    and more NaN-only batches than the failure limit leave the replica healthy (the engine did not fail)."""
    from ray import serve

    from cxr.export import read_metadata
    from cxr.preprocess import preprocess
    from serve.app import MAX_CONSECUTIVE_ENGINE_FAILURES

    path = sample_images[0]
    x = preprocess(path.read_bytes(), read_metadata(tiny_model).preprocess)
    nan = x.copy()
    nan[0, 0, 0] = np.nan
    handle = serve.get_app_handle(server.cfg.app_name)
    for _ in range(MAX_CONSECUTIVE_ENGINE_FAILURES + 1):
        # two at once (the fixture's max_ongoing_requests): they meet in one batch within batch_wait_ms
        good, bad = [r.result(timeout_s=30) for r in [handle._infer.remote(a) for a in (x, nan)]]
        assert bad is None
        np.testing.assert_allclose(good, expected[path], atol=1e-5)
        assert handle._infer.remote(nan).result(timeout_s=30) is None
    assert client.get("/readyz").status_code == 200


#: a PNG header chunk whose checksum is wrong (garbage after the magic alone reads as a file cut short)
_PNG_IHDR_BAD_CRC = (13).to_bytes(4, "big") + b"IHDR" + bytes([0, 0, 1, 0, 0, 0, 1, 0, 8, 0, 0, 0, 0]) + bytes(4)

BAD = [  # (name, request kwargs, status, code)
    ("text body", dict(content=b"hello", headers={"Content-Type": "text/plain", **AUTH}), 415, "unsupported_media_type"),
    ("json body", dict(content=b'{"a": 1}', headers={"Content-Type": "application/json", **AUTH}), 415,
     "unsupported_media_type"),
    ("bytes labelled jpeg", dict(content=b"not an image at all" * 10, headers={"Content-Type": "image/jpeg", **AUTH}),
     415, "not_image"),
    ("empty", dict(content=b"", headers={"Content-Type": "image/jpeg", **AUTH}), 422, "empty"),
    ("truncated jpeg", "TRUNCATED", 422, "truncated"),
    ("corrupt png", dict(content=b"\x89PNG\r\n\x1a\n" + _PNG_IHDR_BAD_CRC + b"\x00garbage" * 50,
                         headers={"Content-Type": "image/png", **AUTH}), 422, "corrupt"),
    ("over the body cap", dict(content=b"\xff\xd8\xff" + b"\0" * (1024 * 1024 + 10),
                               headers={"Content-Type": "image/jpeg", **AUTH}), 413, "body_too_large"),
    ("no token", dict(content=b"\xff\xd8\xff", headers={"Content-Type": "image/jpeg"}), 401, "unauthorized"),
    ("wrong token", dict(content=b"\xff\xd8\xff", headers={"Content-Type": "image/jpeg",
                                                           "Authorization": "Bearer nope"}), 401, "unauthorized"),
    ("multipart without file", dict(data={"x": "1"}, files={"note": (None, b"hi")}, headers=AUTH), 422, "no_image"),
    ("two files to the single route", dict(files=[("file", ("a.jpeg", b"\xff\xd8\xff", "image/jpeg")),
                                                  ("file", ("b.txt", b"text", "text/plain"))], headers=AUTH),
     422, "multiple_images"),  # answering for the first alone would drop the second silently
]


@pytest.mark.parametrize("name,kwargs,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_its_status_and_the_next_request_succeeds(client, sample_images, name, kwargs, status,
                                                                  code) -> None:
    if kwargs == "TRUNCATED":
        kwargs = dict(content=sample_images[0].read_bytes()[:700], headers={"Content-Type": "image/jpeg", **AUTH})
    r = client.post("/v1/predict", **kwargs)
    assert r.status_code == status, (name, r.status_code, r.text)
    body = r.json()
    assert body["code"] == code and body["message"] and body["request_id"], body
    ok = _predict(client, sample_images[0].read_bytes())
    assert ok.status_code == 200, ok.text


def test_other_errors_are_json(client, sample_images) -> None:
    r = client.post("/v1/predict/batch", content=sample_images[0].read_bytes(),
                    headers={"Content-Type": "image/jpeg", **AUTH})
    assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type"
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["code"] == "not_found" and r.headers["cache-control"] == "no-store"
    r = client.get("/v1/predict")
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"
    assert r.headers["cache-control"] == "no-store"
    r = client.post("/v1/predict/batch", headers=AUTH,
                    files=[("files", (f"{i}.jpeg", b"\xff\xd8\xff", "image/jpeg")) for i in range(33)])
    assert r.status_code == 413 and r.json()["code"] == "too_many_images"


def test_overload_answers_503_never_500_and_recovers(client, sample_images) -> None:
    data = sample_images[0].read_bytes()
    with cf.ThreadPoolExecutor(48) as pool:
        statuses = list(pool.map(lambda _: _predict(client, data).status_code, range(96)))
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses and 200 in statuses, statuses  # max_ongoing 2 + max_queued 2 per proxy
    assert _predict(client, data).status_code == 200


def test_batching_knobs_change_at_runtime(server, client, sample_images) -> None:
    """user_config only: Serve reconfigures the running replica (same replica id, new batch size)."""
    import dataclasses

    from serve import runner

    before = client.get("/v1/model", headers=AUTH).json()["serving"]
    runner.deploy(dataclasses.replace(server.cfg, max_batch_size=3, batch_wait_ms=5.0))
    after = client.get("/v1/model", headers=AUTH).json()["serving"]
    assert (after["max_batch_size"], after["batch_wait_ms"]) == (3, 5.0)
    assert after["replica"] == before["replica"]
    assert _predict(client, sample_images[0].read_bytes()).status_code == 200


def _series(text: str, name: str) -> list[tuple[str, float]]:
    return [(m.group(1), float(m.group(2))) for m in re.finditer(rf"^{name}\{{(.*?)\}} ([0-9.e+-]+)$", text, re.M)]


def _total(text: str, name: str, **labels: str) -> float:
    return sum(v for lab, v in _series(text, name) if all(f'{k}="{val}"' in lab for k, val in labels.items()))


def _scrape(server) -> str:
    import httpx

    return httpx.get(server.metrics_url, timeout=10).text


def test_metrics_endpoint_shows_cxr_counters_moving(server, client, sample_images, tiny_model) -> None:
    from cxr.export import read_metadata

    def wait_for(pred, timeout: float = 45.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = _scrape(server)
            if pred(text) or time.monotonic() > deadline:
                return text
            time.sleep(1.0)

    assert _predict(client, sample_images[0].read_bytes()).status_code == 200  # on its own: no order dependence
    assert _predict(client, b"not an image" * 10).status_code == 415
    assert _predict(client, sample_images[0].read_bytes()[:700]).status_code == 422  # truncated
    text = wait_for(lambda t: _total(t, "ray_cxr_requests_total", route="/v1/predict", status="200") > 0)
    ok_before = _total(text, "ray_cxr_requests_total", route="/v1/predict", status="200")
    assert ok_before > 0, "no ray_cxr_requests_total series (Ray exports cxr_* with its ray_ prefix)"
    for _ in range(3):
        assert _predict(client, sample_images[0].read_bytes()).status_code == 200
    # four images at once (the batch route fans them out to the batched method): dynamic batching must put
    # more than one into a forward, so images through the model outnumber forwards
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in sample_images[:4]]
    assert client.post("/v1/predict/batch", files=files, headers=AUTH).status_code == 200
    text = wait_for(lambda t: _total(t, "ray_cxr_requests_total", route="/v1/predict", status="200") >= ok_before + 3
                    and _total(t, "ray_cxr_requests_total", route="/v1/predict/batch", status="200") >= 1)
    assert _total(text, "ray_cxr_requests_total", route="/v1/predict", status="200") >= ok_before + 3
    assert _total(text, "ray_cxr_requests_total", route="/v1/predict", status="415") >= 1
    assert _total(text, "ray_cxr_errors_total", code="truncated") >= 1
    assert _total(text, "ray_cxr_predictions_total") > 0
    assert _total(text, "ray_cxr_batch_size_count") > 0
    assert _total(text, "ray_cxr_request_latency_ms_count", route="/v1/predict", status_class="2xx") >= ok_before + 3
    assert _total(text, "ray_cxr_request_latency_ms_count", route="/v1/predict", status_class="4xx") >= 1  # the 415
    assert _total(text, "ray_cxr_forward_latency_ms_count") > 0
    # the mean batch size from the exact counter: every forward has >= 1 image (Ray's histogram _sum
    # is count x bucket midpoint, which reads 0.5 for batches of 1)
    forwards, images = _total(text, "ray_cxr_batch_size_count"), _total(text, "ray_cxr_forward_images_total")
    assert images >= ok_before + 3 + 4 and images > forwards, (images, forwards)
    assert _total(text, "ray_cxr_forward_seconds_total") > 0
    assert _total(text, "ray_cxr_probability_count", class_name="pneumonia") > 0
    assert _total(text, "ray_cxr_model_info", model_id=read_metadata(tiny_model).model_id) >= 1
    assert re.search(r"^ray_serve_\w+", text, re.M), "Ray Serve's own series are missing"


def test_failing_health_check_gets_the_replica_replaced(server, client, sample_images) -> None:
    """Real engine failures (a wrongly shaped batch straight to the model, via Serve's public handle API)
    fail check_health after 3 in a row; Serve replaces the replica and predictions work again.
    Runs last: it swaps the replica (metrics and replica ids change)."""
    from ray import serve

    before = client.get("/v1/model", headers=AUTH).json()["serving"]["replica"]
    handle = serve.get_app_handle(server.cfg.app_name)
    for _ in range(3):
        with pytest.raises(Exception):
            handle._infer.remote(np.zeros((3, 5, 5), np.float32)).result(timeout_s=30)
    ready = client.get("/readyz")
    assert ready.status_code in (503, 200)  # 200 only if the replica was already replaced
    deadline = time.monotonic() + 120
    after = before
    while time.monotonic() < deadline and after == before:
        time.sleep(1.0)
        r = client.get("/v1/model", headers=AUTH)
        if r.status_code == 200:
            after = r.json()["serving"]["replica"]
    assert after != before, "the unhealthy replica was not replaced"
    assert client.get("/readyz").status_code == 200
    assert _predict(client, sample_images[0].read_bytes()).status_code == 200

"""The cxr Ray Serve application: a FastAPI ingress and a dynamically batched model in one deployment.

One deployment (not ingress + model) because the model is small enough to sit
beside the HTTP handlers: no extra actor hop, and autoscaling scales both.

Request path (nothing blocks the replica's event loop):
  body (capped) -> THE ``cxr.preprocess.preprocess`` in a thread pool ->
  ``@serve.batch`` queue -> ``engine.predict_proba`` (``cxr.engine.load_engine``,
  the engine ``cxr screen`` uses) in a single inference thread -> JSON.

Errors are JSON ``{"code", "message", "request_id"}`` with statuses from the
typed ``ImageError.code`` (``IMAGE_ERROR_STATUS``; ``cxr.preprocess`` turns
whatever else a decoder raises into ``corrupt``, and an image without a finite
prediction is that image's 422 ``corrupt`` too); an unexpected failure is a JSON 503 and the replica keeps serving,
while repeated engine failures fail the health check so Serve replaces the
replica. Metrics: see serve/README.md.

No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` type.

Builder for ``serve deploy`` / ``serve run``: ``serve.app:build_app`` with
``args`` = a (partial) ``ServeConfig`` dict (``serve/schema.py``).
"""


import asyncio
import hmac
import json
import logging
import math
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from email.message import Message
from typing import Any, Awaitable, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import metrics as serve_metrics
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cxr import __version__
from cxr.config import ServeConfig, from_dict
from cxr.errors import CxrError, ImageError
from cxr.metrics import decide, pneumonia_score
from cxr.preprocess import preprocess  # torch-free: cheap to import in every Serve process
from serve.schema import DEPLOYMENT_NAME, api_token, app_args, deployment_options

#: HTTP status per ImageError.code (documented in serve/README.md)
IMAGE_ERROR_STATUS: dict[str, int] = {
    "empty": 422,
    "not_image": 415,
    "corrupt": 422,
    "truncated": 422,
    "too_large": 413,
    "unsupported": 415,
    "dicom_invalid": 422,
    "read_failed": 422,
    "out_of_memory": 503,  # the replica's trouble, not the image's: the client may retry
}
#: raw body types accepted besides image/*; everything else except multipart is a 415
RAW_TYPES = ("", "application/octet-stream", "application/dicom")
#: multipart field names taken as images when a part has no filename
FILE_FIELDS = ("file", "files", "image", "images")
#: engine failures in a row that make the replica unhealthy (Serve then replaces it)
MAX_CONSECUTIVE_ENGINE_FAILURES = 3
PROTECTED_PREFIX = "/v1/"
# answers about patients (and errors about their requests): no cache keeps them
NO_STORE = {"Cache-Control": "no-store"}
LATENCY_BUCKETS_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]
PROBABILITY_BUCKETS = [round(0.05 * i, 2) for i in range(1, 20)]

log = logging.getLogger("cxr.serve")


class ApiError(Exception):
    """A request we refuse on purpose: becomes a JSON ``{code, message}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


# ---------------------------------------------------------------- schemas (OpenAPI docs)
class Prediction(BaseModel):
    """One image's answer."""

    request_id: str
    model_id: str = Field(description="sha256 of the exported weights")
    model_version: str = ""
    probabilities: dict[str, float] = Field(description="probability per class, keyed by class name")
    pneumonia_score: float = Field(description="P(not normal), the sum of the other classes; the threshold applies to it")
    label: str = Field(description="'normal' below the threshold, else the most likely other class")
    threshold: float
    latency_ms: float


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. not_image, truncated, body_too_large")
    message: str
    request_id: str | None = None


class BatchItem(BaseModel):
    index: int
    filename: str | None = None
    probabilities: dict[str, float] | None = None
    pneumonia_score: float | None = None
    label: str | None = None
    error: ErrorBody | None = None


class BatchPrediction(BaseModel):
    request_id: str
    model_id: str
    model_version: str = ""
    threshold: float
    results: list[BatchItem]
    latency_ms: float


_ERRORS = {s: {"model": ErrorBody, "description": d} for s, d in (
    (401, "missing or wrong bearer token (only when CXR_API_TOKEN is set)"),
    (413, "body over the cap, too many images, or too many pixels"),
    (415, "not an image / unsupported content type"),
    (422, "corrupt, truncated or empty image"),
    (503, "overloaded, timed out, or the replica is unhealthy (retry)"),
)}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "image/jpeg": _BINARY, "image/png": _BINARY, "application/dicom": _BINARY,
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}},
}}}
_BATCH_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}

api = FastAPI(
    redirect_slashes=False,  # a 307 to the Host header's name would resend the X-ray wherever a client says
    title="cxr: chest X-ray pneumonia screening",
    version=__version__,
    description="Send a chest X-ray (JPEG, PNG, DICOM; raw body or multipart) and get P(class), a label at the "
                "model's threshold, and the model id. Bearer auth on /v1/* when CXR_API_TOKEN is set.",
)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404/405 etc. as JSON like every other error."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    return JSONResponse({"code": codes.get(exc.status_code, "http_error"), "message": str(exc.detail),
                         "request_id": request.headers.get("x-request-id")}, status_code=exc.status_code,
                        headers=NO_STORE)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"code": "invalid_request", "message": str(exc.errors())[:500],
                         "request_id": request.headers.get("x-request-id")}, status_code=422,
                        headers=NO_STORE)


# ---------------------------------------------------------------- helpers (pure, testable)
def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


#: longest Content-Type header and part header parsed: the stdlib's parameter parser is quadratic in
#: quotes and semicolons (a 209 KB part header held a replica's event loop for 35 s)
MAX_HEADER_BYTES = 8192
#: parts a multipart body may carry beside its images (form fields): more is refused before parsing
EXTRA_PARTS = 16


def parse_multipart(content_type: str, body: bytes,
                    max_parts: int | None = None) -> list[tuple[str | None, str | None, bytes]]:
    """(field name, filename, data) of each part of a multipart/form-data body; exact bytes.

    Hand-rolled (split on the boundary) to keep binary payloads byte-exact
    without adding a dependency for one content type. Headers over
    :data:`MAX_HEADER_BYTES` and more than ``max_parts`` parts are refused before
    anything else is parsed.
    """
    if len(content_type) > MAX_HEADER_BYTES:
        raise ApiError(422, "bad_multipart", f"Content-Type header over {MAX_HEADER_BYTES} bytes")
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ApiError(422, "bad_multipart", "multipart/form-data without a boundary parameter")
    parts: list[tuple[str | None, str | None, bytes]] = []
    delimiter = b"--" + boundary.encode("latin-1")
    if max_parts is not None and body.count(delimiter) > max_parts + 1:  # + the closing delimiter
        raise ApiError(413, "too_many_parts", f"multipart body has over {max_parts} parts")
    sections = body.split(delimiter)
    if len(sections) < 3:
        raise ApiError(422, "bad_multipart", "multipart body has no parts or no closing boundary")
    for section in sections[1:]:
        if section.startswith(b"--"):  # closing delimiter
            break
        if section.startswith(b"\r\n"):
            section = section[2:]
        head, sep, data = section.partition(b"\r\n\r\n")
        if not sep:
            raise ApiError(422, "bad_multipart", "multipart part without a header/body separator")
        if len(head) > MAX_HEADER_BYTES:
            raise ApiError(422, "bad_multipart", f"multipart part header over {MAX_HEADER_BYTES} bytes")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        part = Message()
        for line in head.decode("latin-1").split("\r\n"):
            key, colon, value = line.partition(":")
            if colon:
                part[key.strip()] = value.strip()
        name = part.get_param("name", header="content-disposition")
        parts.append((name if isinstance(name, str) else None, part.get_filename(), data))
    return parts


def image_parts(parts: list[tuple[str | None, str | None, bytes]]) -> list[tuple[str | None, bytes]]:
    """The parts that carry files: any with a filename, or a field named file/image(s)."""
    return [(filename, data) for name, filename, data in parts if filename is not None or name in FILE_FIELDS]


#: training settings that name places on the training machines: not for every client of the API
_PRIVATE_TRAIN_KEYS = ("data", "output", "storage")


def _public(meta: dict[str, Any]) -> dict[str, Any]:
    """The export's metadata without the training run's paths (file layout, bucket names)."""
    if "train_config" not in meta:
        return meta
    train = {k: v for k, v in (meta["train_config"] or {}).items()
             if k not in _PRIVATE_TRAIN_KEYS and not (k == "pretrained" and v not in ("imagenet", "none"))}
    return {**meta, "train_config": train}


def _json_log_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


# ---------------------------------------------------------------- the deployment
@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class CxrModel:
    """Replica: loads the export through ``cxr.engine.load_engine`` once and serves it."""

    def __init__(self, config: dict[str, Any]) -> None:
        # Before torch loads its OpenMP runtime: idle engine threads sleep instead of spinning, so the
        # decode threads and the HTTP path get the cores between forwards and batches fill
        # (batching 1.45x -> 1.65-1.73x at concurrency 32 here; BENCHMARKS.md, Serving).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from cxr.engine import load_engine

        self.cfg = from_dict(ServeConfig, config)
        # the app's own 503s (timeout, out_of_memory, internal_error) advise the wait the proxy's do
        # (HTTP wants whole seconds)
        self._retry_after = ({"Retry-After": str(math.ceil(self.cfg.retry_after_s))} if self.cfg.retry_after_s
                             else {})
        model_dir = self.cfg.model or os.environ.get("CXR_MODEL", "")
        if not model_dir:
            raise CxrError("no model: set args.model in the Serve config (cxr serve --model) or $CXR_MODEL")
        # threads = the CPUs Ray reserved for this replica, not Ray's OMP_NUM_THREADS=1 default nor every
        # core of the node (ONNX Runtime's default): replicas sharing a node must not oversubscribe it
        self.engine_threads = self.cfg.engine_threads or max(1, round(self.cfg.cpus_per_replica))
        self.engine = load_engine(model_dir, self.cfg.engine, threads=self.engine_threads,
                                  gpu=self.cfg.gpus_per_replica > 0)
        self.meta = self.engine.meta
        self.classes = list(self.meta.classes)
        self.threshold = float(self.meta.threshold)
        self.token = api_token()
        self.body_cap = int(self.cfg.max_body_mb * 1024 * 1024)
        self._pre_pool = ThreadPoolExecutor(max(1, self.cfg.preprocess_threads), thread_name_prefix="cxr-pre")
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="cxr-infer")  # one forward at a time
        self._engine_failures = 0
        self._unhealthy: str | None = None
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (never in practice)
            self.replica = "local"
        self.access = logging.getLogger("cxr.access")
        if not self.access.handlers:
            self.access.addHandler(_json_log_handler())
            self.access.setLevel(logging.INFO)
            self.access.propagate = False
        self._init_metrics()
        size = self.meta.preprocess.image_size
        self.engine.predict_proba(np.zeros((1, 1, size, size), np.float32))  # warm-up: first request is not slow
        self.reconfigure({"max_batch_size": self.cfg.max_batch_size, "batch_wait_ms": self.cfg.batch_wait_ms})

    # -- lifecycle -------------------------------------------------------------------------
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Runtime batching knobs (Serve ``user_config``): no replica restart needed."""
        size = int(user_config.get("max_batch_size", self.cfg.max_batch_size))
        wait_ms = float(user_config.get("batch_wait_ms", self.cfg.batch_wait_ms))
        if size < 1 or wait_ms < 0:
            raise ValueError(f"max_batch_size must be >= 1 and batch_wait_ms >= 0 (got {size}, {wait_ms})")
        self._infer.set_max_batch_size(size)
        self._infer.set_batch_wait_timeout_s(wait_ms / 1000.0)
        self.max_batch_size, self.batch_wait_ms = size, wait_ms

    def check_health(self) -> None:
        """Called by the Serve controller; raising makes Serve replace this replica."""
        self._set_model_info()  # Ray drops a gauge not set again within 2 metrics report intervals (~20 s)
        if self._unhealthy:
            raise RuntimeError(self._unhealthy)

    def __del__(self) -> None:
        for pool in ("_pre_pool", "_infer_pool"):
            if hasattr(self, pool):
                getattr(self, pool).shutdown(wait=False, cancel_futures=True)

    # -- metrics ---------------------------------------------------------------------------
    def _init_metrics(self) -> None:
        """``cxr_*`` series; Ray exports them (prefixed ``ray_``) on its metrics port."""
        m = serve_metrics
        self.m_requests = m.Counter("cxr_requests_total", "HTTP requests by route and status.", ("route", "status"))
        self.m_latency = m.Histogram("cxr_request_latency_ms", "End-to-end request latency in the replica (ms), "
                                     "by route and status class (2xx, 4xx, 5xx: a fast refusal is no fast answer).",
                                     LATENCY_BUCKETS_MS, ("route", "status_class"))
        self.m_batch = m.Histogram("cxr_batch_size", "Images per model forward (dynamic batching).", BATCH_BUCKETS)
        self.m_forward = m.Histogram("cxr_forward_latency_ms", "Time of one model forward (a whole batch, ms).",
                                     LATENCY_BUCKETS_MS)
        # exact totals beside the histograms: Ray exports a histogram's _sum as count x bucket midpoint,
        # so the mean batch size and images/s must come from counters (serve/README.md)
        self.m_forward_images = m.Counter("cxr_forward_images_total", "Images through the model (all forwards).")
        self.m_forward_seconds = m.Counter("cxr_forward_seconds_total", "Seconds spent in model forwards.")
        self.m_predictions = m.Counter("cxr_predictions_total", "Predicted labels.", ("label",))
        self.m_probability = m.Histogram("cxr_probability", "Predicted probability per class (drift watch).",
                                         PROBABILITY_BUCKETS, ("class_name",))
        self.m_errors = m.Counter("cxr_errors_total", "Errors by code (image and request errors).", ("code",))
        self.m_info = m.Gauge("cxr_model_info", "1 per replica, labelled with the served model.",
                              ("model_id", "model_version", "engine"))
        self._set_model_info()

    def _set_model_info(self) -> None:
        """Set at start and on every health check (every ``health_check_period_s``, 10 s): Ray 2.60 stops
        exporting a gauge that was not set within two metrics report intervals (20 s by default), and the
        Grafana dashboard's cluster selector and rollout queries read this one."""
        self.m_info.set(1, tags={"model_id": self.meta.model_id, "model_version": self.meta.model_version or "",
                                 "engine": self.engine.name})

    # -- inference -------------------------------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _infer(self, inputs: list[np.ndarray]) -> list[np.ndarray | None]:
        """Dynamic batch -> one forward in the inference thread (event loop stays free).

        Finiteness is judged per image: an image with non-finite pixels or a non-finite answer comes
        back as None (a 422 for its request alone) while the rest of the batch is answered. The engine
        has failed only when the output has the wrong shape or no image with finite pixels got a finite
        answer; 3 such batches in a row fail the health check.
        """
        self.m_batch.observe(len(inputs))
        loop = asyncio.get_running_loop()
        try:
            x = np.stack(inputs)
            t0 = time.perf_counter()
            probs = await loop.run_in_executor(self._infer_pool, self.engine.predict_proba, x)
            seconds = time.perf_counter() - t0
            self.m_forward.observe(seconds * 1000.0)
            self.m_forward_images.inc(len(inputs))
            self.m_forward_seconds.inc(seconds)
            if probs.shape != (len(inputs), len(self.classes)):
                raise RuntimeError(f"engine returned shape {probs.shape} for {len(inputs)} images")
            clean = np.isfinite(x.reshape(len(inputs), -1)).all(axis=1)
            ok = clean & np.isfinite(probs).all(axis=1)
            if clean.any() and not ok.any():
                raise RuntimeError(f"engine returned non-finite probabilities for all {int(clean.sum())} "
                                   "images with finite pixels")
        except Exception as exc:
            self._engine_failures += 1
            if self._engine_failures >= MAX_CONSECUTIVE_ENGINE_FAILURES:
                self._unhealthy = f"engine failed {self._engine_failures} times in a row: {exc}"
            raise
        if clean.any():
            self._engine_failures = 0
        return [p if good else None for p, good in zip(probs, ok)]

    async def _probs(self, data: bytes) -> np.ndarray:
        loop = asyncio.get_running_loop()
        x = await loop.run_in_executor(self._pre_pool, preprocess, data, self.meta.preprocess)  # THE preprocessing
        probs = await self._infer(x)
        if probs is None:
            raise ImageError("corrupt", "the image gave no finite prediction (non-finite pixel values?)")
        return probs

    def _answer(self, probs: np.ndarray) -> dict[str, Any]:
        p = np.asarray(probs, dtype=np.float64)[None]
        label = decide(p, self.classes, self.threshold)[0]
        self.m_predictions.inc(tags={"label": label})
        for name, value in zip(self.classes, p[0]):
            self.m_probability.observe(float(value), tags={"class_name": name})
        return {"probabilities": {c: float(v) for c, v in zip(self.classes, p[0])},
                "pneumonia_score": float(pneumonia_score(p, self.classes)[0]), "label": label}

    # -- request plumbing ------------------------------------------------------------------
    def _check_auth(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token",
                           {"WWW-Authenticate": 'Bearer realm="cxr"'})

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes the cap (declared or streamed)."""
        declared = request.headers.get("content-length")
        cap_msg = f"request body is over the {self.cfg.max_body_mb:g} MiB cap"
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "bad_request", "invalid Content-Length")
            if int(declared) > self.body_cap:
                raise ApiError(413, "body_too_large", cap_msg)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.body_cap:
                raise ApiError(413, "body_too_large", cap_msg)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _files(self, request: Request, single: bool) -> list[tuple[str | None, bytes]]:
        kind = media_type(request)
        if kind == "multipart/form-data":
            body = await self._read_body(request)
            # in a thread: splitting a 20 MB body must not hold the event loop (health checks, other requests)
            parts = await asyncio.get_running_loop().run_in_executor(
                self._pre_pool, parse_multipart, request.headers["content-type"], body,
                (1 if single else self.cfg.max_batch_images) + EXTRA_PARTS)
            files = image_parts(parts)
            if not files:
                field = "'file'" if single else "'files' (one part per image)"
                raise ApiError(422, "no_image", f"multipart body has no file part (send the image as field {field})")
            if single and len(files) > 1:  # answering for the first part alone would drop the others silently
                raise ApiError(422, "multiple_images",
                               f"{len(files)} file parts; /v1/predict takes one image, /v1/predict/batch several")
            return files
        if single and (kind in RAW_TYPES or kind.startswith("image/")):
            return [(None, await self._read_body(request))]
        accepted = "image/* (JPEG, PNG, ...), application/dicom, application/octet-stream or multipart/form-data" \
            if single else \
            "multipart/form-data with one part per image"
        raise ApiError(415, "unsupported_media_type", f"Content-Type {kind or '(none)'} is not accepted; send {accepted}")

    async def _handle(self, request: Request, route: str,
                      work: Callable[[Request, str], Awaitable[tuple[dict[str, Any], int]]]) -> JSONResponse:
        """Auth, timeout, error mapping, metrics and the JSON access log around one request."""
        t0 = time.perf_counter()
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        status, code, n_images, headers = 200, None, 0, {}
        try:
            if route.startswith(PROTECTED_PREFIX):
                self._check_auth(request)
            payload, n_images = await asyncio.wait_for(work(request, rid), timeout=self.cfg.request_timeout_s)
        except ApiError as exc:
            status, code, headers = exc.status, exc.code, exc.headers
            payload = {"code": exc.code, "message": exc.message, "request_id": rid}
        except ImageError as exc:
            status, code = IMAGE_ERROR_STATUS.get(exc.code, 422), exc.code
            if status == 503:
                headers = self._retry_after
            payload = {"code": exc.code, "message": str(exc), "request_id": rid}
        except TimeoutError:
            status, code, headers = 503, "timeout", self._retry_after
            payload = {"code": code, "message": f"not answered within {self.cfg.request_timeout_s:g} s",
                       "request_id": rid}
        except asyncio.CancelledError:  # client went away: log it, let Serve finish the cancellation
            self._record(route, request, rid, 499, "client_disconnected", t0, n_images)
            raise
        except ClientDisconnect:  # went away while sending its body: not the server's failure
            status, code = 499, "client_disconnected"
            payload = {"code": code, "message": "the client closed the connection before its body arrived",
                       "request_id": rid}
        except Exception as exc:  # noqa: BLE001 - never a 500: answer, log, keep serving
            log.exception("request %s failed", rid)
            status, code, headers = 503, "internal_error", self._retry_after
            payload = {"code": code, "message": f"{type(exc).__name__}: {exc}"[:300], "request_id": rid}
        latency_ms = self._record(route, request, rid, status, code, t0, n_images)
        if status == 200 and "latency_ms" in payload:
            payload["latency_ms"] = round(latency_ms, 3)
        return JSONResponse(payload, status_code=status,
                            headers={"X-Model-Id": self.meta.model_id, **NO_STORE, **headers})

    def _record(self, route: str, request: Request, rid: str, status: int, code: str | None, t0: float,
                n_images: int) -> float:
        latency_ms = (time.perf_counter() - t0) * 1000.0
        self.m_requests.inc(tags={"route": route, "status": str(status)})
        self.m_latency.observe(latency_ms, tags={"route": route, "status_class": f"{status // 100}xx"})
        if code:
            self.m_errors.inc(tags={"code": code})
        self.access.info(json.dumps({
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": "access",
            "request_id": rid, "method": request.method, "route": route, "status": status, "code": code,
            "latency_ms": round(latency_ms, 3), "images": n_images, "model_id": self.meta.model_id,
            "replica": self.replica,
        }))
        return latency_ms

    def _base(self, rid: str) -> dict[str, Any]:
        return {"request_id": rid, "model_id": self.meta.model_id, "model_version": self.meta.model_version}

    # -- routes ----------------------------------------------------------------------------
    @api.post("/v1/predict", response_model=Prediction, responses=_ERRORS, openapi_extra=_IMAGE_BODY,
              summary="Screen one image (raw body or multipart field 'file')")
    async def predict(self, request: Request) -> JSONResponse:
        async def work(req: Request, rid: str) -> tuple[dict[str, Any], int]:
            (_, data), = await self._files(req, single=True)
            answer = self._answer(await self._probs(data))
            return {**self._base(rid), **answer, "threshold": self.threshold, "latency_ms": 0.0}, 1

        return await self._handle(request, "/v1/predict", work)

    @api.post("/v1/predict/batch", response_model=BatchPrediction, responses=_ERRORS, openapi_extra=_BATCH_BODY,
              summary="Screen several images (multipart, one part per image); per-image errors inline")
    async def predict_batch(self, request: Request) -> JSONResponse:
        async def work(req: Request, rid: str) -> tuple[dict[str, Any], int]:
            files = await self._files(req, single=False)
            if len(files) > self.cfg.max_batch_images:
                raise ApiError(413, "too_many_images", f"{len(files)} images; at most {self.cfg.max_batch_images}")

            async def one(index: int, filename: str | None, data: bytes) -> dict[str, Any]:
                try:
                    return {"index": index, "filename": filename, **self._answer(await self._probs(data))}
                except ImageError as exc:
                    self.m_errors.inc(tags={"code": exc.code})
                    return {"index": index, "filename": filename,
                            "error": {"code": exc.code, "message": str(exc), "request_id": rid}}

            results = await asyncio.gather(*(one(i, f, d) for i, (f, d) in enumerate(files)))
            return {**self._base(rid), "threshold": self.threshold, "results": results, "latency_ms": 0.0}, len(files)

        return await self._handle(request, "/v1/predict/batch", work)

    @api.get("/v1/model", summary="The served export's metadata and the serving settings")
    async def model_info(self, request: Request) -> JSONResponse:
        async def work(req: Request, rid: str) -> tuple[dict[str, Any], int]:
            serving = {"engine": self.engine.name, "engine_threads": self.engine_threads, "replica": self.replica,
                       "max_batch_size": self.max_batch_size, "batch_wait_ms": self.batch_wait_ms,
                       "max_body_mb": self.cfg.max_body_mb,
                       "request_timeout_s": self.cfg.request_timeout_s, "auth": self.token is not None}
            return {**_public(self.meta.to_json()), "serving": serving, "request_id": rid}, 0

        return await self._handle(request, "/v1/model", work)

    @api.get("/healthz", summary="Liveness: the replica's event loop answers")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: model loaded and engine healthy", responses={503: {"model": ErrorBody}})
    async def readyz(self) -> JSONResponse:
        if self._unhealthy:
            return JSONResponse({"code": "not_ready", "message": self._unhealthy}, status_code=503)
        return JSONResponse({"status": "ready", "model_id": self.meta.model_id, "engine": self.engine.name})


def make_app(cfg: ServeConfig):  # -> ray.serve.Application
    """The app for ``cfg``: options from ``deployment_options``, replica args from ``app_args``.

    Batching knobs travel only in ``user_config``, so changing them reconfigures
    running replicas instead of replacing them.
    """
    from ray.serve.config import BackpressureConfig

    options = deployment_options(cfg)
    options["backpressure_config"] = BackpressureConfig(**options["backpressure_config"])
    return CxrModel.options(**options).bind(app_args(cfg))


def build_app(args: dict[str, Any]):  # -> ray.serve.Application
    """Application builder (``import_path: serve.app:build_app``): ``args`` is a (partial) ServeConfig dict.

    On ``serve deploy`` the config file's ``deployments[]`` entry (built by the
    same ``deployment_options``) overrides the options derived here.
    """
    return make_app(from_dict(ServeConfig, dict(args)))

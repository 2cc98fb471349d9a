"""The Ray Serve config document for the cxr app, built from one ``ServeConfig``.

Importable without Ray (it only builds dicts), so ``deploy/`` can embed the
same document as a RayService ``serveConfigV2`` and ``serve/config.yaml`` can
be regenerated and drift-checked against it::

    python -m serve.schema > serve/config.yaml          # the committed default
    cxr serve --model runs/r1/model --print-config      # with your flags applied

``cxr serve`` deploys the very same document, so a local run and ``serve deploy``
of a printed config behave alike.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from cxr.config import AutoscalingConfig, ServeConfig, to_dict
from cxr.errors import CxrError

#: ``import_path`` of the application builder (``serve/app.py::build_app``)
IMPORT_PATH = "serve.app:build_app"
#: the single deployment: FastAPI ingress + batched model in one replica (no extra hop)
DEPLOYMENT_NAME = "CxrModel"
#: the proxy's own timeout is a backstop behind the app's JSON timeout
PROXY_TIMEOUT_MARGIN_S = 5.0


def api_token() -> str | None:
    """The bearer token in $CXR_API_TOKEN (surrounding whitespace, e.g. a Secret file's newline, stripped);
    None when unset. Set but blank is an error: whoever set it meant auth, not an open API."""
    raw = os.environ.get("CXR_API_TOKEN")
    if raw is not None and not raw.strip():
        raise CxrError("CXR_API_TOKEN is set but empty (or only whitespace): set a token, or unset it to serve "
                       "without auth")
    return raw.strip() if raw is not None else None


def autoscaling_config(a: AutoscalingConfig) -> dict[str, Any]:
    """Ray's ``autoscaling_config`` dict (unset optional keys dropped)."""
    return {k: v for k, v in to_dict(a).items() if v is not None}


def user_config(cfg: ServeConfig) -> dict[str, Any]:
    """The runtime-settable part (``reconfigure``): changing it does not restart replicas."""
    return {"max_batch_size": int(cfg.max_batch_size), "batch_wait_ms": float(cfg.batch_wait_ms)}


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Options for ``@serve.deployment(...).options(**)`` and a config file's ``deployments[]`` entry.

    The same keys are valid in both places, so the CLI and the YAML cannot disagree.
    """
    if cfg.overload_status_code not in (429, 503):
        raise ValueError(f"overload_status_code must be 503 or 429, not {cfg.overload_status_code}")
    backpressure: dict[str, Any] = {"status_code": int(cfg.overload_status_code)}
    if cfg.retry_after_s is not None:
        backpressure["retry_after_s"] = float(cfg.retry_after_s)
    return {
        "max_ongoing_requests": int(cfg.max_ongoing_requests),
        "max_queued_requests": int(cfg.max_queued_requests),
        "backpressure_config": backpressure,
        "autoscaling_config": autoscaling_config(cfg.autoscaling),
        "ray_actor_options": {"num_cpus": float(cfg.cpus_per_replica), "num_gpus": float(cfg.gpus_per_replica)},
        "user_config": user_config(cfg),
        "health_check_period_s": float(cfg.health_check_period_s),
        "health_check_timeout_s": float(cfg.health_check_timeout_s),
        "graceful_shutdown_wait_loop_s": float(cfg.graceful_shutdown_wait_loop_s),
        "graceful_shutdown_timeout_s": float(cfg.graceful_shutdown_timeout_s),
    }


def http_options(cfg: ServeConfig) -> dict[str, Any]:
    """Proxy options: where the API listens and its backstop timeout."""
    return {"host": cfg.host, "port": int(cfg.port),
            "request_timeout_s": float(cfg.request_timeout_s) + PROXY_TIMEOUT_MARGIN_S}


#: ServeConfig fields the replica itself reads in ``CxrModel.__init__`` (``cpus_per_replica``: the
#: engine's threads when ``engine_threads`` is 0); the Serve knobs live in ``deployments[0]``
APP_ARG_KEYS = ("model", "engine", "engine_threads", "cpus_per_replica", "preprocess_threads", "max_batch_images",
                "max_body_mb", "request_timeout_s", "retry_after_s")


def app_args(cfg: ServeConfig) -> dict[str, Any]:
    """``args`` for ``build_app`` in a config file, and the replica's init argument: the app-level fields only.

    Both paths use it (``cxr serve`` deploys ``serve_config_document`` too, and ``make_app`` binds
    ``app_args``), so the replica rebuilds its ServeConfig from these keys alone: a field the replica
    reads must be in ``APP_ARG_KEYS``, or the replica silently gets its default.
    """
    full = to_dict(cfg)
    return {k: full[k] for k in APP_ARG_KEYS}


def serve_config_document(cfg: ServeConfig) -> dict[str, Any]:
    """A Ray Serve config-file dict (``serve deploy`` / RayService ``serveConfigV2``) for ``cfg``.

    ``deployments[0]`` overrides what the builder derives from ``args``; both
    come from ``cfg`` here, so editing the YAML's deployment section is the
    usual Serve way to tune replicas and limits on a cluster.
    """
    deployment = {"name": DEPLOYMENT_NAME, **deployment_options(cfg)}
    return {
        "proxy_location": "EveryNode",
        "http_options": http_options(cfg),
        "applications": [
            {
                "name": cfg.app_name,
                "import_path": IMPORT_PATH,
                "route_prefix": cfg.route_prefix,
                "args": app_args(cfg),
                # Serve's own access line is off: the app's JSON cxr.access line logs each request once
                "logging_config": {"encoding": "JSON", "log_level": "INFO", "enable_access_log": False},
                "deployments": [deployment],
            }
        ],
    }


HEADER = """\
# Ray Serve config for the cxr app. GENERATED from cxr.config.ServeConfig by
# serve/schema.py::serve_config_document -- do not edit by hand; regenerate with
#   python -m serve.schema > serve/config.yaml
# (tests/test_serve.py fails if this file drifts from the function's output).
# serve/config.yaml holds the defaults (listens on 127.0.0.1; model '' = $CXR_MODEL on the workers).
# For a cluster, print a config with its values, then deploy it:
#   cxr serve --host 0.0.0.0 --model /shared/path/to/model --print-config > cxr-serve.yaml
#   serve deploy cxr-serve.yaml
# There is no runtime_env: every node must run deploy/Dockerfile's image (cxr installed) and see the
# model path. The bearer token comes from $CXR_API_TOKEN on the workers (never put it here).
"""


PRINTED_HEADER = """\
# Ray Serve config for the cxr app, printed by `cxr serve --print-config` with the flags given.
# Yours to edit (settings without a flag: overload status, Retry-After, health checks, timings);
# then, on a running cluster (`ray start --head`, or KubeRay):  serve deploy THIS_FILE
# There is no runtime_env: every node must run deploy/Dockerfile's image (cxr installed) and see the
# model path ('' = $CXR_MODEL on the workers). The bearer token comes from $CXR_API_TOKEN on the
# workers (never put it here).
"""


def to_yaml(doc: dict[str, Any], header: str = HEADER) -> str:
    """The document as YAML, key order kept (stable, diff-friendly), under ``header``."""
    import yaml

    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


if __name__ == "__main__":  # python -m serve.schema > serve/config.yaml
    sys.stdout.write(to_yaml(serve_config_document(ServeConfig())))

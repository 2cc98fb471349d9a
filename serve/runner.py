"""Start and stop the cxr Serve app: shared by ``cxr serve``, the tests and ``bench/serve_load.py``.

Kept apart from the CLI so every caller deploys exactly what ``cxr serve``
deploys (same builder, same options, same HTTP options).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from cxr.config import ServeConfig
from cxr.errors import CxrError
from jobs.common import free_port, port_free  # noqa: F401 - free_port: for the tests and the benchmark
from serve.schema import DEPLOYMENT_NAME, serve_config_document


@dataclass
class Started:
    """What ``start`` brought up, so ``stop`` ends exactly that."""

    cfg: ServeConfig
    started_ray: bool
    metrics_port: int | None  # None when connected to an existing cluster (its own port applies)

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "::") else self.cfg.host
        return f"http://{host}:{self.cfg.port}{self.cfg.route_prefix.rstrip('/')}"

    @property
    def metrics_url(self) -> str | None:
        return None if self.metrics_port is None else f"http://127.0.0.1:{self.metrics_port}/metrics"


def init_ray(cfg: ServeConfig, num_cpus: int | None = None, metrics_report_interval_ms: int | None = None,
             quiet: bool = True, log_to_driver: bool = True) -> tuple[bool, int | None]:
    """Connect to RAY_ADDRESS, or start a local Ray whose Prometheus export port is ``cfg.metrics_port``.

    Returns (started_here, metrics_port). ``jobs.common.init_ray`` has no
    metrics port to report back, so this wrapper passes it in and returns it.
    """
    import ray

    if ray.is_initialized():
        return False, None
    from jobs.common import cluster_address

    if cluster_address():
        from jobs.common import init_ray as connect

        connect(quiet=quiet)
        return False, None
    if not port_free("127.0.0.1", cfg.metrics_port):
        raise CxrError(f"metrics port {cfg.metrics_port} is in use; pick another with --metrics-port")
    from jobs.common import init_ray as start_local

    system_config = {"metrics_report_interval_ms": int(metrics_report_interval_ms)} if metrics_report_interval_ms else None
    start_local(num_cpus, quiet, dashboard=False, metrics_export_port=cfg.metrics_port, system_config=system_config,
                log_to_driver=log_to_driver)
    return True, cfg.metrics_port


def validate(cfg: ServeConfig):  # -> ray.serve.schema.ServeDeploySchema
    """``serve_config_document(cfg)`` as Serve's own schema; what Serve refuses is one CxrError line."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        return ServeDeploySchema.model_validate(serve_config_document(cfg))
    except ValidationError as exc:  # e.g. max_queued_requests=0: not a traceback, a line naming the field
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise CxrError(f"invalid Serve config: {problems}") from None
    except ValueError as exc:  # serve_config_document's own checks (overload_status_code)
        raise CxrError(f"invalid Serve config: {exc}") from None


def deploy(cfg: ServeConfig, timeout_s: float = 300.0) -> None:
    """Deploy ``serve_config_document(cfg)`` exactly as ``serve run serve/config.yaml`` would.

    Going through the config document (not ``serve.run`` of a bound app) means
    ``cxr serve``, ``serve/config.yaml`` and the RayService run one and the same
    document, and a later deploy that changes only ``user_config`` (batch size,
    wait) reconfigures the running replicas instead of replacing them.
    ``client.deploy_apps`` is the call Ray's own ``serve run CONFIG`` makes
    (ray is pinned in pyproject.toml).
    """
    from ray import serve
    from ray.serve.context import _get_global_client

    schema = validate(cfg)
    serve.start(proxy_location=schema.proxy_location, http_options=schema.http_options.model_dump())
    before = serve.status().applications.get(cfg.app_name)
    since = before.last_deployed_time_s if before is not None else 0.0
    _get_global_client().deploy_apps(schema, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(cfg.app_name)
        if app is not None and app.last_deployed_time_s > since:
            status = str(app.status).rsplit(".", 1)[-1]
            if status == "RUNNING":
                return
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise CxrError(f"the Serve app {cfg.app_name!r} failed to deploy: {app.message}")
        time.sleep(0.5)
    raise CxrError(f"the Serve app {cfg.app_name!r} did not become RUNNING within {timeout_s:.0f} s")


def start(cfg: ServeConfig, num_cpus: int | None = None, metrics_report_interval_ms: int | None = None,
          quiet: bool = True, log_to_driver: bool = True) -> Started:
    """Ray (local or cluster) + Serve + the app. On failure, stops what it started."""
    from cxr.export import check_export
    from jobs.common import cluster_address

    validate(cfg)  # before Ray starts: what Serve would refuse, as one CxrError line
    if cfg.model:
        check_export(cfg.model, cfg.engine)  # a clear CxrError now rather than a replica crash loop later
    if cluster_address() is None and not port_free(cfg.host, cfg.port):
        raise CxrError(f"port {cfg.port} on {cfg.host} is in use; pick another with --port")
    started_ray, metrics_port = init_ray(cfg, num_cpus, metrics_report_interval_ms, quiet, log_to_driver)
    handle = Started(cfg, started_ray, metrics_port)
    try:
        if started_ray:  # a local Ray will never grow a GPU: say so now, not after deploy's 300 s wait
            import ray

            gpus = float(ray.cluster_resources().get("GPU", 0))
            if cfg.gpus_per_replica > gpus:
                raise CxrError(f"--gpus-per-replica {cfg.gpus_per_replica:g} but this machine has {gpus:g} GPU(s) "
                               "visible to Ray; use 0 for CPU replicas, or RAY_ADDRESS of a cluster with GPUs")
        deploy(cfg)
    except BaseException:
        stop(handle)
        raise
    return handle


def replica_count(app_name: str, include_starting: bool = False) -> int:
    """RUNNING (optionally also STARTING) replicas of the model deployment (for the autoscaling benchmark)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        return 0
    states = app.deployments[DEPLOYMENT_NAME].replica_states
    wanted = ("RUNNING", "STARTING") if include_starting else ("RUNNING",)
    return int(sum(n for state, n in states.items() if str(state).rsplit(".", 1)[-1] in wanted))


def stop(started: Started) -> None:
    """Graceful stop: Serve drains in-flight requests (graceful_shutdown_*), then Ray goes if we started it.

    On a cluster we only delete our application: Serve and Ray belong to it.
    The drain is bounded (``graceful_shutdown_timeout_s`` + 30 s): ``serve.shutdown``
    waits on its controller without a limit, and a local Ray we started is torn
    down by ``ray.shutdown`` anyway, so Ctrl-C never hangs.
    """
    import threading

    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    def drain() -> None:
        # the app first: its replicas finish their in-flight requests while the proxies, still up, carry
        # the answers back (new requests get a 404 meanwhile); serve.shutdown alone kills the proxies at
        # once, and clients in flight saw their connection dropped
        serve.delete(started.cfg.app_name)
        if started.started_ray:
            serve.shutdown()

    worker = threading.Thread(target=drain, name="serve-drain", daemon=True)
    worker.start()
    worker.join(started.cfg.graceful_shutdown_timeout_s + 30.0)
    if worker.is_alive():
        logging.getLogger("cxr").warning("Serve did not drain in time; stopping Ray")
    if started.started_ray:
        ray.shutdown()

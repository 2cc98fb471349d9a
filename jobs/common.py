"""Ray plumbing shared by the jobs and Serve: connect to a cluster or start the embedded local one."""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import ray

from cxr.errors import CxrError, first_line


def init_ray(num_cpus: int | None = None, quiet: bool = True, *, dashboard: bool = True,
             metrics_export_port: int | None = None, system_config: dict[str, Any] | None = None,
             log_to_driver: bool = True, attempts: int = 3) -> bool:
    """Connect to RAY_ADDRESS if set, else start a local in-process Ray instance.

    The local start is retried: Ray waits a fixed time for its raylet and
    dashboard agent, which a loaded machine can miss. ``CXR_RAY_TEMP_DIR`` puts
    the session files (and so every Ray process's command line) under a known
    folder, which tests use to clean up. Returns True when this call started or
    connected Ray (the caller then shuts it down); failures are one-line CxrErrors.
    """
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": log_to_driver,
                              "logging_level": logging.WARNING if quiet else logging.INFO}
    address = cluster_address()
    if address:
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, timeouts
            raise CxrError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {first_line(exc)}") from None
        return True
    _quiet_default_auth_notice()
    if os.environ.get("CXR_RAY_TEMP_DIR"):
        kwargs["_temp_dir"] = os.environ["CXR_RAY_TEMP_DIR"]
    if metrics_export_port:
        kwargs["_metrics_export_port"] = metrics_export_port
    if system_config:
        kwargs["_system_config"] = system_config
    for attempt in range(1, attempts + 1):
        if dashboard:
            # the dashboard serves the State API that Ray Train's controller and placement-group cleaner query
            # with no address: where other Ray instances run on this host, Ray's search for "the" one finds
            # several and the cleaner's thread dies with a traceback. Name ours (a port taken meanwhile: retried)
            port = free_port()
            kwargs.update(dashboard_port=port,
                          runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
        try:
            # address="local": a new instance even where `ray start` left one running (Ray's default would join it)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                     **kwargs)
            return True
        except Exception as exc:  # noqa: BLE001
            ray.shutdown()
            if attempt == attempts:
                raise CxrError(f"cannot start a local Ray instance ({attempts} tries): {first_line(exc)}") from None
            logging.getLogger("cxr").warning("Ray did not start (%s); retrying", first_line(exc)[:120])
            time.sleep(2.0)
    return False


def port_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (checked before Ray grabs it, for a clear error)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port (tests and the benchmark never use 8000)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cluster_address() -> str | None:
    """The Ray cluster RAY_ADDRESS names, or None for a new local instance (unset, or "local").

    ``RAY_ADDRESS=local`` asks for a fresh local instance started with our options (benchmarks use it).
    An http(s) address is the Jobs API that `cxr submit` reads from the same variable: one clear error here,
    not Ray's "Invalid Ray address" from deep inside ray.init.
    """
    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise CxrError(f"RAY_ADDRESS={address} is a Ray Jobs server address (for `cxr submit` and `cxr jobs`); "
                       "this command connects to a cluster directly (RAY_ADDRESS=auto, HOST:6379 or ray://HOST:10001). "
                       "Run it on the cluster with `cxr submit ...`, or unset RAY_ADDRESS to run locally")
    return address if address and address != "local" else None


def _drop_default_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _quiet_default_auth_notice() -> None:
    """Hide Ray's notice that a new local instance uses token authentication (its default) on every run.

    Only that notice: the warning that authentication is *disabled* still shows. Setting
    RAY_AUTH_MODE=token ourselves would say the same without a filter, but Ray reads it when
    imported, and the driver then fails to authenticate to its own instance.
    """
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if _drop_default_auth_notice not in log.filters:
        log.addFilter(_drop_default_auth_notice)

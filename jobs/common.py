"""Ray plumbing shared by the jobs: connect to a cluster or start the embedded local one."""

from __future__ import annotations

import logging
import os

import ray


def init_ray(num_cpus: int | None = None, quiet: bool = True) -> bool:
    """Connect to RAY_ADDRESS if set, else start a local in-process Ray instance.

    Returns True when this call started Ray (the caller then shuts it down).
    """
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    kwargs: dict = {"log_to_driver": True, "logging_level": logging.WARNING if quiet else logging.INFO}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", **kwargs)  # the dashboard serves the State API Train uses
    return True

"""Ray plumbing shared by the jobs: connect to a cluster or start the embedded local one."""

from __future__ import annotations

import logging
import os

import ray


def init_ray(num_cpus: int | None = None, quiet: bool = True, **extra) -> bool:
    """Connect to RAY_ADDRESS if set, else start a local in-process Ray instance.

    ``CXR_RAY_TEMP_DIR`` puts the local instance's session files (and so every
    process's command line) under a known folder: tests use it to clean up.
    Returns True when this call started Ray (the caller then shuts it down).
    """
    if ray.is_initialized():
        return False
    kwargs: dict = {"log_to_driver": True, "logging_level": logging.WARNING if quiet else logging.INFO, **extra}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        if os.environ.get("CXR_RAY_TEMP_DIR"):
            kwargs["_temp_dir"] = os.environ["CXR_RAY_TEMP_DIR"]
        # the dashboard serves the State API that Ray Train's controller queries
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", **kwargs)
    return True

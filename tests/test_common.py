"""jobs.common: the Ray plumbing shared by the jobs and Serve (no Ray instance needed here)."""

from __future__ import annotations

import logging

import pytest

from ray._private.authentication import authentication_token_setup as auth

from cxr.errors import CxrError
from jobs.common import _quiet_default_auth_notice, cluster_address


def test_only_the_default_token_auth_notice_is_hidden() -> None:
    """Ray's own warning functions: if Ray rewords the notice, this fails and the filter needs updating."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger(auth.__name__)
    log.addHandler(handler)
    try:
        _quiet_default_auth_notice()
        _quiet_default_auth_notice()  # idempotent: one filter however often Ray is started
        auth._warn_token_auth_enabled()
        auth._warn_token_auth_disabled()
    finally:
        log.removeHandler(handler)
    assert len(seen) == 1 and seen[0].startswith("Token authentication is disabled")
    assert len(log.filters) == 1


@pytest.mark.parametrize(("env", "expected"), [(None, None), ("", None), ("local", None),
                                               ("auto", "auto"), ("ray://head:10001", "ray://head:10001")])
def test_ray_address_local_means_a_new_local_instance(monkeypatch, env, expected) -> None:
    """One reading of RAY_ADDRESS for screen, train and serve: "local" starts our own instance."""
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert cluster_address() == expected


def test_a_jobs_server_address_is_a_clear_error(monkeypatch) -> None:
    """`export RAY_ADDRESS=http://head:8265` for `cxr submit` must not make `cxr screen` fail inside ray.init."""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(CxrError, match="Ray Jobs server address"):
        cluster_address()

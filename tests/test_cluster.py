"""`cxr submit` / `cxr jobs` against a real Ray head on 127.0.0.1 (its own ports and temp dir).

The head is started with `ray start --head --block` in its own session and stopped by signalling that
process group, then sweeping any process whose command line names this head's temp dir: never a bare
`ray stop`, which would take down every other Ray instance on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner, Result

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RAY = str(Path(PY).with_name("ray"))
#: every test here is bounded (pytest-timeout). A tiny train job is ~30 s on an idle 2-core machine but
#: several minutes when the cores are shared with other work, hence the generous bounds
pytestmark = pytest.mark.timeout(300)


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pids_naming(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (this head's unique temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


@dataclass
class Head:
    address: str  # dashboard / job server URL
    temp_dir: str
    env: dict[str, str]  # token auth for this head only (Ray 2.60 enables it by default)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    """A Ray head with a dashboard (job server) on free 127.0.0.1 ports; killed, with its jobs, afterwards."""
    (gcs, dash, node_mgr, obj_mgr, client, agent_listen, agent_grpc, metrics, renv_agent) = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="cxr-jobs-head-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    cmd = [RAY, "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_listen),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(renv_agent), "--num-cpus", "2", "--num-gpus", "0",
           "--object-store-memory", str(200 * 1024**2), "--temp-dir", temp_dir]
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    # the cluster's `python` (jobs run `python -m cxr.cli`) is this venv's, as in an image with cxr installed
    env = {**os.environ, **auth, "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    headers = {"Authorization": f"Bearer {auth['RAY_AUTH_TOKEN']}"}
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}: {(Path(temp_dir) / 'ray-start.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{url}/api/jobs/", headers=headers, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the Ray head's job server did not come up in 90 s")
            time.sleep(0.5)
        yield Head(address=url, temp_dir=temp_dir, env=auth)
    finally:
        _stop_head(proc, url, temp_dir, headers)
        log.close()


def _stop_head(proc: subprocess.Popen, url: str, temp_dir: str, headers: dict[str, str]) -> None:
    """Stop the jobs still running, then this head's processes only."""
    try:
        for job in requests.get(f"{url}/api/jobs/", headers=headers, timeout=5).json():
            if job.get("status") in ("PENDING", "RUNNING"):
                requests.post(f"{url}/api/jobs/{job['submission_id']}/stop", headers=headers, timeout=5)
    except (requests.RequestException, ValueError, KeyError):
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # the whole session: ray start, GCS, raylet, dashboard, workers
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    deadline = time.monotonic() + 5
    while _pids_naming(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for pid in _pids_naming(temp_dir):  # stragglers (workers re-parented to init)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    subprocess.run(["rm", "-rf", temp_dir], check=False)


def _cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """The real ``cxr`` command in-process (no re-import of Ray per call: the 2 shared cores are busy)."""
    from cxr.cli import main

    base = {"RAY_ADDRESS": None, "RAY_API_SERVER_ADDRESS": None, "RAY_AUTH_TOKEN": None,
            "RAY_AUTH_TOKEN_PATH": "/nonexistent"}
    return CliRunner().invoke(main, list(args), env={**base, **(env or {})}, catch_exceptions=False)


def _on(head: Head) -> dict[str, str]:
    return {"RAY_ADDRESS": head.address, **head.env}


def _job_id(result: Result) -> str:
    return result.stdout.strip().splitlines()[0]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, sample_images: list[Path]) -> Path:
    """8 real X-rays in the Kaggle layout (labels from the folders)."""
    root = tmp_path_factory.mktemp("archive")
    for img in sample_images:
        dest = root / img.parent.name / img.name
        dest.parent.mkdir(exist_ok=True)
        shutil.copy(img, dest)
    return root


@pytest.mark.timeout(600)
def test_submit_train_then_screen_succeed(head: Head, data_dir: Path, archive: Path, tmp_path: Path) -> None:
    """A tiny train job and a screen job of its model, both through `cxr submit --follow`."""
    run = tmp_path / "run"
    t0 = time.monotonic()
    r = _cli("submit", "train", "--follow", "--image-has-cxr", "--data", str(data_dir), "--output", str(run),
             "--preset", "tiny", "--workers", "1", "--epochs", "1", "--limit", "16", "--image-size", "32",
             "--batch-size", "8", env=_on(head))
    assert r.exit_code == 0, r.output
    train_id = _job_id(r)
    assert "SUCCEEDED" in r.stderr
    assert (run / "model" / "metadata.json").is_file() and (run / "model" / "weights.pt").is_file()
    train_s = time.monotonic() - t0

    screens = tmp_path / "screens"
    r = _cli("submit", "screen", str(archive), "--model", str(run / "model"), "--output", str(screens),
             "--workers", "1", "--no-report", "-q", "--follow", "--image-has-cxr", env=_on(head))
    assert r.exit_code == 0, r.output
    screen_id = _job_id(r)
    parts = list(screens.rglob("*.parquet"))
    assert parts, f"no Parquet under {screens}: {sorted(p.name for p in screens.rglob('*'))}"
    import pyarrow.parquet as pq

    assert sum(pq.read_metadata(p).num_rows for p in parts) == 8
    print(f"train job {train_s:.0f} s, screen job {time.monotonic() - t0 - train_s:.0f} s")

    listed = _cli("jobs", "list", env=_on(head))
    assert listed.exit_code == 0 and train_id in listed.stdout and screen_id in listed.stdout
    status = _cli("jobs", "status", train_id, env=_on(head))
    assert status.exit_code == 0 and status.stdout.strip() == "SUCCEEDED"
    logs = _cli("jobs", "logs", screen_id, env=_on(head))
    assert logs.exit_code == 0 and logs.stdout.strip()


def test_jobs_stop_stops_a_running_job_and_follow_reports_failures(head: Head, data_dir: Path, tmp_path: Path) -> None:
    """`cxr jobs stop` ends a RUNNING job; `--follow` of a job that did not succeed exits non-zero with one line.

    The failing job is submitted first so that it runs while the other one starts (one less wait).
    """
    missing = tmp_path / "no-such-data"
    r = _cli("submit", "train", "--image-has-cxr", "--data", str(missing), "--output", str(tmp_path / "x"),
             "--preset", "tiny", env=_on(head))
    assert r.exit_code == 0, r.output
    failing_id = _job_id(r)
    r = _cli("submit", "train", "--image-has-cxr", "--data", str(data_dir), "--output", str(tmp_path / "long"),
             "--preset", "tiny", "--workers", "1", "--epochs", "200", "--limit", "64", "--image-size", "32",
             env=_on(head))
    assert r.exit_code == 0, r.output
    job_id = _job_id(r)
    deadline = time.monotonic() + 60
    while (status := _cli("jobs", "status", job_id, env=_on(head)).stdout.strip()) == "PENDING":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.5)
    assert status == "RUNNING"
    stopped = _cli("jobs", "stop", job_id, env=_on(head))
    assert stopped.exit_code == 0, stopped.output
    assert stopped.stdout.strip() == "STOPPED"
    followed = _cli("jobs", "logs", job_id, "--follow", env=_on(head))
    assert followed.exit_code != 0
    assert followed.stderr.strip().splitlines()[-1].startswith(f"error: job {job_id} STOPPED")

    # the failed job: its own error line (printed by the CLI on the cluster) comes back in the one line
    followed = _cli("jobs", "logs", failing_id, "--follow", env=_on(head))
    assert followed.exit_code != 0
    last = followed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: job {failing_id} FAILED: "), followed.stderr
    assert str(missing) in last


def test_unknown_job_id_is_one_line(head: Head) -> None:
    for args in (["status", "cxr-no-such-job"], ["logs", "cxr-no-such-job"], ["stop", "cxr-no-such-job"]):
        r = _cli("jobs", *args, env=_on(head))
        assert r.exit_code == 2
        assert r.stderr.strip() == f"error: no job 'cxr-no-such-job' on {head.address} (`cxr jobs list` shows the jobs there)"


def test_wrong_token_is_one_line(head: Head) -> None:
    r = _cli("jobs", "list", env={"RAY_ADDRESS": head.address, "RAY_AUTH_TOKEN": "not-the-token"})
    assert r.exit_code == 2
    assert "token authentication" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_explicit_address_wins_over_ray_address(head: Head) -> None:
    """Ray's client prefers $RAY_ADDRESS over its argument; --address must not be silently ignored."""
    (port,) = _free_ports(1)
    r = _cli("jobs", "list", "--address", head.address, env={**head.env, "RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert r.exit_code == 0, r.output


def test_unreachable_address_is_one_line() -> None:
    (port,) = _free_ports(1)
    for args in (["jobs", "list"], ["submit", "train", "--data", "/mnt/x", "--output", "/mnt/r"], ["jobs", "status", "x"]):
        r = _cli(*args, env={"RAY_ADDRESS": f"http://127.0.0.1:{port}"})
        assert r.exit_code == 2
        assert r.stderr.startswith(f"error: cannot reach a Ray cluster at http://127.0.0.1:{port}")
        assert len(r.stderr.strip().splitlines()) == 1


def test_no_address_is_one_line() -> None:
    r = _cli("jobs", "list")
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: no Ray cluster given: set RAY_ADDRESS=http://HEAD:8265 or pass --address"
    # a driver's address (what `cxr screen` on the cluster takes) is not the Jobs API's: say so, not "http://auto"
    for address in ("auto", "ray://head:10001"):
        r = _cli("jobs", "list", env={"RAY_ADDRESS": address})
        assert r.exit_code == 2 and "Jobs API: --address http://HEAD:8265" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_dry_run_passes_args_verbatim_and_keeps_its_own_flags() -> None:
    r = _cli("submit", "train", "--data", "/mnt/x rays", "--follow", "--workers", "4", "--env", "A=1",
             "--image-has-cxr", "--dry-run")
    assert r.exit_code == 0, r.output
    spec = json.loads(r.stdout)
    assert spec["entrypoint"] == "python -m cxr.cli train --data '/mnt/x rays' --workers 4"
    env = spec["runtime_env"]
    assert env["working_dir"] == str(ROOT) and "uv" not in env and env["env_vars"]["A"] == "1"
    assert ".venv/" in env["excludes"]
    # after `--`, even a name of submit's own options goes to the job: here to `cxr screen`, which has no --follow
    r = _cli("submit", "screen", "--dry-run", "--", "/a", "--model", "/m", "--follow")
    assert r.exit_code == 2 and "would refuse these arguments" in r.stderr and "--follow" in r.stderr, r.output
    r = _cli("submit", "screen", "--dry-run", "--", "/a", "--model", "/m", "--workers", "2")
    assert json.loads(r.stdout)["entrypoint"] == "python -m cxr.cli screen /a --model /m --workers 2"
    # a path flag given a URI fails here, in one line, not on the cluster after the upload and the install
    for args in (["train", "--data", "s3://b/x"], ["train", "--output=gs://b/r"], ["screen", "s3://b/a", "-m", "s3://b/m"]):
        r = _cli("submit", *args, "--dry-run")
        assert r.exit_code == 2 and "by path on every node" in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1
    r = _cli("submit", "screen", "s3://b/archive", "--model", "/mnt/m", "--output", "s3://b/out", "--dry-run")
    assert r.exit_code == 0, r.output  # archive and results may be URIs
    # the real CLI parses ARGS here: a typo fails now, not after the cluster built the job's environment
    r = _cli("submit", "train", "--data", "/mnt/x", "--output", "/mnt/r", "--epoch", "3", "--dry-run")
    assert r.exit_code == 2 and "would refuse these arguments" in r.stderr and "--epoch" in r.stderr, r.output
    r = _cli("submit", "train", "--data", "../shared/x", "--dry-run")  # relative, and no --output: said
    assert r.exit_code == 0 and "'../shared/x' is a relative path" in r.stderr and "no --output" in r.stderr, r.output


def test_locked_runtime_env_pins_every_direct_dependency() -> None:
    """Without --image-has-cxr the job env gets pyproject's dependencies at uv.lock's versions, minus Ray."""
    from ray.runtime_env import RuntimeEnv

    from jobs.submit import locked_requirements, runtime_env

    env = runtime_env()
    assert env["uv"]["packages"] == locked_requirements()
    RuntimeEnv(**env)  # Ray's own validation of every field (uv, excludes, config)
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    versions = {p["name"]: p["version"] for p in lock["package"]}
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower() for d in declared}
    pinned = {re.split(r"[\[=]", r, maxsplit=1)[0] for r in env["uv"]["packages"]}
    assert pinned == names - {"ray"}
    for req in env["uv"]["packages"]:
        name, version = re.match(r"([^\[=]+)(?:\[[^\]]*\])?==([^ ;]+)", req).groups()
        assert version in {p["version"] for p in lock["package"] if p["name"] == name}, req
    assert versions["ray"] == __import__("ray").__version__


def test_python_m_cxr_cli_is_the_job_entrypoint() -> None:
    """Jobs run `python -m cxr.cli ...`: it must work where the `cxr` script is not on PATH."""
    r = subprocess.run([PY, "-m", "cxr.cli", "jobs", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Usage: cxr jobs" in r.stdout

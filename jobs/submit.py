"""Ray Jobs plumbing behind ``cxr submit`` and ``cxr jobs``: entrypoints, runtime_env, a checked client.

The job's entrypoint is the ordinary CLI (``python -m cxr.cli train ...``), so a submitted job and a local
run take the same flags and the same code path. The runtime_env ships this checkout as ``working_dir``
and, unless the cluster image already has cxr, the direct dependencies pinned to ``uv.lock``.

Ray's own client errors (``ConnectionError``, ``RuntimeError("Request failed with status code 404...")``)
are turned into one-line :class:`~cxr.errors.CxrError` messages here, so every command says the same
thing for the same failure. Ray is imported lazily: ``cxr --help`` must not pay for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import re
import secrets
import shlex
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import yaml

from cxr.errors import CxrError, first_line
from cxr.storage import is_uri

if TYPE_CHECKING:  # pragma: no cover
    from ray.job_submission import JobDetails, JobSubmissionClient

#: the CLI commands a cluster job may run
JOB_COMMANDS = ("train", "screen")
#: the checkout shipped as working_dir (jobs/ sits at the project root)
PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ENV_SPEC = Path(__file__).with_name("runtime_env.yaml")
#: packages the cluster provides itself; installing Ray into a job's env would shadow the cluster's Ray
CLUSTER_PROVIDED = frozenset({"ray"})
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
PROBE_TIMEOUT_S = 5.0
#: how long a submission waits for a freshly started head's job agent ("No available agent ...")
AGENT_WAIT_S = 60.0
#: Ray client loggers that narrate every upload at INFO; the CLI prints its own summary instead
_CHATTY_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging",
                   "ray._private.runtime_env.working_dir", "ray.dashboard.modules.job.sdk")


#: flags whose value every node reads or writes by path: a URI there would fail on the cluster, after the upload
PATH_ONLY_FLAGS = {"train": ("--data", "--output"), "screen": ("--model", "-m")}


def entrypoint(command: str, args: Sequence[str]) -> str:
    """The shell command a job runs: the same CLI a local run uses, arguments quoted verbatim."""
    if command not in JOB_COMMANDS:
        raise CxrError(f"cannot submit {command!r}: choose one of {', '.join(JOB_COMMANDS)}")
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in PATH_ONLY_FLAGS.get(command, ()):
            value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            if is_uri(value):
                raise CxrError(f"{flag} {value}: `cxr {command}` reads {flag} by path on every node; give a path on a "
                               "filesystem the cluster's nodes mount (object-store URIs work for --storage, and for "
                               "screening's archive and --output)")
    return shlex.join(["python", "-m", "cxr.cli", command, *args])


#: parameters of `cxr train` / `cxr screen` that name a place on the cluster
_PLACES = {"train": ("data", "output", "storage", "pretrained"),
           "screen": ("archive", "model", "output", "labels", "metrics_file")}


def check_args(command: str, args: Sequence[str]) -> list[str]:
    """Parse ARGS with the real `cxr COMMAND` here, before anything is uploaded: an unknown flag or a
    missing argument is one line now, not a failed job after its environment was built (minutes). Returns
    warnings for paths that would not mean on the cluster what they mean here."""
    import click

    from cxr.cli import main

    entrypoint(command, args)  # its own checks first (a URI where a path must be)
    try:
        ctx = main.commands[command].make_context(command, list(args))
    except click.exceptions.Exit:  # --help among ARGS: nothing to check
        return []
    except click.UsageError as exc:
        raise CxrError(f"`cxr {command}` would refuse these arguments on the cluster: {exc.format_message()}") from None
    warnings = []
    if ctx.get_parameter_source("output") is not click.core.ParameterSource.COMMANDLINE:
        warnings.append(f"no --output: the results would land in {ctx.params['output']} inside the job's copy of this "
                        "checkout on the cluster, which is deleted with the job; give a path on the shared filesystem")
    for name in _PLACES[command]:
        value = ctx.params.get(name)
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.COMMANDLINE:
            continue  # a default: said above where it matters
        if isinstance(value, str) and value and value not in ("imagenet", "none") and not is_uri(value) \
                and not value.startswith(("/", "~")):
            warnings.append(f"{value!r} is a relative path: on the cluster it resolves inside the job's copy of "
                            "this checkout (deleted with the job), not on the shared filesystem; give an absolute path")
    return warnings


def project_root(root: Path = PROJECT_ROOT) -> Path:
    """The checkout to ship as working_dir; a site-packages install has no project to ship."""
    if not (root / "pyproject.toml").is_file() or not (root / "cxr" / "__init__.py").is_file():
        raise CxrError(f"cxr submit ships a cxr checkout as the job's working_dir, but {root} is not one "
                       "(no pyproject.toml): run it from a clone of the project")
    return root


def locked_requirements(root: Path = PROJECT_ROOT) -> list[str]:
    """cxr's direct dependencies as ``name[extras]==version ; marker``, versions taken from uv.lock.

    Direct dependencies only: uv resolves the rest on the node against the cluster's Ray, which is why
    Ray itself is left out (``CLUSTER_PROVIDED``); ``submit`` warns when the cluster's Ray differs from
    the locked one.
    """
    lock_path = root / "uv.lock"
    lock = _read_lock(lock_path)
    versions: dict[str, list[str]] = {}
    for pkg in lock.get("package", []):
        versions.setdefault(pkg["name"], []).append(pkg.get("version", ""))
    project = next((p for p in lock.get("package", []) if p["name"] == "cxr"), None)
    if project is None:
        raise CxrError(f"{lock_path} has no entry for cxr: run `uv lock`")
    reqs: list[str] = []
    for dep in project.get("dependencies", []):
        name = dep["name"]
        if name in CLUSTER_PROVIDED:
            continue
        version = dep.get("version") or (versions.get(name) or [""])[0]
        if not version or (not dep.get("version") and len(versions.get(name, [])) > 1):
            raise CxrError(f"{lock_path}: no single locked version of {name}: run `uv lock`")
        extras = f"[{','.join(dep['extra'])}]" if dep.get("extra") else ""
        marker = f" ; {dep['marker']}" if dep.get("marker") else ""
        reqs.append(f"{name}{extras}=={version}{marker}")
    return reqs


def locked_ray_version(root: Path = PROJECT_ROOT) -> str | None:
    """The Ray version uv.lock pins (the one the cluster should run)."""
    lock = _read_lock(root / "uv.lock")
    return next((p.get("version") for p in lock.get("package", []) if p["name"] == "ray"), None)


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CxrError(f"cannot read {path}: {exc}") from None


def runtime_env(image_has_cxr: bool = False, env: dict[str, str] | None = None,
                root: Path | None = None) -> dict[str, Any]:
    """The runtime_env dict for a submitted job: ``jobs/runtime_env.yaml`` plus working_dir and deps."""
    root = project_root(root or PROJECT_ROOT)
    spec = yaml.safe_load(RUNTIME_ENV_SPEC.read_text()) or {}
    result = copy.deepcopy(spec)
    result["working_dir"] = str(root)
    if not image_has_cxr:
        result["uv"] = {"packages": locked_requirements(root)}
    if env:
        result["env_vars"] = {**result.get("env_vars", {}), **env}
    return result


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings (from ``--env``) to a dict; a bad pair is a one-line error."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise CxrError(f"--env expects KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def submission_id(command: str) -> str:
    """A readable, unique job id (``cxr-train-20260101-120000-ab12``) instead of Ray's random one."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"cxr-{command}-{stamp}-{secrets.token_hex(2)}"


# --------------------------------------------------------------------------------------------- client


def dashboard_url(address: str | None) -> str:
    """RAY_ADDRESS or --address as the dashboard's HTTP URL (``host:8265`` gets ``http://``)."""
    address = (address or "").strip()
    if not address:
        raise CxrError("no Ray cluster given: set RAY_ADDRESS=http://HEAD:8265 or pass --address")
    if address in ("auto", "local") or address.startswith("ray://"):
        raise CxrError(f"{address!r} is an address for Ray drivers (`cxr train/screen/serve` on the cluster); "
                       "`cxr submit` and `cxr jobs` use the cluster's Jobs API: --address http://HEAD:8265")
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    """Ray's client lets RAY_ADDRESS override its ``address`` argument; an explicit --address must win."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def auth_headers() -> dict[str, str]:
    """The bearer token for clusters with Ray token authentication, from where Ray's own CLI looks.

    RAY_AUTH_TOKEN, else the file at RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; none: no header
    (a cluster without token auth ignores it, one with it answers 401 and ``connect`` says so).
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        with contextlib.suppress(OSError):
            token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str | None) -> JobSubmissionClient:
    """A JobSubmissionClient for ``address``, failing fast and in one line when nothing answers there.

    Ray's client sends its first request without a timeout (a firewalled address hangs), so a short
    probe of ``/api/version`` runs first; it also turns a token mismatch into one line.
    """
    url = dashboard_url(address)
    headers = auth_headers()
    if url.startswith(("http://", "https://")):
        import requests

        try:
            r = requests.get(f"{url}/api/version", headers=headers, timeout=PROBE_TIMEOUT_S)
        except requests.RequestException as exc:
            raise CxrError(f"cannot reach a Ray cluster at {url} ({type(exc).__name__}): is the head running "
                           "and its dashboard port (8265) reachable from here?") from None
        if r.status_code in (401, 403):
            raise CxrError(f"the Ray cluster at {url} refused the request (HTTP {r.status_code}): it uses token "
                           "authentication; set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token")
        if r.status_code != 200 or "ray_version" not in r.text:
            raise CxrError(f"{url} answered HTTP {r.status_code} but is not a Ray dashboard (no /api/version)")
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)

    with _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        try:
            return JobSubmissionClient(url, headers=headers)
        except (ConnectionError, RuntimeError, ValueError, AuthenticationError) as exc:
            raise CxrError(f"cannot use the Ray cluster at {url}: {first_line(exc)}") from None


def cluster_ray_version(client: JobSubmissionClient) -> str | None:
    """The Ray version the cluster reported when the client connected."""
    return getattr(client, "_server_ray_version", None)


def _is_missing(exc: Exception) -> bool:
    text = str(exc)
    return "status code 404" in text or "does not exist" in text


def submit(client: JobSubmissionClient, command: str, args: Sequence[str], *, image_has_cxr: bool = False,
           env: dict[str, str] | None = None, job_id: str | None = None,
           entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None) -> str:
    """Submit ``cxr COMMAND ARGS`` as a Ray job; returns its submission id."""
    renv = runtime_env(image_has_cxr=image_has_cxr, env=env)
    job_id = job_id or submission_id(command)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint(command, args),
                submission_id=job_id,
                runtime_env=renv,
                metadata={"cxr_command": command, "cxr_deps": "image" if image_has_cxr else "uv.lock"},
                entrypoint_num_cpus=entrypoint_num_cpus,
                entrypoint_num_gpus=entrypoint_num_gpus,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            # a head that has just started answers 500 until its job agent registers
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise CxrError(f"submitting {command} failed: {first_line(exc)}") from None


def job_info(client: JobSubmissionClient, job_id: str) -> JobDetails:
    """The job's details; an unknown id is a one-line error that points at ``cxr jobs list``."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        if _is_missing(exc):
            raise CxrError(f"no job {job_id!r} on {client.get_address()} (`cxr jobs list` shows the jobs there)") from None
        raise CxrError(f"cannot get job {job_id!r}: {first_line(exc)}") from None
    except ConnectionError as exc:
        raise CxrError(f"lost the Ray cluster at {client.get_address()}: {first_line(exc)}") from None


def list_jobs(client: JobSubmissionClient) -> list[JobDetails]:
    """Every job the cluster knows, oldest first."""
    try:
        jobs = client.list_jobs()
    except (ConnectionError, RuntimeError) as exc:
        raise CxrError(f"cannot list jobs on {client.get_address()}: {first_line(exc)}") from None
    return sorted(jobs, key=lambda j: j.start_time or 0)


def logs(client: JobSubmissionClient, job_id: str) -> str:
    """Everything the job printed so far."""
    job_info(client, job_id)
    try:
        return client.get_job_logs(job_id)
    except RuntimeError as exc:
        raise CxrError(f"cannot read the logs of {job_id!r}: {first_line(exc)}") from None


def wait(client: JobSubmissionClient, job_id: str, timeout_s: float = 60.0, poll_s: float = 0.5) -> JobDetails:
    """Poll until the job reaches a terminal status (or the timeout; then its current details)."""
    deadline = time.monotonic() + timeout_s
    info = job_info(client, job_id)
    while str(info.status) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(poll_s)
        info = job_info(client, job_id)
    return info


def follow(client: JobSubmissionClient, job_id: str, out: IO[str] | None = None) -> JobDetails:
    """Stream the job's logs to ``out`` until it ends; returns its final details.

    Ctrl-C stops following, not the job (the hint says how to stop it).
    """
    out = out or sys.stdout
    job_info(client, job_id)

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
    except KeyboardInterrupt:
        print(f"\nstopped following; {job_id} keeps running (stop it with `cxr jobs stop {job_id}`)",
              file=sys.stderr)
        raise
    except (RuntimeError, OSError):
        pass  # the log socket dropped (head restart, proxy timeout): fall back to polling the status
    # the socket closes as the job ends; its status may flip a moment later
    return wait(client, job_id, timeout_s=24 * 3600)


def stop(client: JobSubmissionClient, job_id: str, timeout_s: float = 60.0) -> JobDetails:
    """Ask the job to stop (SIGTERM, then SIGKILL after Ray's grace period) and wait for it to end."""
    info = job_info(client, job_id)
    if str(info.status) in TERMINAL:
        return info
    try:
        client.stop_job(job_id)
    except RuntimeError as exc:
        raise CxrError(f"cannot stop {job_id!r}: {first_line(exc)}") from None
    return wait(client, job_id, timeout_s=timeout_s)


def failure_line(info: JobDetails) -> str:
    """One line on why a job did not succeed: Ray's message head plus the last line the job printed.

    Ray's FAILED message is "Job entrypoint command failed with exit code N, last available logs ...:"
    followed by the log tail; the last non-empty line of that tail is usually the cause
    (``error: ...`` from the CLI, or a traceback's final line).
    """
    message = (info.message or "").strip()
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    head = lines[0].split(", last available logs")[0].rstrip(":") if lines else ""
    cause = lines[-1] if len(lines) > 1 else ""
    parts = [f"job {info.submission_id} {info.status}"]
    if head:
        parts.append(head)
    if cause:
        parts.append(cause)
    return ": ".join(parts)

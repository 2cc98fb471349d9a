"""`cxr submit` and `cxr jobs`: run train/screen on a remote Ray cluster through Ray's Job Submission API.

The work is in ``jobs/submit.py`` (imported lazily, it pulls in Ray); this module is the click surface.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import click

from cxr.cli import CONTEXT

F = TypeVar("F", bound=Callable[..., Any])


def _address_option(f: F) -> F:
    return click.option(
        "--address", envvar="RAY_ADDRESS", metavar="URL",
        help="The cluster's dashboard / job server, e.g. http://HEAD:8265 (default: $RAY_ADDRESS).",
    )(f)


def _exit_with(info: Any) -> None:
    """Exit 0 when the job SUCCEEDED; otherwise one line on why (CxrError -> non-zero exit)."""
    from jobs import submit as js

    if str(info.status) != "SUCCEEDED":
        from cxr.errors import CxrError

        raise CxrError(js.failure_line(info))
    click.secho(f"job {info.submission_id} SUCCEEDED", fg="green", err=True)


@click.command(
    "submit",
    context_settings={**CONTEXT, "ignore_unknown_options": True},
    short_help="Run train/screen on a Ray cluster (Ray Jobs).",
)
@click.argument("command", type=click.Choice(["train", "screen"]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@_address_option
@click.option("--follow", is_flag=True, help="Stream the job's logs and exit with its status (non-zero unless SUCCEEDED).")
@click.option("--image-has-cxr", is_flag=True,
              help="The cluster image already has cxr and its dependencies (deploy/Dockerfile): ship the code only, "
                   "install nothing. Default: install the uv.lock-pinned dependencies into the job's env.")
@click.option("--env", "env_pairs", multiple=True, metavar="KEY=VALUE", help="Extra environment variable for the job (repeatable).")
@click.option("--job-id", default=None, help="Submission id (default: cxr-COMMAND-TIMESTAMP-XXXX).")
@click.option("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the job's driver process.")
@click.option("--entrypoint-num-gpus", type=float, default=None, help="GPUs reserved for the job's driver process.")
@click.option("--dry-run", is_flag=True, help="Print the entrypoint and runtime_env as JSON; submit nothing.")
def submit_cmd(command: str, args: tuple[str, ...], address: str | None, follow: bool, image_has_cxr: bool,
               env_pairs: tuple[str, ...], job_id: str | None, entrypoint_num_cpus: float | None,
               entrypoint_num_gpus: float | None, dry_run: bool) -> None:
    """Submit `cxr COMMAND ARGS...` as a job to the Ray cluster at RAY_ADDRESS.

    The job runs this checkout (shipped as the runtime_env working_dir) with the same flags a local run
    takes. Paths in ARGS are read and written ON THE CLUSTER, by every node: train's --data and
    --output and screen's --model need a filesystem mounted at the same path on every node (NFS, a PVC:
    /mnt/cxr below); screen's ARCHIVE and --output and train's --storage may also be URIs (s3://...).
    The job id is printed on stdout.

    Options of `cxr submit` itself may come anywhere; put `--` before ARGS if one of them shares a name.

    \b
    Examples:
      export RAY_ADDRESS=http://ray-head:8265
      cxr submit train --data /mnt/cxr/data/chest_xray --output /mnt/cxr/runs/r1 --workers 4 --gpus 1 --follow
      cxr submit screen s3://bucket/archive --model /mnt/cxr/runs/r1/model --output s3://bucket/screens/ --follow
      cxr submit --image-has-cxr train -- --preset gpu --data /mnt/data --output /mnt/runs/r2
    """
    from jobs import submit as js

    env = js.parse_env(env_pairs)
    for warning in js.check_args(command, args):
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    if dry_run:
        spec = {"entrypoint": js.entrypoint(command, args),
                "runtime_env": js.runtime_env(image_has_cxr=image_has_cxr, env=env)}
        click.echo(json.dumps(spec, indent=2))
        return
    client = js.connect(address)
    locked = js.locked_ray_version()
    running = js.cluster_ray_version(client)
    if locked and running and locked != running:
        click.secho(f"warning: the cluster runs Ray {running}, uv.lock pins {locked}", fg="yellow", err=True)
    submitted = js.submit(client, command, args, image_has_cxr=image_has_cxr, env=env, job_id=job_id,
                          entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus)
    click.echo(submitted)
    click.echo(f"submitted to {client.get_address()}", err=True)
    if not follow:
        click.echo(f"  logs: cxr jobs logs {submitted} --follow\n  stop: cxr jobs stop {submitted}", err=True)
        return
    _exit_with(js.follow(client, submitted))


@click.group("jobs", context_settings=CONTEXT)
def jobs_group() -> None:
    """List, inspect, follow and stop jobs on the Ray cluster at RAY_ADDRESS.

    RAY_ADDRESS (or each sub-command's --address) is the cluster's Jobs API,
    the dashboard's http://HEAD:8265, as for `cxr submit`.

    \b
    Examples:
      export RAY_ADDRESS=http://head:8265
      cxr jobs list
      cxr jobs status raysubmit_XYZ
      cxr jobs logs raysubmit_XYZ --follow     # exits with the job: 0 if it succeeded
      cxr jobs stop raysubmit_XYZ
    """


@jobs_group.command("list")
@_address_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per job instead of a table.")
def jobs_list(address: str | None, as_json: bool) -> None:
    """Every job the cluster knows, oldest first: id, status, start time, entrypoint."""
    from jobs import submit as js

    client = js.connect(address)
    for info in js.list_jobs(client):
        if as_json:
            click.echo(json.dumps({"job_id": info.submission_id or info.job_id, "status": str(info.status),
                                   "start_time": info.start_time, "end_time": info.end_time,
                                   "entrypoint": info.entrypoint, "message": info.message}))
            continue
        started = datetime.fromtimestamp(info.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") if info.start_time else "-"
        entry = info.entrypoint if len(info.entrypoint) <= 70 else info.entrypoint[:67] + "..."
        click.echo(f"{info.submission_id or info.job_id:<36} {str(info.status):<10} {started}  {entry}")


@jobs_group.command("status")
@click.argument("job_id")
@_address_option
def jobs_status(job_id: str, address: str | None) -> None:
    """The job's status and Ray's message about it (exit 0 whatever the status)."""
    from jobs import submit as js

    info = js.job_info(js.connect(address), job_id)
    click.echo(str(info.status))
    if info.message:
        click.echo(info.message.strip().splitlines()[0], err=True)


@jobs_group.command("logs")
@click.argument("job_id")
@_address_option
@click.option("--follow", is_flag=True, help="Keep streaming until the job ends, then exit with its status.")
def jobs_logs(job_id: str, address: str | None, follow: bool) -> None:
    """Print what the job has logged (driver stdout/stderr)."""
    from jobs import submit as js

    client = js.connect(address)
    if follow:
        _exit_with(js.follow(client, job_id))
        return
    sys.stdout.write(js.logs(client, job_id))


@jobs_group.command("stop")
@click.argument("job_id")
@_address_option
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True,
              help="Seconds to wait for the job to end after asking it to stop.")
def jobs_stop(job_id: str, address: str | None, timeout_s: float) -> None:
    """Stop a running job (SIGTERM to its driver, SIGKILL after Ray's grace period) and wait for it."""
    from cxr.errors import CxrError
    from jobs import submit as js

    info = js.stop(js.connect(address), job_id, timeout_s=timeout_s)
    if str(info.status) not in js.TERMINAL:
        raise CxrError(f"job {job_id} is still {info.status} after {timeout_s:.0f}s")
    click.echo(str(info.status))


COMMANDS: list[click.Command] = [submit_cmd, jobs_group]

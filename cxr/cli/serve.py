"""`cxr serve`: the HTTP prediction API on Ray Serve (local Ray by default, or the cluster at RAY_ADDRESS).

Ray and the Serve app are imported only when the command runs, so
``cxr --help`` stays instant.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import click

from cxr.config import ENGINE_HELP, ENGINES, AutoscalingConfig, ServeConfig
from cxr.errors import interrupt_on_termination

_DEFAULT = ServeConfig()
_AUTO = AutoscalingConfig()
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
#: out-of-range values fail here, in one line, not after Ray has started (or inside the replicas)
_PORT = click.IntRange(1, 65535)
_POSITIVE = click.FloatRange(min=0, min_open=True)
_NON_NEGATIVE = click.FloatRange(min=0)


def build_config(**kw) -> ServeConfig:
    """ServeConfig from CLI values (None = keep the default)."""
    auto_keys = {"min_replicas", "max_replicas", "target_ongoing_requests"}
    auto = AutoscalingConfig(**{k: v for k, v in kw.items() if k in auto_keys and v is not None})
    if auto.min_replicas > auto.max_replicas:
        raise click.BadParameter(f"--min-replicas {auto.min_replicas} > --max-replicas {auto.max_replicas}")
    fields = {k: v for k, v in kw.items() if k not in auto_keys and v is not None}
    if fields.get("model"):
        # replicas run elsewhere (cwd): an absolute path, but symlinks kept (models/current stays "current")
        fields["model"] = os.path.abspath(Path(fields["model"]).expanduser())
    return ServeConfig(autoscaling=auto, **fields)


@click.command("serve", context_settings=CONTEXT)
@click.option("--model", type=click.Path(file_okay=False), help="Exported model directory (from `cxr train`).")
@click.option("--host", default=_DEFAULT.host, show_default=True,
              help="Interface the HTTP proxy binds (0.0.0.0 to accept remote clients).")
@click.option("--port", type=_PORT, default=_DEFAULT.port, show_default=True, help="HTTP port of the API.")
@click.option("--metrics-port", type=_PORT, default=_DEFAULT.metrics_port, show_default=True,
              help="Prometheus port of the local Ray instance (cxr_* and ray_serve_* series).")
@click.option("--min-replicas", type=click.IntRange(min=0), default=_AUTO.min_replicas, show_default=True,
              help="Autoscaling floor (0 = scale to zero when idle; the first request then waits for a replica).")
@click.option("--max-replicas", type=click.IntRange(min=1), default=_AUTO.max_replicas, show_default=True,
              help="Autoscaling ceiling; Serve adds replicas while each has more than the target in flight.")
@click.option("--target-ongoing-requests", type=_POSITIVE, default=_AUTO.target_ongoing_requests, show_default=True,
              help="Autoscaling target: in-flight requests per replica.")
@click.option("--gpus-per-replica", type=_NON_NEGATIVE, default=_DEFAULT.gpus_per_replica, show_default=True,
              help="GPUs per replica (fractional allowed, e.g. 0.5 packs two replicas per GPU).")
@click.option("--cpus-per-replica", type=_NON_NEGATIVE, default=_DEFAULT.cpus_per_replica, show_default=True,
              help="CPUs Ray reserves per replica (and the engine's threads unless --engine-threads).")
@click.option("--engine-threads", type=click.IntRange(min=0), default=_DEFAULT.engine_threads, show_default=True,
              help="Engine intra-op threads per replica; 0 = --cpus-per-replica. CPU serving with one replica: "
                   "all the cores (e.g. 2 with the default 1 reserved CPU) batches best (BENCHMARKS.md).")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=_DEFAULT.max_batch_size, show_default=True,
              help="Dynamic batching: most images per model forward (1 = no batching).")
@click.option("--batch-wait-ms", type=_NON_NEGATIVE, default=_DEFAULT.batch_wait_ms, show_default=True,
              help="Dynamic batching: longest wait for a batch to fill.")
@click.option("--max-ongoing-requests", type=click.IntRange(min=1), default=_DEFAULT.max_ongoing_requests,
              show_default=True, help="In-flight requests per replica.")
@click.option("--max-queued-requests", type=click.IntRange(min=-1), default=_DEFAULT.max_queued_requests,
              show_default=True, help="Queued requests per proxy before answering 503 (overload); -1 = no limit.")
@click.option("--engine", type=click.Choice(ENGINES), default=_DEFAULT.engine, show_default=True, help=ENGINE_HELP)
@click.option("--max-body-mb", type=_POSITIVE, default=_DEFAULT.max_body_mb, show_default=True,
              help="Request body cap in MiB (413 above it).")
@click.option("--request-timeout-s", type=_POSITIVE, default=_DEFAULT.request_timeout_s, show_default=True,
              help="A request not answered in this time gets 503 'timeout' (with Retry-After).")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None,
              help="CPUs of the local Ray instance (default: all).")
@click.option("--print-config", is_flag=True,
              help="Print the Ray Serve config YAML for these flags (for `serve deploy`) and exit.")
def serve_cmd(print_config: bool, num_cpus: int | None, **kw) -> None:
    """Serve predictions over HTTP with Ray Serve: dynamic batching, autoscaling, Prometheus metrics.

    \b
    Starts a local Ray instance (or joins the cluster at RAY_ADDRESS) and the app:
      POST /v1/predict        one image: raw body (image/*, application/dicom, octet-stream)
                              or multipart field 'file'  ->  P(class), label, threshold, model id
      POST /v1/predict/batch  several images, multipart (one part each)
      GET  /v1/model          the export's metadata;  GET /healthz, /readyz;  /docs (OpenAPI)
    Set CXR_API_TOKEN to require 'Authorization: Bearer <token>' on /v1/*.
    Ctrl-C or SIGTERM drains in-flight requests and stops everything this command started.
    Settings without a flag here (overload status and Retry-After, health-check and
    shutdown timings, preprocessing threads, batch route size) are in the YAML that
    --print-config prints: edit it and `serve deploy` it.

    \b
    Examples:
      cxr serve --model runs/r1/model
      curl -H 'Content-Type: image/jpeg' --data-binary @xray.jpeg http://127.0.0.1:8000/v1/predict
      cxr serve --model /models/r1 --gpus-per-replica 0.5 --max-replicas 4 --print-config > serve.yaml
    """
    from cxr.errors import CxrError

    cfg = build_config(**kw)
    from serve import runner

    runner.validate(cfg)  # what Serve would refuse (e.g. --max-queued-requests 0), in one line, before Ray starts
    if print_config:
        from serve.schema import PRINTED_HEADER, serve_config_document, to_yaml

        click.echo(to_yaml(serve_config_document(cfg), PRINTED_HEADER), nl=False)
        return
    if not cfg.model:
        raise CxrError("--model is required (an export directory written by `cxr train`)")
    from cxr.export import read_metadata

    meta = read_metadata(cfg.model)
    from serve.schema import api_token

    token = api_token()  # the replicas refuse a blank one too: say so before Ray starts
    click.echo(f"starting Ray Serve for model {meta.model_id[:12]} ({meta.model_version or 'unnamed'}) ...", err=True)

    interrupt_on_termination()  # SIGTERM (docker stop, Kubernetes, systemd) behaves like Ctrl-C: drain and stop
    # an ignored SIGINT is inherited from the parent process (Python then installs no Ctrl-C handler):
    # install it explicitly so Ctrl-C always stops the server
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = None
    try:
        started = runner.start(cfg, num_cpus=num_cpus, quiet=True)
        interrupt_on_termination()  # again: ray.init installed its own (sys.exit, no drain)

        base = started.base_url
        click.echo(f"cxr serve: model {meta.model_id[:12]} ({', '.join(meta.classes)}; threshold {meta.threshold:.3f})")
        click.echo(f"  API      {base}/v1/predict   (also /v1/predict/batch, /v1/model)")
        click.echo(f"  docs     {base}/docs")
        click.echo(f"  health   {base}/healthz   {base}/readyz")
        if started.metrics_url:
            click.echo(f"  metrics  {started.metrics_url}   (Prometheus: ray_cxr_* and ray_serve_* series)")
        else:
            click.echo("  metrics  on the cluster's Ray metrics export port (ray_cxr_* series)")
        click.echo(f"  auth     {'bearer token required on /v1/* (CXR_API_TOKEN)' if token else 'off (set CXR_API_TOKEN to require a bearer token)'}")
        click.echo("Ctrl-C to stop.")
        sys.stdout.flush()
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        click.echo("stopping: draining in-flight requests ...", err=True)
    finally:
        if started is not None:
            # a second Ctrl-C/SIGTERM (impatient user, a supervisor repeating itself) must not cut the
            # drain short and skip ray.shutdown: the watchdog below bounds the wait instead
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            # Ray's own shutdown can block (seen after other Ray sessions on the machine): never hang on
            # Ctrl-C. A hard exit still stops everything we started: Ray's processes die with their parent.
            watchdog = threading.Timer(cfg.graceful_shutdown_timeout_s + 45.0, _forced_exit)
            watchdog.daemon = True
            watchdog.start()
            runner.stop(started)
            click.echo("stopped.", err=True)


def _forced_exit() -> None:
    """Serve has drained (bounded in runner.stop) but ray.shutdown() blocked: leave anyway.

    Ray's processes were started with PR_SET_PDEATHSIG, so they die with this one.
    """
    click.echo("stopped. (Ray's shutdown did not return in time; exiting without it)", err=True)
    sys.stderr.flush()
    os._exit(0)


COMMANDS: list[click.Command] = [serve_cmd]

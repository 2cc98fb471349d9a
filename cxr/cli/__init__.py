"""The ``cxr`` command: one entry point for training, screening, reports, serving and clusters.

Each sub-command lives in its own module and imports Ray/torch lazily, so
``cxr --help`` is instant and ``import cxr`` never imports Ray.
"""

from __future__ import annotations

import os
import signal
import sys

import click

from cxr import __version__
from cxr.errors import CxrError, first_line

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Main(click.Group):
    """Turns CxrError, and the file system's refusals (OSError), into one line and exit 2 (no traceback)."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except CxrError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:  # an output path that is a file, a folder without write permission, a full disk
            if os.environ.get("CXR_DEBUG") == "1":  # a bug can be an OSError too: its traceback on request
                raise
            click.secho(f"error: {_os_message(exc)}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt as exc:  # Ctrl-C, or a cxr.errors.Terminated (SIGTERM, SIGHUP)
            signum = getattr(exc, "signum", signal.SIGINT)
            click.echo("interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})",
                       err=True)
            sys.exit(128 + signum)


def _os_message(exc: OSError) -> str:
    """'Permission denied: out/results' rather than a traceback; the path is what the user must fix."""
    if exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    return first_line(exc)


@click.group(cls=_Main, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="cxr")
def main() -> None:
    """cxr: pneumonia screening of chest X-rays on Ray.

    \b
    Typical flow:
      cxr train  --data ../shared/data/chest_xray --output runs/r1     # Ray Train (DDP)
      cxr screen /archive --model runs/r1/model --output screens/      # Ray Data -> Parquet
      cxr report screens/ --output reports/                            # evaluation report
      cxr serve  --model runs/r1/model                                 # Ray Serve HTTP API
      cxr submit train -- --data ... --output ...                      # on a remote Ray cluster

    Every command runs on a local Ray instance it starts itself, or on the
    cluster named by RAY_ADDRESS. `cxr COMMAND --help` explains each one.
    """
    if not sys.stdout.isatty():  # logs and pipes: Ray prefixes worker lines with ANSI colours unless told not to
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def _register() -> None:
    from cxr.cli import cluster, screen, serve, train

    for module in (train, screen, serve, cluster):
        for command in module.COMMANDS:
            main.add_command(command)


_register()

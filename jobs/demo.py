"""`make demo`: the whole flow on the bundled samples, in one local Ray instance.

Trains a tiny model on the 32 sample X-rays (2 DDP workers, seconds per epoch),
then screens the same folder with it and writes the evaluation report. The
model is not useful (32 images); the point is to see every piece run.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

SAMPLES = Path(__file__).resolve().parents[1] / "cxr" / "assets" / "samples"


def _run(args: list[str]) -> None:
    from cxr.cli import main

    click.secho(f"\n$ cxr {shlex.join(args)}", bold=True)
    try:
        main(args, standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise


def demo(output: str = "demo-out") -> None:
    import shutil

    from jobs.common import init_ray

    out = Path(output)
    for old in (out / "run", out / "screen"):  # the demo always starts fresh, and removes nothing else
        if old.is_dir():
            shutil.rmtree(old)
    started = init_ray(num_cpus=2)
    try:
        _run(["train", "--data", str(SAMPLES), "--output", str(out / "run"), "--preset", "tiny",
              "--epochs", "2", "--workers", "2", "--val-fraction", "0.25"])
        _run(["screen", str(SAMPLES), "--model", str(out / "run" / "model"), "--output", str(out / "screen"),
              "--metrics-file", str(out / "screen.prom")])
    finally:
        if started:
            import ray

            ray.shutdown()
    click.secho(f"\ndemo done: model in {out}/run/model, scores in {out}/screen/, "
                f"report in {out}/screen/report/report.html", fg="green")


if __name__ == "__main__":
    demo(sys.argv[1] if len(sys.argv) > 1 else "demo-out")

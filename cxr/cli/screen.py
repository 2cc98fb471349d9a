"""`cxr screen` (score an archive into Parquet with Ray Data) and `cxr report` (evaluate results)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import get_args

import click

from cxr.config import ENGINE_HELP, ENGINES, NewModel, ScreenConfig, save_json
from cxr.errors import Busy, CxrError

_D = ScreenConfig()


class _ProgressLine:
    """Rows/s on stderr: rewritten in place on a terminal, a line every 10 s in logs."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.every = 0.5 if self.tty else 10.0
        self.last = 0.0
        self.pending = None  # the newest progress not shown yet: close() shows it

    def __call__(self, p, force: bool = False) -> None:  # p: jobs.screen.Progress
        now = time.monotonic()
        if not (p.stage or force) and now - self.last < self.every and p.done < p.total:
            self.pending = p
            return
        self.last, self.pending = now, None
        if p.stage:  # start-up: say what the run waits for, so ~15 s of silence does not look like a hang
            line = f"screen: {p.total} files  {p.stage}  {p.elapsed_s:.0f}s"
        else:
            line = (f"screen: {p.done}/{p.total} new rows ({p.done / max(1, p.total):.0%} of files)  "
                    f"{p.rate:.1f} rows/s  errors {p.errors}  {p.elapsed_s:.0f}s")
        click.echo(("\r" + line + "\033[K") if self.tty else line, err=True, nl=not self.tty)

    def close(self) -> None:
        if self.pending is not None:  # a rerun's last rows (done < total: the rest were skipped)
            self(self.pending, force=True)
        if self.tty and self.last:
            click.echo("", err=True)


@click.command("screen")
@click.argument("archive")
@click.option("--model", "-m", required=True, help="Model export directory (written by `cxr train`).")
@click.option("--output", "-o", default=_D.output, show_default=True,
              help="Results folder (local path or pyarrow URI). Rerunning on it scores only new/changed files.")
@click.option("--labels", default=None, metavar="MANIFEST",
              help="CSV/Parquet with path,label[,subtype,sha256] (paths relative to it). "
                   "Default: labels from NORMAL/PNEUMONIA folder names under ARCHIVE when present.")
@click.option("--glob", default=None, metavar="PATTERN",
              help="Only files matching PATTERN (case-sensitive: '*.jpg' does not match X.JPG): on the file name "
                   "if it has no '/', else on the path under ARCHIVE.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N input files (sorted by path; the same N each run, done or not).")
@click.option("--force", is_flag=True,
              help="Rescore the selected files even if already done (new rows supersede old ones); on a folder "
                   "holding another model's results, move them to OUTPUT/replaced/ and take the folder over.")
@click.option("--new-model", type=click.Choice(get_args(NewModel)), default=_D.new_model, show_default=True,
              help="When OUTPUT holds another model's results (a new model was promoted): refuse, or rescore: "
                   "move them (all of them, also rows of files --glob/--limit leave out) to OUTPUT/replaced/ "
                   "and score every selected file with this model, once; later runs with it resume as usual. "
                   "What a scheduled job whose --model is swapped needs.")
@click.option("--fail-on-error", is_flag=True, help="Exit 1 if any file this run processed could not be scored (default: error rows, exit 0). "
                   "Files that failed in an earlier run count as done (except read_failed and out_of_memory, "
                   "which every run retries); "
                   "--force retries them.")
@click.option("--batch-size", type=click.IntRange(min=0), default=_D.batch_size, show_default=True,
              help="Images per inference call; 0 = where the engine is fastest: 16 for torch-bf16 on a CPU, "
                   "32 for onnx and torch on a CPU, 64 on a GPU.")
@click.option("--workers", type=click.IntRange(min=0), default=_D.workers, show_default=True,
              help="Inference actors; 0 = one per CPU (or per --gpus-per-worker share of the GPUs). A small "
                   "run gets fewer: at most one actor per 4 batches of new files.")
@click.option("--threads-per-worker", type=click.IntRange(min=0), default=_D.threads_per_worker, show_default=True,
              help="Engine intra-op threads per actor; 0 = 1 (auto actors) or CPUs/actors (with --workers).")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=_D.gpus_per_worker, show_default=True,
              help="GPUs per inference actor (fractions share a GPU); 0 = CPU actors.")
@click.option("--engine", type=click.Choice(ENGINES), default=_D.engine, show_default=True, help=ENGINE_HELP)
@click.option("--report/--no-report", default=_D.report, show_default=True,
              help="Write OUTPUT/report (metrics.json, plots, report.html) when true labels are known.")
@click.option("--metrics-file", default=None, metavar="PATH",
              help="Write the run's Prometheus metrics here (text format, e.g. for node_exporter's textfile collector).")
@click.option("--pushgateway", default=None, metavar="URL", help="Also push the metrics to this Prometheus Pushgateway.")
@click.option("--part-rows", type=click.IntRange(min=1), default=_D.part_rows, show_default=True,
              help="Rows before a Parquet part is written (at least: whole blocks go into a part; a killed "
                   "run rescores at most the rows not yet in a part).")
@click.option("--quiet", "-q", is_flag=True, help="No progress line.")
def screen_cmd(archive: str, quiet: bool, **kw) -> None:
    """Score every X-ray under ARCHIVE into Parquet, on Ray Data.

    ARCHIVE is a folder (searched recursively), a single file, or a pyarrow
    filesystem URI (s3://bucket/prefix, gs://..., file:///...). Files are
    recognised by content: JPEG, PNG (8/16-bit), DICOM, TIFF, BMP, WebP, GIF;
    files with an image extension that are not images become error rows.
    Folder symlinks are followed unless they lead back into the archive.

    \b
    Every input file gets exactly one current row (schema: cxr/screening.py;
    a file rescored later gets a newer row, and readers keep the newest), error
    rows included: error_code is one of empty, not_image, corrupt, truncated,
    too_large, unsupported, dicom_invalid, read_failed, out_of_memory. Results
    land in OUTPUT/results/part-*.parquet as they finish; a rerun (or a run
    after the job was killed) scores only files this model has not scored yet,
    and retries read_failed and out_of_memory (trouble of the run, not the file).
    A file with the path, size and mtime of its current row is not even read.
    Rows of files since deleted from the archive stay (the results are a record).

    \b
    Examples:
      cxr screen /data/archive --model runs/r1/model --output screens/nightly
      cxr screen s3://bucket/xrays --model runs/r1/model -o s3://bucket/screens --glob '*.dcm'
      cxr screen ../shared/data/chest_xray/train -m runs/r1/model -o screens/train --metrics-file screen.prom
      cxr screen /data/archive -m runs/r1/model -o screens/try --limit 100 --no-report   # the first 100 files by path

    Runs on the cluster in RAY_ADDRESS, else on a local Ray it starts.
    Exit status: 0 done (error rows allowed), 1 --fail-on-error and errors, 2 unusable input,
    75 another run is writing to --output (try later), 130 Ctrl-C, 143 SIGTERM (what was scored is kept).
    """
    from cxr import screening as S
    from cxr.storage import join, open_fs
    from jobs.screen import run_screen

    cfg = ScreenConfig(archive=archive, progress=not quiet, **kw)
    progress = _ProgressLine() if cfg.progress else None
    summary: dict | None = None
    try:
        summary = run_screen(cfg, on_progress=progress)
    except BaseException as exc:  # a CxrError, a bug, Ctrl-C: either way Prometheus must see the nightly run fail
        if (cfg.metrics_file or cfg.pushgateway) and not isinstance(exc, Busy):  # Busy: the holder is healthy
            _emit_failure_metrics(cfg)
        raise
    finally:
        if progress:
            progress.close()
    unscreened = len(summary.get("unlisted_folders", ()))
    failed = cfg.fail_on_error and (summary["errors"] > 0 or unscreened > 0)
    _save_config(cfg)
    click.echo(S.format_summary(summary))
    click.echo(f"results: {join(cfg.output, S.RESULTS_DIR)}" + (f"  report: {summary['report']}" if summary.get("report") else ""))
    if summary.get("report"):  # a local folder or a URI (the report was uploaded there)
        fs, report_dir = open_fs(summary["report"])
        with fs.open_input_stream(f"{report_dir}/metrics.json") as f:
            click.echo(_brief(json.load(f)))
    if cfg.metrics_file or cfg.pushgateway:  # after the summary: a metrics target that fails (exit 2) hides no result
        reg = S.metrics_registry(summary, success=not failed)
        # a --fail-on-error failure keeps the last success's time (merge / POST), which staleness alerts watch
        if cfg.metrics_file:
            S.write_metrics_file(reg, cfg.metrics_file, merge=failed)
        if cfg.pushgateway:
            S.push_metrics(reg, cfg.pushgateway, replace=not failed)
    if failed:
        not_listed = f", {unscreened} folder(s) could not be listed" if unscreened else ""
        click.secho(f"error: {summary['errors']} file(s) could not be scored{not_listed} (--fail-on-error)", fg="red",
                    err=True)
        sys.exit(1)


def _save_config(cfg: ScreenConfig) -> None:
    """The run's resolved flags beside its results, where the output is a local folder (file:// too)."""
    from cxr.storage import is_local, open_fs

    if is_local(cfg.output):
        save_json(cfg, Path(open_fs(cfg.output)[1]) / "screen_config.json")


def _emit_failure_metrics(cfg: ScreenConfig) -> None:
    """A failed run still tells Prometheus it failed (cxr_screen_success 0)."""
    from cxr import screening as S

    reg = S.failure_metrics_registry()
    with contextlib.suppress(Exception):  # the original error is the one to show
        if cfg.metrics_file:
            S.write_metrics_file(reg, cfg.metrics_file, merge=True)
    with contextlib.suppress(Exception):  # a file that cannot be written must not keep the push from happening
        if cfg.pushgateway:
            S.push_metrics(reg, cfg.pushgateway, replace=False, retry_delays=())  # a pod being stopped has seconds


@click.command("report")
@click.argument("screen_dir")
@click.option("--output", "-o", required=True, help="Folder for metrics.json, the PNG plots and report.html.")
@click.option("--labels", default=None, metavar="MANIFEST",
              help="CSV/Parquet with path,label[,subtype,sha256]: overrides/fills true_label (by path, then sha256).")
def report_cmd(screen_dir: str, output: str, labels: str | None) -> None:
    """Evaluation report from the results of `cxr screen` (no Ray needed).

    Reads SCREEN_DIR/results/part-*.parquet, keeps the newest row per path,
    joins --labels if given, and writes per-class precision/recall/F1, ROC AUC
    with a bootstrap CI, operating points, calibration, curves and the error
    rows by code into OUTPUT.

    \b
    Examples:
      cxr report screens/nightly --output reports/nightly
      cxr report screens/test --output reports/test --labels test_labels.csv   # labels the rows lack
    """
    from cxr import screening as S

    try:
        from cxr.report import write_report
    except ImportError as exc:
        raise CxrError(f"the report module is not available: {exc}") from None
    table = S.read_results(screen_dir)
    if table.num_rows == 0:
        raise CxrError(f"{screen_dir} has no results yet")
    classes = S.classes_of(table.schema) or None
    if labels:
        index = S.load_labels(labels, classes or ("normal", "pneumonia"))
        table = index.apply(table)
        if not index.manifest_rows(table):
            click.secho(f"warning: no result row's path or sha256 is in {labels} (its paths are relative to its own "
                        "folder); true labels are the ones the rows already had", fg="yellow", err=True)
    from cxr.storage import writable_folder

    with writable_folder(output) as folder:  # a URI: written here, then uploaded
        metrics = write_report(table, folder, classes)
    counts = metrics.get("counts") or {}
    click.echo(f"report: {output}  ({table.num_rows} rows, {counts.get('labelled', 0)} scored with a true label)")
    click.echo(_brief(metrics))


def _brief(metrics: dict) -> str:
    """One line of headline numbers from write_report's metrics (tolerant of missing sections)."""
    if not metrics.get("metrics_available"):
        return f"metrics unavailable: {metrics.get('reason', 'no labelled rows')}"
    auc = (metrics.get("auc") or {})
    op = metrics.get("at_model_threshold") or {}
    value, ci = auc.get("value"), auc.get("ci95")
    if value is None or value != value:  # None or NaN: one class only among the labelled rows
        parts = ["AUC undefined (one class only)"]
    else:
        parts = [f"AUC {value:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci and None not in ci[:2] else "")]
    for key in ("sensitivity", "specificity", "accuracy"):
        if op.get(key) is not None:
            parts.append(f"{key} {op[key]:.3f}")
    errors = (metrics.get("errors") or {}).get("total")
    if errors:
        parts.append(f"error rows {errors}")
    return "  ".join(parts)


COMMANDS: list[click.Command] = [screen_cmd, report_cmd]

"""`cxr train` end to end on a real local Ray instance: 2 DDP workers, SIGKILL, --resume, export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from cxr.engine import load_engine
from cxr.export import load_export, read_metadata
from cxr.preprocess import preprocess

CLI = [sys.executable, "-c", "from cxr.cli import main; main()"]


def test_checkpoint_rank_orders_by_auc_then_epoch_and_ranks_nan_last() -> None:
    """A one-class validation split gives NaN AUCs; the export must still pick a checkpoint (the newest)."""
    from cxr.training import checkpoint_rank

    def state(epoch: int, auc: float) -> dict:
        return {"epoch": epoch, "history": [{"epoch": e, "val_auc": auc} for e in range(1, epoch + 1)]}

    assert max([state(1, 0.9), state(2, 0.8)], key=checkpoint_rank)["epoch"] == 1
    assert max([state(1, 0.9), state(2, 0.9)], key=checkpoint_rank)["epoch"] == 2
    assert max([state(3, float("nan")), state(2, 0.5)], key=checkpoint_rank)["epoch"] == 2
    assert checkpoint_rank(state(3, float("nan"))) == (-1.0, 3) > (-1.0, 2)
    assert checkpoint_rank({"epoch": 4, "history": []}) == (-1.0, 4)
TINY = ["--preset", "tiny", "--limit", "96", "--image-size", "32", "--batch-size", "8", "--workers", "2"]


class TrainProcess:
    """`cxr train` in its own session, with its Ray session files under a private temp dir."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.ray_dir = tempfile.mkdtemp(prefix="cxr-ray-", dir="/tmp")
        env = {**os.environ, "CXR_RAY_TEMP_DIR": self.ray_dir}
        env.pop("RAY_ADDRESS", None)
        self.log = log
        with open(log, "w") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(CLI + ["train", *args], stdout=out, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the driver's process group, then anything left in its Ray session."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        subprocess.run(["pkill", "-9", "-f", self.ray_dir], check=False)
        shutil.rmtree(self.ray_dir, ignore_errors=True)  # Ray's session files of this run

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def run_dir(tmp_path: Path):
    procs: list[TrainProcess] = []
    yield tmp_path, procs
    for p in procs:
        p.kill()


def _wait_for(predicate, timeout: float, proc: TrainProcess) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.proc.poll() is not None:
            pytest.fail(f"train exited early ({proc.proc.returncode}):\n{proc.output()[-3000:]}")
        time.sleep(1)
    pytest.fail(f"timed out:\n{proc.output()[-3000:]}")


def test_killed_run_resumes_and_exports_a_loadable_model(run_dir, data_dir: Path, sample_images: list[Path]) -> None:
    tmp, procs = run_dir
    out = tmp / "run"
    args = ["--data", str(data_dir), "--output", str(out), "--epochs", "3", *TINY]

    first = TrainProcess(args, tmp / "first.log")
    procs.append(first)
    ckpts = out / "checkpoints" / "train"
    _wait_for(lambda: any(ckpts.glob("checkpoint_*/state.pt")), 600, first)
    first.kill()  # kill -9 mid-run: after epoch 1's checkpoint, before the end
    assert not (out / "model").exists()
    config, split = (out / "config.json").read_text(), (out / "split.json").read_text()

    # a resume that would change the run (here its steps per epoch, so its LR schedule) is one clear line
    refused = TrainProcess(["--resume", *args, "--workers", "1", "--batch-size", "4"], tmp / "refused.log")
    procs.append(refused)
    assert refused.wait(timeout=300) == 2, refused.output()[-2000:]
    errors = [ln for ln in refused.output().splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in refused.output(), refused.output()[-2000:]
    assert "--workers 1 (the run has 2)" in errors[0] and "--batch-size 4 (the run has 8)" in errors[0]

    again = TrainProcess(["--resume", *args], tmp / "again.log")
    procs.append(again)
    assert again.wait(timeout=600) == 0, again.output()[-3000:]
    # bit for bit the run an uninterrupted process trains: each epoch's random stream is seeded by the epoch
    # (a resume used to replay epoch 1's augmentation in the epochs it redid, and export other weights)
    whole = TrainProcess(["--data", str(data_dir), "--output", str(tmp / "whole"), "--epochs", "3", *TINY],
                         tmp / "whole.log")
    procs.append(whole)
    assert whole.wait(timeout=600) == 0, whole.output()[-3000:]
    assert read_metadata(tmp / "whole" / "model").model_id == read_metadata(out / "model").model_id
    log = again.output()
    assert "resumed from checkpoint after epoch" in log
    resumed_after = int(log.split("resumed from checkpoint after epoch ")[1].split("/")[0])
    assert 1 <= resumed_after < 3
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # no epoch repeated or lost
    # the LR schedule went on where it stopped: its last step is the cosine's end (lr x 1e-3); a schedule
    # restarted at the resume would still be above it (optimizer/scheduler state restored, not rebuilt)
    assert history[-1]["lr"] == pytest.approx(json.loads(config)["lr"] * 1e-3, rel=1e-6), history
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "config.json").read_text() == config and (out / "split.json").read_text() == split

    # the export loads through the one loader and scores through the engines
    model, meta = load_export(out / "model")
    assert meta.classes == ["normal", "pneumonia"] and meta.preprocess.image_size == 32
    assert 0.0 <= meta.threshold <= 1.0 and meta.target_sensitivity == 0.98
    assert meta.val_metrics["sensitivity"] >= 0.98 and meta.val_metrics["threshold"] == meta.threshold
    assert meta.val_metrics["n_val"] > 0 and meta.data_fingerprint
    x = np.stack([preprocess(p.read_bytes(), meta.preprocess) for p in sample_images])
    torch_p = load_engine(out / "model", "torch").predict_proba(x)
    onnx_p = load_engine(out / "model", "onnx").predict_proba(x)
    np.testing.assert_allclose(torch_p.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(torch_p, onnx_p, atol=1e-4)

    # --resume of a finished run trains nothing and exports the same best checkpoint again; the short
    # form takes the run's saved config (preset tiny, 3 epochs, 32 px), not the cpu preset's defaults
    finished = TrainProcess(["--resume", "--data", str(data_dir), "--output", str(out)], tmp / "finished.log")
    procs.append(finished)
    assert finished.wait(timeout=600) == 0, finished.output()[-3000:]
    assert "--resume with the run's config: preset tiny, 2 worker(s), 3 epochs at 32px" in finished.output()
    assert "the run had finished" in finished.output()  # exported again without starting Ray and its workers
    assert (out / "config.json").read_text() == config and (out / "split.json").read_text() == split
    assert read_metadata(out / "model").model_id == meta.model_id
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    # without --resume, an existing run is not silently overwritten
    third = TrainProcess(args, tmp / "third.log")
    procs.append(third)
    assert third.wait(timeout=120) == 2
    assert "already holds a run" in third.output() and "Traceback" not in third.output()


def test_more_workers_than_the_machine_has_is_one_clear_line(run_dir, data_dir: Path) -> None:
    tmp, procs = run_dir
    proc = TrainProcess(["--data", str(data_dir), "--output", str(tmp / "r"), *TINY, "--workers", "64"], tmp / "w.log")
    procs.append(proc)
    assert proc.wait(timeout=300) == 2
    errors = [ln for ln in proc.output().splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "64 workers" in errors[0], proc.output()[-2000:]
    assert "Traceback" not in proc.output()


def _train_error(tmp_path: Path, *args: str) -> str:
    """Run `cxr train` that must fail before Ray starts: its one error line."""
    proc = subprocess.run(CLI + ["train", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": "local", "CXR_RAY_TEMP_DIR": str(tmp_path / "ray")})
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "ray").exists()  # refused before Ray started
    return errors[0]


def test_sigterm_stops_training_like_ctrl_c_and_exits_143(run_dir, data_dir: Path) -> None:
    """`cxr jobs stop`, Kubernetes and preemption send SIGTERM: it exited 134 ("Aborted") after three stack
    dumps of Ray's core worker, which an orchestrator reads as a crash."""
    tmp, procs = run_dir
    out = tmp / "run"
    args = ["--data", str(data_dir), "--output", str(out), "--epochs", "3", *TINY]
    run = TrainProcess(args, tmp / "term.log")
    procs.append(run)
    snapshot = out / "checkpoints" / "train" / "checkpoint_manager_snapshot.json"

    def checkpoints_in_snapshot() -> list[str]:
        try:
            return [r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
        except (OSError, ValueError, KeyError):
            return []

    _wait_for(lambda: bool(checkpoints_in_snapshot()), 600, run)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 128 + signal.SIGTERM, run.output()[-3000:]
    log = run.output()
    assert log.rstrip().endswith("terminated (SIGTERM)"), log[-2000:]
    assert "the checkpoints are kept" in log and "SIGTERM received" not in log, log[-3000:]

    # a checkpoint deleted by hand (to save disk) that Ray's snapshot still names: one line saying what to do
    # (it was a TrainController traceback and exit 1), and doing it resumes
    shutil.rmtree(snapshot.parent / checkpoints_in_snapshot()[-1])
    refused = TrainProcess(["--resume", *args], tmp / "refused.log")
    procs.append(refused)
    assert refused.wait(timeout=300) == 2, refused.output()[-3000:]
    assert "delete that file" in refused.output() and "Traceback" not in refused.output(), refused.output()[-3000:]
    snapshot.unlink()
    again = TrainProcess(["--resume", *args], tmp / "again.log")
    procs.append(again)
    assert again.wait(timeout=600) == 0, again.output()[-3000:]
    assert (out / "model" / "metadata.json").is_file()


def test_runs_that_cannot_work_or_would_overwrite_fail_before_ray(tmp_path: Path, data_dir: Path) -> None:
    """A batch bigger than a worker's shard trained nothing and exported an untrained model with exit 0; a
    finished run whose checkpoints live elsewhere was overwritten; a manifest of missing files failed in four
    worker tracebacks after Ray's retry."""
    tiny = ["--preset", "tiny", "--limit", "32", "--image-size", "32", "--workers", "2"]
    err = _train_error(tmp_path, "--data", str(data_dir), "--output", str(tmp_path / "a"), *tiny, "--batch-size", "64")
    assert "--batch-size 64 is more than the 13 training images each of the 2 workers gets" in err, err
    (tmp_path / "done" / "model").mkdir(parents=True)
    (tmp_path / "done" / "model" / "metadata.json").write_text("{}")
    err = _train_error(tmp_path, "--data", str(data_dir), "--output", str(tmp_path / "done"), *tiny,
                       "--storage", str(tmp_path / "elsewhere"))
    assert "already holds a run" in err and "--resume" in err, err
    dataset = tmp_path / "dataset"  # --storage naming the data by mistake: its train/ split is not a run's folder
    (dataset / "train" / "NORMAL").mkdir(parents=True)
    (dataset / "train" / "NORMAL" / "a.jpeg").write_bytes(b"x")
    err = _train_error(tmp_path, "--data", str(data_dir), "--output", str(tmp_path / "c"), *tiny, "--storage", str(dataset))
    assert "which is not a cxr training run's" in err and (dataset / "train" / "NORMAL" / "a.jpeg").is_file(), err
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.csv").write_text("path,label\n" + "".join(f"gone{i}.jpeg,NORMAL\ngone_p{i}.jpeg,PNEUMONIA\n"
                                                                    for i in range(8)))
    err = _train_error(tmp_path, "--data", str(tmp_path / "m" / "manifest.csv"), "--output", str(tmp_path / "b"), *tiny)
    assert "none of the 16 training images checked exists, e.g. " + str(tmp_path / "m" / "gone") in err, err
    # one class only (a NORMAL folder missing, a wrong label column) trained and exported a model with AUC NaN
    pneumonia = sorted((data_dir / "train" / "PNEUMONIA").glob("person*_bacteria_*.jpeg"))[:40]
    (tmp_path / "m" / "one.csv").write_text("path,label\n" + "".join(f"{p},PNEUMONIA\n" for p in pneumonia))
    err = _train_error(tmp_path, "--data", str(tmp_path / "m" / "one.csv"), "--output", str(tmp_path / "one"),
                       "--preset", "tiny", "--image-size", "32", "--batch-size", "2")
    assert "the training images hold no normal (" in err and "pneumonia)" in err, err
    # --resume of a finished run whose checkpoints were deleted retrained and replaced its export
    err = _train_error(tmp_path, "--data", str(data_dir), "--output", str(tmp_path / "done"), *tiny, "--resume")
    assert "the run has finished (model/ is exported) and its checkpoints are gone" in err, err
    # checkpoints that cannot be written failed after epoch 1, in a traceback of Ray's TrainController
    (tmp_path / "a-file").write_text("")
    err = _train_error(tmp_path, "--data", str(data_dir), "--output", str(tmp_path / "s"), *tiny,
                       "--storage", str(tmp_path / "a-file" / "checkpoints"))
    assert "cannot write checkpoints to --storage " + str(tmp_path / "a-file" / "checkpoints") in err, err
    # a second driver on one run folder (a RayJob retried while the first still runs) is refused, exit 75
    import fcntl

    (tmp_path / "busy").mkdir()
    with open(tmp_path / "busy" / ".train.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = subprocess.run(CLI + ["train", "--data", str(data_dir), "--output", str(tmp_path / "busy"), *tiny],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": "local"})
    assert busy.returncode == 75 and "another `cxr train` is running in" in busy.stderr, busy.stderr[-2000:]
    (tmp_path / "dmg").mkdir()
    (tmp_path / "dmg" / "config.json").write_text('{"data": "x", "outp')  # a write cut short
    err = _train_error(tmp_path, "--data", str(data_dir), "--output", str(tmp_path / "dmg"), *tiny, "--resume")
    assert "config.json is damaged" in err, err


def test_resume_of_a_run_without_a_checkpoint_starts_over_with_the_new_flags(tmp_path: Path) -> None:
    """A first attempt that failed on its flags (e.g. --workers 3 on 2 CPUs) left config.json: --resume (the
    RayJob's entrypoint always says it) refused the fixed flags as a change to the run."""
    import dataclasses

    from cxr.config import TrainConfig, save_json
    from jobs.train import _resumed_config

    out = tmp_path / "run"
    (out / "checkpoints" / "train").mkdir(parents=True)  # Ray's storage marker folder, no checkpoint
    save_json(TrainConfig(data="d", output=str(out), workers=3, epochs=7), out / "config.json")
    fixed = dataclasses.replace(TrainConfig(data="d", output=str(out), workers=2), resume=True)
    resumed, checkpoint = _resumed_config(fixed, out, explicit={"workers"})
    assert checkpoint is None
    assert resumed.workers == 2 and resumed.epochs == 7  # the fixed flag over the run's own config, not defaults


def test_missing_data_dir_fails_before_ray(tmp_path: Path) -> None:
    proc = subprocess.run(CLI + ["train", "--data", str(tmp_path / "none"), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error: data not found" in proc.stderr and "Traceback" not in proc.stderr
    image = tmp_path / "one.jpeg"  # an image where the data folder or manifest goes: was "'utf-8' codec can't decode"
    image.write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    err = _train_error(tmp_path, "--data", str(image), "--output", str(tmp_path / "o"))
    assert "is an image, not a manifest" in err, err


@pytest.mark.parametrize("flag,value", [("--target-sensitivity", "98"), ("--val-fraction", "1.5"), ("--lr", "0"),
                                        ("--epochs", "0")])
def test_out_of_range_training_flags_are_refused_before_ray(tmp_path: Path, flag: str, value: str) -> None:
    """--target-sensitivity 98 (a percentage) used to fail in every worker after an epoch, with an IndexError."""
    from click.testing import CliRunner

    from cxr.cli import main

    res = CliRunner().invoke(main, ["train", "--data", str(tmp_path), flag, value])
    assert res.exit_code == 2 and f"Invalid value for '{flag}'" in res.output, res.output


def _manifest_data(root: Path, data_dir: Path, per_class: int = 10) -> Path:
    """A CSV manifest as Excel writes it (UTF-8 with a byte-order mark) over copies of real X-rays."""
    root.mkdir()
    rows = ["path,label,patient_id"]
    for label in ("NORMAL", "PNEUMONIA"):
        for i, p in enumerate(sorted((data_dir / "train" / label).glob("*.jpeg"))[:per_class]):
            (root / p.name).write_bytes(p.read_bytes())
            rows.append(f"{p.name},{label},{label[0]}{i}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8-sig")
    return root / "manifest.csv"


def test_unreadable_images_count_once_and_an_empty_validation_shard_is_fine(run_dir, data_dir: Path) -> None:
    """One unreadable training image is one skip (not one per rank); rank 1's only validation image is
    unreadable, so its shard is empty and the gathered targets must stay integers. Also: a BOM'd CSV
    manifest and --pretrained PATH."""
    from cxr.data import discover, split_by_patient

    tmp, procs = run_dir
    manifest = _manifest_data(tmp / "data", data_dir)
    train, val = split_by_patient(discover(manifest), 0.1, seed=42)  # what the run will split (tiny: seed 42)
    assert len(val) == 2  # one per rank
    for s in (train[0], val[1]):
        Path(s.path).write_bytes(b"not an image")
    # --pretrained PATH: read by the driver once, shipped to the workers (RGB conv1 folded to gray)
    import torch
    from torchvision.models import resnet50

    torch.save(resnet50(weights=None).state_dict(), tmp / "weights.pth")
    out = tmp / "run"
    proc = TrainProcess(["--data", str(manifest), "--output", str(out), *TINY, "--batch-size", "4",
                         "--val-fraction", "0.1", "--pretrained", str(tmp / "weights.pth")], tmp / "run.log")
    procs.append(proc)
    assert proc.wait(timeout=600) == 0, proc.output()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_images"] == 2 and summary["val_images"] == 2
    assert read_metadata(out / "model").val_metrics["n_val"] == 1
    assert json.loads((out / "split.json").read_text())["val"]["paths"] == [s.path for s in val]


def test_no_readable_training_image_is_one_clear_line(run_dir, data_dir: Path) -> None:
    tmp, procs = run_dir
    manifest = _manifest_data(tmp / "data", data_dir, per_class=5)
    for p in manifest.parent.glob("*.jpeg"):
        p.write_bytes(b"")
    proc = TrainProcess(["--data", str(manifest), "--output", str(tmp / "run"), *TINY, "--val-fraction", "0.2",
                         "--batch-size", "4"], tmp / "run.log")
    procs.append(proc)
    assert proc.wait(timeout=600) == 2
    errors = [ln for ln in proc.output().splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "no readable training images (10 unreadable)" in errors[0], proc.output()[-3000:]


def test_resume_reuses_the_saved_split_and_refuses_changed_data(tmp_path: Path, sample_images: list[Path]) -> None:
    from cxr.data import Sample, discover, saved_split, split_by_patient, write_split
    from cxr.errors import CxrError

    for p in sample_images:
        (tmp_path / "train" / p.parent.name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / p.parent.name / p.name).write_bytes(p.read_bytes())
    samples = discover(tmp_path)
    train, val = split_by_patient(samples, 0.25, seed=3)
    write_split(tmp_path / "split.json", 3, 0.25, train, val)
    assert saved_split(tmp_path / "split.json", samples) == (train, val)

    extra = Sample(str(tmp_path / "train" / "NORMAL" / "IM-9999-0001.jpeg"), "normal", "normal", "IM-9999")
    with pytest.raises(CxrError, match="not the ones of the run's split"):
        saved_split(tmp_path / "split.json", sorted(samples + [extra], key=lambda s: s.path))
    gone = Path(val[0].path)
    content = gone.read_bytes()
    gone.unlink()
    with pytest.raises(CxrError, match="1 of the run's .* validation images are not in --data any more"):
        saved_split(tmp_path / "split.json", samples)
    # a file the data named but that was missing when the run started (the workers skipped it) does not
    # make the run impossible to resume
    write_split(tmp_path / "split.json", 3, 0.25, train, val)
    assert json.loads((tmp_path / "split.json").read_text())["val"]["missing"] == [str(gone)]
    assert saved_split(tmp_path / "split.json", samples) == (train, val)
    gone.write_bytes(content)
    assert saved_split(tmp_path / "split.json", samples) == (train, val)

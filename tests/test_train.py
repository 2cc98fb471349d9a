"""`cxr train` end to end on a real local Ray instance: 2 DDP workers, SIGKILL, --resume, export."""

from __future__ import annotations

import json
import os
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
    from jobs.train import checkpoint_rank

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
        self.proc = subprocess.Popen(CLI + ["train", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
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

    again = TrainProcess(["--resume", *args], tmp / "again.log")
    procs.append(again)
    assert again.wait(timeout=600) == 0, again.output()[-3000:]
    log = again.output()
    assert "resumed from checkpoint after epoch" in log
    resumed_after = int(log.split("resumed from checkpoint after epoch ")[1].split("/")[0])
    assert 1 <= resumed_after < 3
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # no epoch repeated or lost
    assert (out / "curves.png").stat().st_size > 0 and (out / "split.json").is_file()

    # the export loads through the one loader and scores through the engines
    model, meta = load_export(out / "model")
    assert meta.classes == ["normal", "pneumonia"] and meta.preprocess.image_size == 32
    assert 0.0 <= meta.threshold <= 1.0 and meta.target_sensitivity == 0.98
    assert meta.val_metrics["n_val"] > 0 and meta.data_fingerprint
    x = np.stack([preprocess(p.read_bytes(), meta.preprocess) for p in sample_images])
    torch_p = load_engine(out / "model", "torch").predict_proba(x)
    onnx_p = load_engine(out / "model", "onnx").predict_proba(x)
    np.testing.assert_allclose(torch_p.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(torch_p, onnx_p, atol=1e-4)

    # --resume of a finished run trains nothing and exports the same best checkpoint again
    finished = TrainProcess(["--resume", *args], tmp / "finished.log")
    procs.append(finished)
    assert finished.wait(timeout=600) == 0, finished.output()[-3000:]
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


def test_missing_data_dir_fails_before_ray(tmp_path: Path) -> None:
    proc = subprocess.run(CLI + ["train", "--data", str(tmp_path / "none"), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error: data not found" in proc.stderr and "Traceback" not in proc.stderr

"""`cxr train`: DDP training of ResNet-50 with Ray Train (gloo on CPU, NCCL on GPU).

The driver discovers the data, splits it by patient, runs a TorchTrainer and
exports the best checkpoint. The worker loop is thin: everything it calls
lives in ``cxr.training`` (plain PyTorch, testable without Ray).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
from torch.optim.swa_utils import AveragedModel

from cxr.config import (
    TrainConfig, check_train_config, describe_run, from_dict, resume_config, save_json, to_dict,
)
from cxr.data import (
    Sample, check_split_classes, discover, fingerprint, saved_split, split_by_patient, stratified_subset, val_folds,
    write_split,
)
from cxr.errors import (CxrError, Terminated, first_line, interrupt_on_termination, last_termination,
                        termination_as_interrupt)
from cxr.export import METADATA, ModelMetadata, save_export
from cxr.metrics import operating_point, validation_metrics
from cxr.hardware import cpu_has_fast_bf16
from cxr.model import build_model, load_backbone, pretrained_state_dict
from cxr.preprocess import make_train_augment
from cxr.storage import child_uri, exclusive, is_uri, join, open_fs
from cxr.training import (
    DistributedBalancedSampler, EpochSeeded, ProgressBar, XrayDataset, build_optimizer, build_scheduler, check_loaded,
    checkpoint_rank, class_weights, ema_avg_fn, load_images, merge_epoch_stats, predict, seed_everything, train_one_epoch,
)
from jobs.common import cluster_address, init_ray

RUN_NAME = "train"
STATE_FILE = "state.pt"


# --------------------------------------------------------------------------- worker side


def _gather(obj: Any) -> list[Any]:
    """all_gather_object across the DDP group (a list of one element without one)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP rank: load its data, train, evaluate, report and checkpoint every epoch."""
    cfg = from_dict(TrainConfig, config["train"])
    _quiet_report_log()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.seed + rank)
    torch.set_num_threads(cfg.num_threads or cfg.cpus_per_worker)
    device = ray.train.torch.get_device()
    amp = cfg.amp and (device.type == "cuda" or cpu_has_fast_bf16())
    classes = cfg.classes

    train_imgs = load_images(config["train_paths"], config["train_targets"], cfg.preprocess.max_pixels)
    # every rank scores a disjoint slice of the validation set; results are gathered
    val_imgs = load_images(config["val_paths"][rank::world], config["val_targets"][rank::world], cfg.preprocess.max_pixels)
    # every rank must train on the same set (else DDP hangs on unequal step counts); a train skip counts once
    counts = _gather(((len(train_imgs.data), train_imgs.n_skipped), (len(val_imgs.data), val_imgs.n_skipped)))
    skipped = check_loaded([t for t, _ in counts], [v for _, v in counts])
    if rank == 0 and skipped:
        _say(f"skipped {skipped} unreadable images")
    train_ds = XrayDataset(train_imgs, cfg.preprocess, make_train_augment(cfg.augment))
    val_ds = XrayDataset(val_imgs, cfg.preprocess)

    if cfg.imbalance == "sampler":
        shard: torch.utils.data.Sampler = DistributedBalancedSampler(train_imgs.targets, rank, world, cfg.seed)
    else:
        shard = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                                    seed=cfg.seed, drop_last=True)
    sampler = EpochSeeded(shard, cfg.seed, rank)  # each sample's augmentation seeded: resumes repeat it exactly
    loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=config.get("loader_workers", 0), pin_memory=device.type == "cuda",
                                         persistent_workers=config.get("loader_workers", 0) > 0)
    steps_per_epoch = max(1, len(loader))

    checkpoint = ray.train.get_checkpoint()  # Ray's own restore (worker retries within this run)
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(config["resume_from"])  # --resume of a killed run
    model = build_model(len(classes))
    if checkpoint is None and config.get("pretrained") is not None:
        load_backbone(model, ray.get(config["pretrained"]))  # read once by the driver, shipped through the object store
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    plain = getattr(model, "module", model)
    ema = AveragedModel(plain, multi_avg_fn=ema_avg_fn(cfg.ema_decay), use_buffers=True) if cfg.ema_decay else None
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    weights = class_weights(train_imgs.targets, len(classes)) if cfg.imbalance == "weights" else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None,
                                        label_smoothing=cfg.label_smoothing)

    start_epoch, history, best_auc, since_best = 0, [], -1.0, 0
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
        plain.load_state_dict(state["model"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], state["history"]
        if state.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:  # the LR schedule counts steps
            raise CxrError(f"cannot resume: the run took {state['steps_per_epoch']} steps per epoch, this one would "
                           f"take {steps_per_epoch} (a different number of readable training images)")
        best_auc, since_best = state.get("best_auc", -1.0), state.get("since_best", 0)
        if rank == 0:
            _say(f"resumed from checkpoint after epoch {start_epoch}/{cfg.epochs}")
        if cfg.early_stop_patience and since_best >= cfg.early_stop_patience:
            start_epoch = cfg.epochs  # the run had already stopped early: nothing left to train

    live_log = Path(config["output"]) / "metrics.jsonl" if rank == 0 else None
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        # the trainer's own random stream from (seed, epoch, rank) too (augmentation is seeded per sample,
        # EpochSeeded): a resumed run replays the epochs it lost as the uninterrupted run trained them
        seed_everything(cfg.seed + 1_000_003 * (epoch + 1) + rank)
        sampler.set_epoch(epoch)
        bar = ProgressBar(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", rank == 0,
                          every_s=10.0 if config.get("tty", False) else 60.0)
        stats = train_one_epoch(model, loader, optimizer, scheduler, loss_fn, device, amp, cfg.channels_last, ema,
                                bar, config.get("max_steps"))
        eval_model = ema.module if ema is not None else plain
        probs = predict(eval_model, val_ds, cfg.batch_size * 2, device, amp, cfg.channels_last)
        parts = _gather((probs, np.asarray(val_imgs.targets, dtype=np.int64), stats))
        all_probs = np.concatenate([p for p, _, _ in parts if len(p)])
        all_targets = np.concatenate([t for _, t, _ in parts])
        train_stats = merge_epoch_stats([st for _, _, st in parts])  # every rank's images, not rank 0's
        metrics = {"epoch": epoch + 1, **{k: train_stats[k] for k in ("loss", "train_accuracy")},
                   **validation_metrics(all_probs, all_targets, classes, cfg.target_sensitivity),
                   "images_per_s": train_stats["images_per_s"], "lr": scheduler.get_last_lr()[-1],
                   "epoch_seconds": time.time() - t0, "skipped_images": skipped}
        history.append(metrics)
        improved = metrics["val_auc"] > best_auc
        best_auc, since_best = (metrics["val_auc"], 0) if improved else (best_auc, since_best + 1)
        stop = bool(cfg.early_stop_patience and since_best >= cfg.early_stop_patience)

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save({
                    "model": plain.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1, "history": history, "best_auc": best_auc, "since_best": since_best,
                    "steps_per_epoch": steps_per_epoch,
                    "val_probs": all_probs, "val_targets": all_targets, "config": config["train"],
                }, Path(tmp) / STATE_FILE)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                _say(_epoch_line(metrics, cfg.epochs))
                _append_jsonl(live_log, metrics)
            ray.train.report(metrics, checkpoint=ckpt)
        if stop:
            if rank == 0:
                _say(f"early stop: val AUC has not improved for {since_best} epochs")
            break


def _quiet_report_log() -> None:
    """Drop Train V2's INFO line per ray.train.report (it dumps every metric of every rank each epoch).

    That logger is named by its file path, so LoggingConfig(log_level) does not reach it.
    """
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray version: the line may print, nothing else changes
        pass


def _say(line: str) -> None:
    """One console line from rank 0 (Train's patched print() would log it twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _epoch_line(m: dict[str, Any], epochs: int) -> str:
    return (f"epoch {m['epoch']:>2}/{epochs}  loss {m['loss']:.4f}  val_loss {m['val_loss']:.4f}  "
            f"val_auc {m['val_auc']:.4f}  val at 0.5: acc {m['val_accuracy']:.3f} sens {m['val_sensitivity']:.3f} "
            f"spec {m['val_specificity']:.3f}  {m['images_per_s']:.1f} img/s  {m['epoch_seconds']:.0f}s")


def _append_jsonl(path: Path | None, row: dict[str, Any]) -> None:
    if path is None:
        return
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError:  # a worker on another node cannot see the driver's output folder: the driver rewrites it
        pass


# --------------------------------------------------------------------------- driver side


def _finished(state: dict[str, Any], cfg: TrainConfig) -> bool:
    """A checkpoint after the last epoch, or after early stopping: a resume would train nothing."""
    patience = cfg.early_stop_patience
    return state["epoch"] >= cfg.epochs or bool(patience and state.get("since_best", 0) >= patience)


def _check_files_exist(samples: list[Sample], probe: int = 200) -> None:
    """Paths the manifest names but the driver cannot see: every one missing fails here in one line
    (not in four worker tracebacks after Ray's retry); some missing is a warning (workers skip them).
    Up to ``probe`` paths, spread over the list, so a network share is not walked twice."""
    step = max(1, len(samples) // probe)
    checked = samples[::step]
    missing = [s.path for s in checked if not os.path.isfile(s.path)]
    if missing and len(missing) == len(checked):
        raise CxrError(f"none of the {len(checked)} training images checked exists, e.g. {missing[0]} (manifest paths "
                       "are relative to the manifest's folder; on a cluster --data must be mounted on every node)")
    if missing:
        print(f"warning: {len(missing)} of {len(checked)} training images checked do not exist (e.g. {missing[0]}); "
              "the workers skip unreadable images", flush=True)


def _check_writable(storage: str) -> None:
    """A checkpoint location that cannot be written (read-only, not a folder, a bucket without write access)
    failed after epoch 1, in a 96-line traceback of Ray's TrainController: one line naming it, before Ray."""
    fs, root = open_fs(storage)
    probe = f"{root}/.cxr-write-probe-{os.getpid()}"
    try:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    except Exception as exc:  # noqa: BLE001 - OSError locally; ArrowException or botocore errors on object stores
        raise CxrError(f"cannot write checkpoints to --storage {storage}: {first_line(exc)}") from None


def _check_batch_fits(cfg: TrainConfig, n_train: int) -> None:
    """Each worker drops its last partial batch: a shard smaller than one batch trains nothing at all."""
    shard = n_train // cfg.workers
    if shard < cfg.batch_size:
        raise CxrError(f"--batch-size {cfg.batch_size} is more than the {shard} training images each of the "
                       f"{cfg.workers} workers gets ({n_train} in all): no step would run; lower --batch-size or "
                       "--workers, or train on more images (--limit)")


def _check_resources(cfg: TrainConfig) -> None:
    """More workers than the cluster has would hang waiting for resources: fail fast instead."""
    if cluster_address():
        return  # a remote cluster may autoscale up to the request
    res = ray.cluster_resources()
    need_cpu, need_gpu = cfg.workers * cfg.cpus_per_worker, cfg.workers * cfg.gpus
    if res.get("CPU", 0) < need_cpu or res.get("GPU", 0) < need_gpu:
        raise CxrError(f"{cfg.workers} workers need {need_cpu} CPUs and {need_gpu} GPUs, but this Ray instance has "
                       f"{res.get('CPU', 0):.0f} CPUs and {res.get('GPU', 0):.0f} GPUs; lower --workers/--gpus")


def _storage(cfg: TrainConfig, output: Path) -> str:
    if cfg.storage:
        return cfg.storage if is_uri(cfg.storage) else str(Path(cfg.storage).expanduser().resolve())
    return str((output / "checkpoints").resolve())


#: what Ray Train writes in a run folder besides checkpoint_* folders
_RAY_TRAIN_FILES = frozenset({".validate_storage_marker", "checkpoint_manager_snapshot.json"})


def _foreign_file(storage: str) -> str | None:
    """A file in the run folder under ``storage`` that Ray Train did not write, if any.

    A run that never checkpointed leaves Ray's marker there, which must not block the next start;
    anything else (a dataset's own ``train/`` split, when --storage names the data by mistake) is
    not ours: never written into, never deleted."""
    fs, root = open_fs(storage)
    for info in fs.get_file_info(pafs.FileSelector(f"{root}/{RUN_NAME}", allow_not_found=True)):
        if info.base_name not in _RAY_TRAIN_FILES and not (
                info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")):
            return info.path
    return None


def complete_checkpoints(storage: str) -> Iterator[str]:
    """The run's complete checkpoints in ``storage``, newest first (a killed run may leave a partial one).

    Checkpoint folder names are timestamps, so name order is time order; a
    checkpoint counts once its state file is a complete zip archive. A generator:
    ``--resume`` checks only as many (~400 MB each) as it needs.
    """
    fs, root = open_fs(storage)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{RUN_NAME}", allow_not_found=True))
    dirs = sorted((i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")),
                  reverse=True)
    for d in dirs:
        state = fs.get_file_info(f"{d}/{STATE_FILE}")
        if state.type != pafs.FileType.File or not state.size:
            continue
        if isinstance(fs, pafs.LocalFileSystem):
            try:
                with zipfile.ZipFile(f"{d}/{STATE_FILE}") as z:
                    if z.testzip() is not None:
                        continue
            except (zipfile.BadZipFile, OSError):
                continue
        yield child_uri(storage, d)  # keeps an s3://...?endpoint_override= query for Ray's Checkpoint


def latest_checkpoint(storage: str) -> str | None:
    """The newest complete checkpoint: where ``--resume`` continues from."""
    return next(complete_checkpoints(storage), None)


def run_training(cfg: TrainConfig, max_steps: int | None = None, explicit: Any = None) -> dict[str, Any]:
    """Train, pick the best checkpoint, choose the operating threshold, export. Returns the summary.

    With ``cfg.resume`` the run's saved config and split are authoritative: ``explicit`` names the
    flags the user passed (None: all of ``cfg``), and any of them that would change the run is an
    error (see :func:`cxr.config.resume_config`). SIGTERM (``cxr jobs stop``, Kubernetes, preemption)
    stops it as Ctrl-C does, keeping the checkpoints; the CLI then exits 143.
    """
    with termination_as_interrupt(), contextlib.ExitStack() as held:
        return _run_training(cfg, max_steps, explicit, held)


def _run_training(cfg: TrainConfig, max_steps: int | None, explicit: Any,
                  held: contextlib.ExitStack) -> dict[str, Any]:
    """``held`` keeps the run folder's lock (taken before the first write into it) until the run ends."""
    if is_uri(cfg.output):  # Path() would make s3://b/r a local folder "s3:/b/r" under the working directory
        raise CxrError(f"--output must be a folder path (the run's config, split, metrics and model export; on a "
                       f"cluster, a filesystem every node mounts), not a URI: {cfg.output}. Checkpoints go to "
                       "--storage, which takes s3:// and other pyarrow URIs")
    output = Path(cfg.output).expanduser().resolve()
    if output.exists() and not output.is_dir():
        raise CxrError(f"--output {cfg.output} is a file; give a folder for the run")
    cfg, resume_from = _resumed_config(cfg, output, explicit) if cfg.resume else (check_train_config(cfg), None)
    samples = stratified_subset(discover(cfg.data, "train"), cfg.limit, cfg.seed)
    for s in samples:
        s.target(cfg.task)  # unknown labels fail here, before any worker starts
    _check_files_exist(samples)
    storage = _storage(cfg, output)
    if cfg.resume and resume_from is None:  # a run started over may name another --storage
        resume_from = latest_checkpoint(storage)
    if not cfg.resume and (latest_checkpoint(storage) or (output / "model" / METADATA).is_file()):
        raise CxrError(f"{output} already holds a run (a checkpoint in {join(storage, RUN_NAME)} or an exported "
                       "model): pass --resume to continue it, or choose another --output (and --storage)")
    foreign = _foreign_file(storage) if resume_from is None else None
    if foreign:
        raise CxrError(f"--storage {storage}: {join(storage, RUN_NAME)} holds {foreign}, which is not a cxr training "
                       "run's; give each run its own --storage folder")
    split_file = output / "split.json"
    if resume_from and not split_file.is_file():
        raise CxrError(f"cannot --resume: {split_file} is missing, so the run's validation split is unknown")
    reuse_split = resume_from is not None and split_file.is_file()
    if reuse_split:
        train, val = saved_split(split_file, samples)
        print(f"validation: the run's split ({split_file}): {len(val)} of {len(samples)} images", flush=True)
    else:
        train, val = split_by_patient(samples, cfg.val_fraction, cfg.seed, cfg.task)
        check_split_classes(train, val, cfg.task)
        _check_batch_fits(cfg, len(train))
        print(f"validation: {len(val)} of {len(samples)} images ({len(val) / len(samples):.1%}), "
              f"{len({s.patient_id for s in val})} patients (--val-fraction {cfg.val_fraction}: one fold of "
              f"{val_folds(cfg.val_fraction)}, by patient)", flush=True)
    weights = None
    if cfg.pretrained != "none" and resume_from is None:
        weights = pretrained_state_dict(cfg.pretrained)  # read once here; the workers get it through Ray
        load_backbone(build_model(len(cfg.classes)), weights)  # bad weights fail here, in one line, before Ray starts
    if cfg.resume and resume_from is None:
        print(f"--resume: no checkpoint in {join(storage, RUN_NAME)} yet; starting from scratch", flush=True)
    # two drivers on one run folder (a RayJob retried while its first driver still runs, two people with one
    # --output) would write over each other's checkpoints, metrics and export: the second is refused, exit 75
    held.enter_context(exclusive(str(output), ".train.lock", f"another `cxr train` is running in {output}; wait "
                                 "for it to end (then --resume continues from its checkpoints) or give another --output"))
    output.mkdir(parents=True, exist_ok=True)
    save_json(dataclasses.replace(cfg, resume=False), output / "config.json")  # the run's config, not this call's
    if not reuse_split:
        write_split(split_file, cfg.seed, cfg.val_fraction, train, val)
    if resume_from is None:  # a new run, or a --resume with nothing to continue
        (output / "metrics.jsonl").unlink(missing_ok=True)
    elif _finished(_load_state(resume_from), cfg):  # nothing to train: export again without Ray and its workers
        print("cxr train: the run had finished; exporting its best checkpoint again", flush=True)
        return _finish(cfg, output, storage, train, val, 0.0)

    _check_writable(storage)
    if cfg.amp and not cfg.gpus and not cluster_address() and not cpu_has_fast_bf16():
        print("note: this CPU has no native bf16 (AVX512-BF16/AMX), so training runs in fp32, ~2.3x slower per "
              "image than the `cpu` preset's budget assumes (~90 min instead of ~40 on 2 cores); "
              "--image-size 96 or fewer --epochs bring it back (BENCHMARKS.md, Training)", flush=True)
    print(f"starting Ray and {cfg.workers} training worker(s); each reads its {len(train) // cfg.workers} images "
          "before epoch 1 ...", flush=True)
    started = init_ray()
    interrupt_on_termination()  # again: ray.init installed its own (the core worker's stack dump, exit 134)
    try:
        _check_resources(cfg)
        trainer = ray.train.torch.TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "train": to_dict(cfg), "output": str(output), "tty": sys.stdout.isatty(), "max_steps": max_steps,
                "resume_from": resume_from, "pretrained": ray.put(weights) if weights is not None else None,
                # GPU workers decode in DataLoader processes; a CPU worker's cores all go to the model
                "loader_workers": max(0, cfg.cpus_per_worker - 1) if cfg.gpus else 0,
                "train_paths": [s.path for s in train], "train_targets": [s.target(cfg.task) for s in train],
                "val_paths": [s.path for s in val], "val_targets": [s.target(cfg.task) for s in val],
            },
            torch_config=ray.train.torch.TorchConfig(backend="nccl" if cfg.gpus else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.workers, use_gpu=cfg.gpus > 0,
                resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus} if cfg.gpus else {})},
            ),
            run_config=ray.train.RunConfig(
                name=RUN_NAME, storage_path=storage,
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute="val_auc",
                    checkpoint_score_order="max"),
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            ),
        )
        t0 = time.time()
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise CxrError(f"training failed: {_root_cause(exc)}") from None
        except Exception as exc:
            # Ray's own index of the run's checkpoints names one deleted since (to save disk, by hand): its
            # TrainController dies creating itself (an ActorDiedError around Train v2's private
            # CheckpointManagerInitializationError, matched by name). cxr finds its checkpoint without it.
            text = f"{type(exc).__name__}: {exc}"
            if "CheckpointManagerInitializationError" not in text:
                raise
            reason = text.split("CheckpointManagerInitializationError: ")[-1].splitlines()[0].split(". ")[0][:300]
            snapshot = join(storage, RUN_NAME, "checkpoint_manager_snapshot.json")
            raise CxrError(f"Ray Train refuses its run snapshot {snapshot} ({reason}); delete that file (Ray's index "
                           "of the checkpoints; cxr finds them without it) and run again: with --resume, training "
                           "continues from the newest complete checkpoint left") from None
        except (KeyboardInterrupt, SystemExit) as exc:  # Ray Train's own Ctrl-C handler aborts the run, then sys.exit()s
            kept = "the checkpoints are kept" if latest_checkpoint(storage) else "no epoch had finished"
            print(f"cxr train: interrupted ({kept}): continue with cxr train --resume --data {cfg.data} "
                  f"--output {cfg.output}", file=sys.stderr, flush=True)
            signum = exc.signum if isinstance(exc, Terminated) else last_termination()
            raise (Terminated(signum) if signum else KeyboardInterrupt()) from None
        return _finish(cfg, output, storage, train, val, time.time() - t0)
    finally:
        if started:
            ray.shutdown()


def _resumed_config(cfg: TrainConfig, output: Path, explicit: Any) -> tuple[TrainConfig, str | None]:
    """The config a ``--resume`` continues with: the run's config.json (else its newest checkpoint's),
    and that newest complete checkpoint (found once: each costs a zip check of ~400 MB).

    A run without a complete checkpoint has nothing to continue (it failed before its first epoch
    ended, e.g. on its flags): these flags start it over, so a RayJob whose entrypoint always says
    --resume can be fixed by fixing its flags.
    """
    path = output / "config.json"
    try:
        saved = from_dict(TrainConfig, json.loads(path.read_text())) if path.is_file() else None
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # cut short, or not a config at all
        raise CxrError(f"cannot --resume: {path} is damaged ({first_line(exc)}); it is the run's config, so "
                       "restore it or start a new run with another --output") from None
    storage = _storage(saved or cfg, output)
    ckpt = latest_checkpoint(storage)
    if ckpt is None:
        if (output / "model" / METADATA).is_file():
            raise CxrError(f"cannot --resume {output}: the run has finished (model/ is exported) and its checkpoints "
                           f"are gone from {join(storage, RUN_NAME)}: there is nothing to continue, and starting "
                           "over would replace the export; start a new run with another --output")
        if saved is None:
            return check_train_config(cfg), None
        print("cxr train: --resume: the run has no checkpoint yet: starting it over with its config.json and the "
              "flags given", flush=True)
        return check_train_config(resume_config(saved, cfg, explicit, strict=False)), None
    if saved is None:
        saved = from_dict(TrainConfig, _load_state(ckpt)["config"])
    cfg = resume_config(saved, cfg, explicit)  # the run's own --storage: where ckpt was found
    print(f"cxr train: --resume with the run's config: {describe_run(cfg)}", flush=True)
    return cfg, ckpt


def _root_cause(exc: BaseException) -> str:
    failures = getattr(exc, "worker_failures", None)
    if failures:
        first = next(iter(failures.values()))
        return f"{type(first).__name__}: {str(first).strip().splitlines()[-1] if str(first).strip() else ''}"
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__


def _load_state(path: str) -> dict[str, Any]:
    with ray.train.Checkpoint(path).as_directory() as d:
        # mmap: only the tensors used are read (a state holds model, EMA and optimizer)
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False, mmap=True)


def _finish(cfg: TrainConfig, output: Path, storage: str, train: list[Sample], val: list[Sample],
            seconds: float) -> dict[str, Any]:
    """Export the best checkpoint in ``storage`` (by val AUC, then epoch).

    The choice is made over every checkpoint kept in storage, not over this
    fit's Result: after ``--resume`` the best epoch may predate the restart,
    and a resume of a finished run reports nothing new.
    """
    best: dict[str, Any] | None = None
    best_key: tuple[float, int] = (-math.inf, -1)
    history: list[dict[str, Any]] | None = None
    for path in complete_checkpoints(storage):  # newest first: its history covers every epoch
        state = _load_state(path)  # memory-mapped: only the tensors used below are read
        history = state["history"] if history is None else history
        key = checkpoint_rank(state)
        if key > best_key:
            best, best_key = state, key
    if best is None or history is None:
        raise CxrError(f"training produced no checkpoint in {join(storage, RUN_NAME)}")

    model = build_model(len(cfg.classes))
    model.load_state_dict(best["model"])
    if best.get("ema"):  # export the EMA weights: they were the ones validated
        ema = AveragedModel(model, use_buffers=True)
        ema.load_state_dict(best["ema"])
        model = ema.module
    classes = cfg.classes
    val_at_thr = operating_point(best["val_probs"], best["val_targets"], classes, cfg.target_sensitivity)
    threshold = val_at_thr["threshold"]
    n_val = int(len(best["val_targets"]))
    n_pos = val_at_thr["tp"] + val_at_thr["fn"]  # the positives operating_point counted
    rule = (f"the highest threshold on the pneumonia score (P(not normal)) that keeps sensitivity >= "
            f"{cfg.target_sensitivity} on the run's {n_val} validation images ({n_pos} positive) as scored at "
            f"epoch {best['epoch']}, the epoch chosen by validation AUC on the same images: in-sample figures")
    if n_pos < 50:
        print(f"note: only {n_pos} validation positives: the threshold for sensitivity {cfg.target_sensitivity} rests "
              f"on a few films (specificity there {val_at_thr['specificity']:.3f}); validate on more data before use",
              flush=True)
    epoch_metrics = next(h for h in history if h["epoch"] == best["epoch"]) if history else {}
    meta = save_export(output / "model", model.eval(), ModelMetadata(
        classes=list(classes), task=cfg.task, preprocess=cfg.preprocess, threshold=threshold,
        target_sensitivity=cfg.target_sensitivity, model_version=f"{output.name}-epoch{best['epoch']}",
        data_fingerprint=fingerprint(train + val),
        val_metrics={**val_at_thr, "auc_epoch": epoch_metrics.get("val_auc"), "epoch": best["epoch"],
                     "n_val": n_val, "n_val_positive": n_pos, "threshold_rule": rule},
        train_config=to_dict(cfg),
    ))
    with open(output / "metrics.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    from cxr.plots import plot_training_curves

    plot_training_curves(history, output / "curves.png")
    summary = {"model": str(output / "model"), "model_id": meta.model_id, "best_epoch": best["epoch"],
               "epochs_run": len(history), "train_images": len(train), "val_images": len(val),
               "train_seconds": round(seconds, 1), "threshold": threshold,
               "val": {k: val_at_thr[k] for k in ("auc", "accuracy", "sensitivity", "specificity")},
               "skipped_images": history[-1].get("skipped_images", 0) if history else 0}
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary

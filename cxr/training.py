"""Training building blocks in plain PyTorch (no Ray): data, loss, optimiser, schedule, loops.

``jobs/train.py`` wires these into a Ray Train worker loop; keeping them here
means they are testable without a cluster and read like torchvision's
``references/classification``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from cxr.config import PreprocessConfig, TrainConfig
from cxr.errors import CxrError, ImageError
from cxr.model import autocast
from cxr.preprocess import Augment, decode_image, to_model_input


@dataclass
class LoadedImages:
    """Raw bytes of the usable images plus what was skipped (corrupt files are counted, not fatal)."""

    data: list[bytes]
    targets: list[int]
    paths: list[str]
    skipped: dict[str, list[str]]  # error code -> paths

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())


def load_images(paths: Sequence[str], targets: Sequence[int], max_pixels: int) -> LoadedImages:
    """Read every file once into memory and drop the ones that do not decode.

    Chest X-ray JPEGs are ~10 kB, so even the full Kermany split is ~50 MB
    per worker; decoding happens again each epoch (it is ~1% of step time).
    """
    out = LoadedImages([], [], [], {})
    for path, target in zip(paths, targets):
        try:
            with open(path, "rb") as f:
                data = f.read()
            decode_image(data, max_pixels)
        except ImageError as exc:
            out.skipped.setdefault(exc.code, []).append(path)
            continue
        except OSError:
            out.skipped.setdefault("read_failed", []).append(path)
            continue
        out.data.append(data)
        out.targets.append(int(target))
        out.paths.append(path)
    return out


class XrayDataset(Dataset):
    """(tensor, target) pairs through THE preprocessing path (``augment`` only in training)."""

    def __init__(self, images: LoadedImages, cfg: PreprocessConfig, augment: Augment | None = None) -> None:
        self.images, self.cfg, self.augment = images, cfg, augment

    def __len__(self) -> int:
        return len(self.images.data)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        """``key``: an index, or (seed, index) from :class:`EpochSeeded`: the augmentation's random draws
        then come from that seed, whichever process (and after whichever restart) loads the sample."""
        if isinstance(key, tuple):
            seed, i = key
            torch.manual_seed(seed)
        else:
            i = key
        img = decode_image(self.images.data[i], self.cfg.max_pixels)
        return torch.from_numpy(to_model_input(img, self.cfg, self.augment)), self.images.targets[i]


class EpochSeeded(Sampler[tuple[int, int]]):
    """A training sampler's indices, each paired with a seed from (seed, epoch, rank, position).

    DataLoader processes are seeded once when they start and (persistent) live across epochs, so
    reseeding the trainer each epoch does not reach them: a resumed run would augment its redone
    epochs differently from the run it continues. Seeding each sample instead makes a resumed run
    train bit for bit what an uninterrupted one does, with any number of loader processes.
    """

    def __init__(self, sampler: Sampler[int], seed: int, rank: int) -> None:
        self.sampler, self.seed, self.rank, self.epoch = sampler, seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, i in enumerate(self.sampler):
            seed = np.random.SeedSequence([self.seed, self.epoch, self.rank, position]).generate_state(1)[0]
            yield int(seed), int(i)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


class DistributedBalancedSampler(Sampler[int]):
    """Class-balanced sampling with replacement, sharded across DDP ranks.

    Every rank draws the same seeded global sample per epoch and keeps its
    slice, so ranks never overlap and a resumed epoch repeats exactly.
    """

    def __init__(self, targets: Sequence[int], rank: int, world: int, seed: int) -> None:
        counts = np.bincount(np.asarray(targets))
        self.weights = torch.as_tensor(1.0 / counts[np.asarray(targets)], dtype=torch.double)
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, 0
        self.per_rank = math.ceil(len(targets) / world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        idx = torch.multinomial(self.weights, self.per_rank * self.world, replacement=True, generator=g)
        return iter(idx[self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return self.per_rank


def class_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1): 3x more pneumonia than normal in Kermany's train split."""
    counts = np.bincount(np.asarray(targets), minlength=num_classes).astype(np.float64)
    w = counts.sum() / (num_classes * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW in four groups: (backbone | head) x (decay | no decay on norms and biases).

    The backbone/head split lets the schedule freeze the backbone (LR 0) during
    the warm-up phase without changing ``requires_grad`` under DDP. On GPUs the
    update runs as fused kernels (``fused=True``) instead of torch's multi-tensor
    default: never slower on an H100 at batch 64, between level and +15 % across
    runs whose own noise is as large (BENCHMARKS.md, "GPU paths"). A checkpoint's
    ``fused`` flag resumes on a CPU too (torch has CPU fused AdamW).
    """
    fused = all(p.is_cuda for p in model.parameters())
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {(p, d): [] for p in ("backbone", "head") for d in (True, False)}
    for name, p in model.named_parameters():
        part = "head" if name.removeprefix("module.").startswith("fc.") else "backbone"
        groups[(part, not (p.ndim <= 1 or name.endswith(".bias")))].append(p)
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "part": part}
         for (part, decay), ps in groups.items()],
        lr=cfg.lr, fused=fused or None,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The two-phase schedule, stepped per batch.

    Phase 1 (``warmup_epochs``, frozen backbone): backbone LR 0, constant LR on the new head.
    Phase 2 (fine-tuning, all layers): ``onecycle`` = linear ramp over the first 25% then
    cosine to ~0; ``cosine`` = one-epoch linear warm-up then cosine.
    """
    frozen = cfg.warmup_epochs * steps_per_epoch
    total = max(1, (cfg.epochs - cfg.warmup_epochs) * steps_per_epoch)
    ramp = max(1, int(0.25 * total) if cfg.schedule == "onecycle" else steps_per_epoch)

    def finetune(step: int) -> float:
        t = step - frozen
        if t < ramp:
            return 0.04 + 0.96 * t / ramp
        progress = min(1.0, (t - ramp) / max(1, total - ramp))
        return 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * progress))

    def backbone(step: int) -> float:
        return 0.0 if step < frozen else finetune(step)

    def head(step: int) -> float:
        return 1.0 if step < frozen else finetune(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [head if g["part"] == "head" else backbone for g in optimizer.param_groups])


class ProgressBar:
    """Progress inside an epoch: one plain line every ``every_s`` seconds (10 on a terminal, 60 in logs).

    Whole lines, not a carriage-return bar: Ray forwards a worker's output line by line, each with its
    own prefix, so a redrawn bar becomes a new line per update. The epoch's own line ends it.
    """

    def __init__(self, total: int, desc: str, enabled: bool, every_s: float = 10.0) -> None:
        self.total, self.desc, self.enabled, self.every_s = total, desc, enabled, every_s
        self.start = self.last = time.time()

    def update(self, done: int, loss: float) -> None:
        now = time.time()
        if not self.enabled or now - self.last < self.every_s or done >= self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-6)
        left = (self.total - done) / rate if rate > 0 else float("nan")
        sys.stdout.write(f"{self.desc}: {done}/{self.total} steps, loss {loss:.3f}, {rate:.2f} steps/s, "
                         f"~{left:.0f} s left\n")
        sys.stdout.flush()


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    device: torch.device,
    amp: bool,
    channels_last: bool,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    progress: ProgressBar | None = None,
    max_steps: int | None = None,
) -> dict[str, float]:
    """One pass over this rank's shard; returns mean loss, accuracy and images/s."""
    model.train()
    total_loss, correct, seen, start = 0.0, 0, 0, time.time()
    for step, (x, y) in enumerate(loader, 1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total_loss += float(loss.detach()) * y.numel()
        correct += int((logits.argmax(1) == y).sum())
        seen += y.numel()
        if progress:
            progress.update(step, total_loss / seen)
        if max_steps and step >= max_steps:
            break
    elapsed = time.time() - start
    return {"loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "images_per_s": seen / max(elapsed, 1e-6), "train_images": seen, "train_seconds": elapsed,
            "loss_sum": total_loss, "correct": correct}


def merge_epoch_stats(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Every rank's :func:`train_one_epoch` result as one: loss and accuracy over all ranks' images,
    images/s summed (the ranks run in parallel)."""
    seen = sum(p["train_images"] for p in parts)
    return {"loss": sum(p["loss_sum"] for p in parts) / max(seen, 1),
            "train_accuracy": sum(p["correct"] for p in parts) / max(seen, 1),
            "images_per_s": float(sum(p["images_per_s"] for p in parts)), "train_images": seen}


def check_loaded(train: Sequence[tuple[int, int]], val: Sequence[tuple[int, int]]) -> int:
    """Every rank's (kept, skipped) image counts of its training set (all of it) and its validation
    shard; returns the number of unreadable images, each counted once.

    Raises when training cannot work: ranks that read different training sets would run different
    numbers of steps and hang DDP (a file readable on one node only), and an empty split has
    nothing to train or validate on.
    """
    if len(set(train)) > 1:
        seen = ", ".join(f"rank {r}: {k}" for r, (k, _) in enumerate(train))
        raise CxrError(f"the workers read different numbers of training images ({seen}): every node must see "
                       "the same files at the same paths")
    kept, skipped = train[0]
    skipped += sum(s for _, s in val)
    if kept == 0:
        raise CxrError(f"no readable training images ({skipped} unreadable)")
    if sum(k for k, _ in val) == 0:
        raise CxrError(f"no readable validation images ({sum(s for _, s in val)} unreadable)")
    return skipped


@torch.inference_mode()
def predict(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, amp: bool,
            channels_last: bool) -> np.ndarray:
    """Class probabilities for every item of ``dataset`` (in order)."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    out = []
    for x, _ in loader:
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def ema_avg_fn(decay: float):
    """EMA update for ``AveragedModel(multi_avg_fn=...)`` with timm's warm-up.

    The effective decay is ``min(decay, (1 + n) / (10 + n))`` after n updates, so
    a short from-scratch run is not dragged towards its random initialisation
    (plain 0.998 still weighs the init 25% after 700 steps). Integer buffers
    (BatchNorm's batch counter) take the current value.
    """

    @torch.no_grad()
    def update(ema: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        if torch.is_floating_point(ema[0]):
            torch._foreach_lerp_(ema, current, 1.0 - d)
        else:
            for e, c in zip(ema, current):
                e.copy_(c)

    return update


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))  # for processes started from here on (spawned loaders)


def checkpoint_rank(state: dict[str, Any]) -> tuple[float, int]:
    """(val AUC, epoch) of a checkpoint state; the export takes the highest.

    An AUC that is missing or NaN (a validation split holding one class) counts as -1, below every
    real AUC: NaN compares false both ways and would otherwise rank no checkpoint at all.
    """
    epoch = state["epoch"]
    auc = next((h["val_auc"] for h in state["history"] if h["epoch"] == epoch), math.nan)
    return (-1.0 if math.isnan(auc) else float(auc), epoch)

"""Training throughput: Ray Train DDP with 1 and 2 workers vs a plain single-process PyTorch loop.

Same data (real X-rays from ../shared), same model (ResNet-50), same
preprocessing and augmentation, same step function (``cxr.training.train_one_epoch``),
same precision. Prints images/s in total and per worker, and the ratio to the
plain loop, measured in the same run (this machine is noisy: compare ratios).

    .venv/bin/python bench/train_throughput.py [--image-size 128] [--steps 12] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cxr.config import PreprocessConfig, TrainConfig, from_dict, to_dict  # noqa: E402
from cxr.data import discover  # noqa: E402
from cxr.hardware import cpu_has_fast_bf16  # noqa: E402
from cxr.model import build_model  # noqa: E402
from cxr.preprocess import make_train_augment  # noqa: E402
from cxr.training import (  # noqa: E402
    XrayDataset, build_optimizer, build_scheduler, load_images, train_one_epoch,
)

DATA = Path(os.environ.get("CXR_SHARED", ROOT.parent / "shared")) / "data" / "chest_xray"


def measure(cfg: TrainConfig, paths: list[str], targets: list[int], steps: int, rank: int = 0, world: int = 1,
            prepare=None) -> float:
    """Images/s of ``steps`` training steps after 2 warm-up steps (this rank)."""
    torch.manual_seed(rank)
    images = load_images(paths[rank::world], targets[rank::world], cfg.preprocess.max_pixels)
    ds = XrayDataset(images, cfg.preprocess, make_train_augment(cfg.augment))
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    model = build_model(2).to(memory_format=torch.channels_last)
    if prepare:
        model = prepare(model)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps + 2)
    loss = torch.nn.CrossEntropyLoss()
    amp = cfg.amp and cpu_has_fast_bf16()
    dev = torch.device("cpu")
    train_one_epoch(model, loader, opt, sched, loss, dev, amp, True, max_steps=2)  # warm-up
    stats = train_one_epoch(model, loader, opt, sched, loss, dev, amp, True, max_steps=steps)
    return stats["images_per_s"]


def ray_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainConfig, config["cfg"])
    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rate = measure(cfg, config["paths"], config["targets"], config["steps"], ctx.get_world_rank(),
                   ctx.get_world_size(), ray.train.torch.prepare_model)
    if ctx.get_world_rank() == 0:  # Result.metrics is empty without a checkpoint in Train V2
        Path(config["out"]).write_text(str(rate))


def run_ray(cfg: TrainConfig, paths: list[str], targets: list[int], steps: int, workers: int) -> float:
    import ray.train
    import ray.train.torch

    out = Path(tempfile.mkdtemp(prefix="cxr-bench-")) / "rate"
    trainer = ray.train.torch.TorchTrainer(
        ray_worker,
        train_loop_config={"cfg": to_dict(cfg), "paths": paths, "targets": targets, "steps": steps,
                           "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"bench-{workers}-{time.time_ns()}", storage_path="/tmp/cxr-bench",
                                       logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    trainer.fit()
    return float(out.read_text()) * workers  # rank 0's rate; ranks run in lock-step under DDP


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    cfg = TrainConfig(batch_size=args.batch_size, preprocess=PreprocessConfig(image_size=args.image_size), amp=True)
    samples = discover(DATA)[:: 5][: args.batch_size * (args.steps + 2) * 2 + 64]
    paths, targets = [s.path for s in samples], [s.target("binary") for s in samples]
    cores = os.cpu_count() or 1

    torch.set_num_threads(cores)
    plain = measure(cfg, paths, targets, args.steps)

    from jobs.common import init_ray

    init_ray(num_cpus=cores)
    rows = [("plain PyTorch, 1 process", 1, cores, plain)]
    for workers in (1, 2):
        rows.append((f"Ray Train DDP, {workers} worker(s)", workers, 1, run_ray(cfg, paths, targets, args.steps, workers)))

    print(f"\nResNet-50 training, {args.image_size}px, batch {args.batch_size}/worker, bf16={cpu_has_fast_bf16()}, "
          f"{args.steps} timed steps, {cores} cores")
    print(f"{'setup':<30} {'workers':>7} {'threads/w':>9} {'img/s':>8} {'img/s/worker':>13} {'vs plain':>9}")
    for name, w, threads, rate in rows:
        print(f"{name:<30} {w:>7} {threads:>9} {rate:>8.1f} {rate / w:>13.1f} {rate / plain:>8.2f}x")


if __name__ == "__main__":
    main()

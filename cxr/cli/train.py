"""`cxr train`: fine-tune / train ResNet-50 with Ray Train."""

from __future__ import annotations


import click

from cxr.config import TRAIN_PRESETS


@click.command(context_settings={"max_content_width": 100})
@click.option("--data", required=True, metavar="PATH",
              help="Kaggle layout ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*, a folder with MANIFEST.csv, "
                   "or a manifest file (CSV/Parquet: path,label[,subtype,patient_id,split]). A local path: on a "
                   "cluster, a filesystem mounted at the same path on every node (not an s3:// URI).")
@click.option("--output", default="runs/latest", show_default=True, metavar="DIR",
              help="Run folder: model/ (the export), metrics.jsonl, curves.png, config.json, split.json.")
@click.option("--preset", type=click.Choice(sorted(TRAIN_PRESETS)), default="cpu", show_default=True,
              help="Recipe: cpu = from scratch on a small CPU machine in < 45 min where the CPU has native bf16 "
                   "(AVX512-BF16/AMX; fp32 elsewhere, ~2.3x slower: add --image-size 96); gpu = ImageNet fine-tune at "
                   "224 on a GPU cluster; tiny = smoke run (1 epoch, 64 px, at most 256 images). Flags below override it.")
@click.option("--workers", type=click.IntRange(min=1), help="DDP workers (Ray Train actors).  [cpu preset: 2]")
@click.option("--gpus", type=click.IntRange(min=0), help="GPUs per worker: 0 (CPU workers over gloo) or 1 (NCCL); "
              "--workers N for N GPUs.")
@click.option("--cpus-per-worker", type=click.IntRange(min=1), help="CPUs reserved per worker (also its torch threads).")
@click.option("--epochs", type=click.IntRange(min=1), help="Total epochs, warm-up included.")
@click.option("--warmup-epochs", type=click.IntRange(min=0), help="Frozen-backbone epochs before fine-tuning. Pretrained runs only "
              "(ignored with --pretrained none); must be less than --epochs.")
@click.option("--limit", type=click.IntRange(min=0), help="Use about N images (class-stratified, seeded; at least 2 of each class so a "
              "patient split has both): for smoke runs. 0 = all.  [tiny preset: 256]")
@click.option("--image-size", type=click.IntRange(min=32), help="Square input side in pixels.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Batch size per worker.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate (AdamW).")
@click.option("--task", type=click.Choice(["binary", "subtype"]),
              help="binary = NORMAL/PNEUMONIA (default); subtype = normal/bacteria/virus from file names.")
@click.option("--pretrained", metavar="imagenet|none|PATH",
              help="Initial weights: torchvision ImageNet (cache or download), none, a local state_dict file, or "
                   "a cxr model export folder (fine-tune from its weights).")
@click.option("--imbalance", type=click.Choice(["weights", "sampler", "none"]),
              help="Class imbalance: weighted loss, class-balanced sampling, or nothing.")
@click.option("--storage", metavar="DIR|URI", help="Checkpoint storage (local dir or s3://, gs://...). "
              "Default: OUTPUT/checkpoints.")
@click.option("--resume", is_flag=True, default=None,
              help="Continue the run in --output from its last checkpoint, with the run's saved config and split "
                   "(config.json, split.json); other flags may only change --cpus-per-worker, "
                   "--target-sensitivity and --early-stop-patience.")
@click.option("--seed", type=int, help="Seed for the split, sampling and init.  [42]")
@click.option("--val-fraction", type=click.FloatRange(0, 0.5, min_open=True, max_open=True), help="Share of patients held out for validation, approximately: "
              "one fold of k, the nearest 1/k (0.15 -> 1/7).  [0.15]")
@click.option("--target-sensitivity", type=click.FloatRange(0, 1, min_open=True),
              help="Operating point: the threshold is set on validation for this sensitivity.  [0.98]")
@click.option("--early-stop-patience", type=click.IntRange(min=0), help="Stop after N epochs without val AUC gain (0 = off).")
@click.option("--clahe/--no-clahe", default=None, help="Contrast-limited adaptive histogram equalisation.")
@click.option("--amp/--no-amp", default=None, help="bf16 autocast (GPU; CPU only where it has native bf16).")
@click.option("--ema-decay", type=click.FloatRange(0, 1, max_open=True), help="EMA of weights used for validation and export (0 = off).")
def train(**flags) -> None:
    """Train a pneumonia classifier with Ray Train (DDP) and export it.

    \b
    Runs on a local Ray instance it starts (or the cluster in RAY_ADDRESS), one
    DDP worker per --workers, prints one line per epoch, keeps the best
    checkpoints, and writes OUTPUT/model: the export `cxr screen` and
    `cxr serve` load with --model OUTPUT/model.

    \b
    Examples:
      cxr train --data ../shared/data/chest_xray --output runs/r1 --workers 2
      cxr train --data ../shared/data/chest_xray --output runs/r1 --resume
      cxr train --data /mnt/xrays/manifest.parquet --preset gpu --workers 8 --gpus 1 --storage s3://bucket/ckpt
    """
    from click.core import ParameterSource

    from cxr.config import describe_run, resolve_train_config

    ctx = click.get_current_context()
    explicit = {name for name in flags if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)}
    preset = flags.pop("preset")
    cfg = resolve_train_config(preset, flags)
    if "warmup_epochs" in explicit and flags["warmup_epochs"] and cfg.pretrained == "none":
        click.secho(f"warning: --warmup-epochs {flags['warmup_epochs']} ignored: the frozen-backbone warm-up "
                    "applies to pretrained weights only (--pretrained none)", fg="yellow", err=True)
    if not cfg.resume:  # a resumed run takes its saved config: jobs.train prints it once read
        click.echo(f"cxr train: {describe_run(cfg)}")
    from jobs.train import run_training

    summary = run_training(cfg, explicit=explicit)
    _print_summary(summary)


def _print_summary(s: dict) -> None:
    v = s["val"]
    rows = [("model", s["model"]), ("model id", s["model_id"][:16]), ("best epoch", f"{s['best_epoch']} of {s['epochs_run']}"),
            ("train / val images", f"{s['train_images']} / {s['val_images']}"),
            ("skipped (unreadable)", s["skipped_images"]), ("train time", f"{s['train_seconds']:.0f} s"),
            ("threshold", f"{s['threshold']:.4f}"), ("val AUC", f"{v['auc']:.4f}"),
            ("val accuracy at threshold", f"{v['accuracy']:.4f}"), ("val sensitivity at threshold", f"{v['sensitivity']:.4f}"),
            ("val specificity at threshold", f"{v['specificity']:.4f}")]
    width = max(len(k) for k, _ in rows)
    click.echo("\n" + "\n".join(f"  {k:<{width}}  {val}" for k, val in rows))
    click.echo(f"\nnext: cxr screen ARCHIVE --model {s['model']} --output screens/")


COMMANDS = [train]

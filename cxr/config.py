"""Typed configuration shared by the CLI, the Ray jobs and the Serve app.

Every knob lives here once. The CLI builds these dataclasses from flags, the
jobs receive them (as dicts across Ray), and the resolved values are written
beside every output so a run can be reproduced.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

EngineName = Literal["auto", "torch", "torch-bf16", "onnx"]
ENGINES: tuple[str, ...] = get_args(EngineName)  # the --engine choices of `cxr screen` and `cxr serve`
ENGINE_HELP = ("auto = PyTorch with bf16 autocast + channels_last on GPUs and on CPUs with native bf16 "
               "(AVX512-BF16/AMX), else ONNX Runtime fp32; onnx = ONNX Runtime fp32 (on a GPU only with "
               "onnxruntime-gpu installed); torch = PyTorch, fp32 on CPU, bf16 on GPU; torch-bf16 = bf16 on CPU too.")

ARCH = "resnet50"  # what cxr.model.build_model builds (recorded in every export's metadata)

Task = Literal["binary", "subtype"]
NewModel = Literal["refuse", "rescore"]

#: class names per task; index = model output index. The positive class for
#: screening (sensitivity, threshold) is the last one of the binary task.
CLASSES: dict[str, tuple[str, ...]] = {
    "binary": ("normal", "pneumonia"),
    "subtype": ("normal", "bacteria", "virus"),
}


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw image bytes become a model input; stored in every export.

    Grayscale single channel: chest X-rays carry no colour, and ImageNet
    weights are folded to one input channel when loaded (see cxr.model).
    ``image_size`` is the square side the image is resized to (not cropped:
    the Kermany images were squashed to 224x224, so squashing new images
    reproduces the training distribution).
    """

    image_size: int = 224
    clahe: bool = False
    clahe_clip: float = 2.0
    clahe_grid: int = 8
    mean: float = 0.449  # ImageNet RGB means folded to grayscale (as timm does)
    std: float = 0.226
    max_pixels: int = 64_000_000  # decompression-bomb cap (a 8000x8000 film)


@dataclass(frozen=True)
class AugmentConfig:
    """Training-only augmentation; never applied when scoring."""

    scale_min: float = 0.70  # RandomResizedCrop area range
    ratio_min: float = 0.85
    ratio_max: float = 1.18
    rotate_deg: float = 7.0  # small affine
    translate: float = 0.04
    brightness: float = 0.15
    contrast: float = 0.15
    hflip: float = 0.0  # anatomy is not mirror-symmetric: off by default


@dataclass
class TrainConfig:
    """Everything ``cxr train`` needs; presets fill it, flags override it."""

    data: str = ""
    output: str = "runs/latest"
    storage: str | None = None  # checkpoints: local dir or pyarrow URI; default OUTPUT/checkpoints
    task: Task = "binary"
    preset: str = "cpu"
    workers: int = 2
    gpus: int = 0  # GPUs per worker: 0 (CPU workers over gloo) or 1 (NCCL)
    cpus_per_worker: int = 1
    epochs: int = 12
    warmup_epochs: int = 0  # frozen-backbone phase (pretrained weights only; 0 without them)
    batch_size: int = 32  # per worker
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    imbalance: Literal["weights", "sampler", "none"] = "weights"
    pretrained: str = "none"  # imagenet | none | PATH to a state_dict file or a cxr export folder
    limit: int | None = None  # use at most N training images (smoke runs)
    val_fraction: float = 0.15
    seed: int = 42
    target_sensitivity: float = 0.98
    early_stop_patience: int = 0  # epochs without val AUC gain; 0 = off
    keep_checkpoints: int = 2
    resume: bool = False
    amp: bool = True  # bf16 autocast on GPU; on CPU only when the preset asks
    channels_last: bool = True
    ema_decay: float = 0.0  # exponential moving average of weights; 0 = off
    max_failures: int = 1
    num_threads: int = 0  # torch intra-op threads per worker; 0 = cpus_per_worker
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASSES[self.task]


@dataclass
class ScreenConfig:
    """``cxr screen``: score an archive into Parquet."""

    archive: str = ""
    model: str = ""
    output: str = "screens/latest"
    labels: str | None = None
    glob: str | None = None
    limit: int | None = None
    force: bool = False
    new_model: NewModel = "refuse"  # an output folder holding another model's results: refuse, or rescore once
    fail_on_error: bool = False
    batch_size: int = 0  # images per inference call; 0 = where the engine is fastest (cxr.engine.preferred_batch)
    workers: int = 0  # inference actors; 0 = as many as the cluster allows
    threads_per_worker: int = 0  # engine intra-op threads per actor; 0 = CPUs / actors
    gpus_per_worker: float = 0.0
    engine: EngineName = "auto"
    report: bool = True
    metrics_file: str | None = None
    pushgateway: str | None = None
    part_rows: int = 256  # rows per Parquet part: what a SIGKILL can lose at most (plus part_seconds)
    part_seconds: float = 10.0  # a part is also written after this long
    progress: bool = True  # rows/s on stderr while running


@dataclass
class AutoscalingConfig:
    """Ray Serve ``autoscaling_config`` (names match Ray's keys, so it is passed through as is)."""

    min_replicas: int = 1
    max_replicas: int = 2
    initial_replicas: int | None = None
    target_ongoing_requests: float = 8.0  # per replica; ~ max_batch_size/2 keeps batches full without queueing
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    look_back_period_s: float = 15.0  # > Ray's metrics push interval (10 s), which Ray will require


@dataclass
class ServeConfig:
    """``cxr serve``, ``serve/config.yaml`` and the RayService are built from this.

    ``serve.schema.serve_config_document`` turns it into a Ray Serve config
    file, so the CLI, the committed YAML and the KubeRay manifest cannot drift.
    """

    model: str = ""  # export directory; "" = take it from $CXR_MODEL on the replica
    host: str = "127.0.0.1"
    port: int = 8000
    metrics_port: int = 8080  # Ray's Prometheus export port (local Ray started by `cxr serve`)
    route_prefix: str = "/"
    app_name: str = "cxr"
    engine: EngineName = "auto"
    engine_threads: int = 0  # intra-op threads of the engine; 0 = cpus_per_replica (at least 1)
    preprocess_threads: int = 2  # decode+preprocess thread pool per replica (off the event loop)
    max_batch_size: int = 16  # @serve.batch; runtime-settable through user_config
    batch_wait_ms: float = 10.0
    max_batch_images: int = 32  # images per POST /v1/predict/batch
    max_ongoing_requests: int = 32  # per replica
    max_queued_requests: int = 64  # per caller (proxy); beyond it: overload_status_code
    overload_status_code: int = 503  # 503 or 429 (Ray's backpressure_config)
    retry_after_s: float | None = 1.0
    gpus_per_replica: float = 0.0  # fractional allowed
    cpus_per_replica: float = 1.0
    max_body_mb: float = 20.0
    request_timeout_s: float = 30.0  # in the app (JSON 503); the proxy gets this + 5 s as a backstop
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_wait_loop_s: float = 2.0
    graceful_shutdown_timeout_s: float = 35.0  # >= request_timeout_s: a replica being stopped answers what it holds
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)


T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a (nested) config dataclass from ``to_dict`` output, ignoring unknown keys.

    Unknown keys are dropped so an older cxr can read a newer file.
    """
    hints = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = hints.get(name)
        if f is None:
            continue
        sub = _nested_type(cls, name)
        kwargs[name] = from_dict(sub, value) if sub is not None and isinstance(value, dict) else value
    return cls(**kwargs)


def _nested_type(cls: type, name: str) -> type | None:
    nested = {
        "preprocess": PreprocessConfig,
        "augment": AugmentConfig,
        "autoscaling": AutoscalingConfig,
    }
    return nested.get(name)


def save_json(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


#: Training recipes. Flags override these; the resolved TrainConfig is saved with the run.
#: cpu  - from scratch on a 2-core machine in < 45 min (measured: BENCHMARKS.md).
#: gpu  - the cluster recipe: ImageNet fine-tune at 224, two-phase schedule, AMP, big batches.
#: tiny - smoke runs (tests, `make demo`): seconds, not a useful model.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        workers=2, epochs=12, batch_size=32, lr=2e-3, weight_decay=0.05, label_smoothing=0.1,
        schedule="onecycle", imbalance="weights", pretrained="none", warmup_epochs=0, amp=True,
        channels_last=True, ema_decay=0.9975, early_stop_patience=0,
        preprocess=dict(image_size=128),
    ),
    "gpu": dict(
        workers=4, gpus=1, cpus_per_worker=8, epochs=20, batch_size=64, lr=5e-4, weight_decay=0.05,
        label_smoothing=0.1, schedule="cosine", imbalance="weights", pretrained="imagenet", warmup_epochs=2,
        amp=True, channels_last=True, ema_decay=0.999, early_stop_patience=5,
        preprocess=dict(image_size=224),
    ),
    "tiny": dict(
        workers=2, epochs=1, batch_size=8, lr=1e-3, pretrained="none", amp=False, ema_decay=0.0,
        keep_checkpoints=1, limit=256, preprocess=dict(image_size=64),
    ),
}


def resolve_train_config(preset: str, overrides: dict[str, Any]) -> TrainConfig:
    """Preset values, then non-None ``overrides`` (``image_size``/``clahe`` go to ``preprocess``)."""
    if preset not in TRAIN_PRESETS:
        from cxr.errors import CxrError

        raise CxrError(f"unknown preset {preset!r} (choose from {', '.join(TRAIN_PRESETS)})")
    values: dict[str, Any] = {**TRAIN_PRESETS[preset], "preset": preset}
    pre = dict(values.pop("preprocess", {}))
    aug = dict(values.pop("augment", {}))
    for key, value in overrides.items():
        if value is None:
            continue
        if key in {f.name for f in dataclasses.fields(PreprocessConfig)}:
            pre[key] = value
        else:
            values[key] = value
    return check_train_config(from_dict(TrainConfig, {**values, "preprocess": pre, "augment": aug}))


def describe_run(cfg: TrainConfig) -> str:
    """The recipe in one line, as a run prints it when it starts (new or resumed)."""
    return (f"preset {cfg.preset}, {cfg.workers} worker(s), {cfg.epochs} epochs at {cfg.preprocess.image_size}px, "
            f"pretrained={cfg.pretrained}, output {cfg.output}")


def check_train_config(cfg: TrainConfig) -> TrainConfig:
    """A new run's config made consistent, or a one-line error.

    The frozen-backbone warm-up only makes sense on pretrained weights: without
    them it is dropped (a random backbone would sit at LR 0). ``--gpus`` is per
    worker and DDP drives one device per worker.
    """
    from cxr.errors import CxrError

    if cfg.pretrained == "none" and cfg.warmup_epochs:
        cfg = dataclasses.replace(cfg, warmup_epochs=0)
    if cfg.epochs <= cfg.warmup_epochs:
        raise CxrError(f"--epochs ({cfg.epochs}) must be more than --warmup-epochs ({cfg.warmup_epochs}): "
                       "the warm-up epochs train only the head")
    if not 0 <= cfg.gpus <= 1:
        raise CxrError(f"--gpus is GPUs per worker: 0 or 1 (each DDP worker drives one GPU), got {cfg.gpus}; "
                       "use --workers N for N GPUs")
    return cfg


#: Flags a ``--resume`` may change from the run's saved config: none changes the data split, the
#: steps per epoch or the LR schedule. ``data`` must still name the same images (checked against
#: split.json); ``output`` names the run itself.
RESUME_MAY_CHANGE = ("data", "output", "resume", "cpus_per_worker", "target_sensitivity", "early_stop_patience")


def resume_config(saved: TrainConfig, given: TrainConfig, explicit: Any = None, strict: bool = True) -> TrainConfig:
    """The config a ``--resume`` continues with: the run's ``saved`` one, plus the allowed flags.

    ``explicit`` names the flags the user passed (``None``: every field of ``given`` counts). A
    passed flag that differs from the saved run, outside :data:`RESUME_MAY_CHANGE`, is an error
    listing every such difference. ``strict=False`` (a run with no checkpoint yet, started over)
    applies every passed flag instead; a passed ``--preset`` takes ``given`` whole.
    """
    from cxr.errors import CxrError

    pre_fields = {f.name for f in dataclasses.fields(PreprocessConfig)}
    train_fields = [f.name for f in dataclasses.fields(TrainConfig)]
    if not strict and (explicit is None or "preset" in explicit):
        return dataclasses.replace(given, resume=True)
    diffs, changes, pre_changes = [], {}, {}
    for name in train_fields if explicit is None else sorted(explicit):
        if name in pre_fields:
            old, new = getattr(saved.preprocess, name), getattr(given.preprocess, name)
        elif name in train_fields:
            old, new = getattr(saved, name), getattr(given, name)
        else:
            continue
        if name in RESUME_MAY_CHANGE or not strict:
            (pre_changes if name in pre_fields else changes)[name] = new
        elif old != new:
            diffs.append(f"--{name.replace('_', '-')} {_show(new)} (the run has {_show(old)})")
    if diffs:
        raise CxrError("--resume continues the run with its saved config (config.json); these flags differ from it: "
                       + "; ".join(diffs) + ". Drop them, or start a new run with another --output")
    out = dataclasses.replace(saved, **{**changes, "output": given.output, "data": given.data, "resume": True})
    return dataclasses.replace(out, preprocess=dataclasses.replace(out.preprocess, **pre_changes)) if pre_changes else out


def _show(value: Any) -> str:
    return "none" if value is None else str(value)

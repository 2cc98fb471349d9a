"""The GPU paths of the cxr core, without Ray, on one GPU: what a GPU training worker, screening actor
or serving replica runs, measured in one process.

The lent GPU machines have torch but no Ray (its wheel is too big to carry there), so this drives the
Ray-free building blocks the jobs are made of, the way the jobs call them:

1. ``train``: ``torch.distributed`` over NCCL (world of one), the collectives ``jobs/train.py`` uses,
   DDP, then :func:`cxr.training.train_one_epoch` (a) on in-memory batches, fp32 NCHW (the notebook
   recipe) vs bf16 autocast + channels_last (cxr's recipe), the GPU step rate alone, and (b) on real
   JPEGs through ``XrayDataset`` + augmentation + the DataLoader processes of the ``gpu`` preset
   (7 per GPU) and of all cores, which says whether the CPUs keep the GPU busy; the baseline there
   is the augmentation as torchvision v2 transforms on tensors (cxr's before 2026-11-26), and one
   variant drops the per-step EMA. Training goes on across (b), so the model the later sections
   export has learnt something.
2. ``export``: :func:`cxr.export.save_export` (weights, ONNX, TorchScript) of that model.
3. ``engines``: ``load_engine(auto)`` (TorchScript, bf16, channels_last on the GPU), the fp32 torch
   engine and ONNX Runtime against fp32 PyTorch on the CPU, on held-out images.
4. ``forward``: forward-only images/s from host arrays to host probabilities, per batch size:
   eager fp32 NCHW (the notebook baseline), fp32 channels_last, bf16 channels_last, the
   ``auto`` engine, ``torch.compile``, and bf16 with the input already on the GPU (the ceiling).
5. ``decode``: :func:`cxr.preprocess.preprocess` on one core and on a process pool of all the other
   cores, vs ``torchvision.io.decode_jpeg`` on the GPU, and how far the two inputs and the
   probabilities they give differ.
6. ``pipeline``: the screening path without Ray (process pool of ``preprocess`` -> the ``auto``
   engine in batches) vs the plain notebook loop (ImageFolder + torchvision transforms + DataLoader
   + fp32 NCHW eager) on the same GPU and files.

Results go to ``--out``/gpu_paths.json after every section, so a run cut short keeps what it had.

    # here: copy a balanced subset of ../shared (by patient) to an ignored folder the device run carries
    .venv/bin/python bench/gpu_paths.py prepare --images 2000 --dest .gpu-data
    # there (python3 has torch; no Ray needed):
    python3 bench/gpu_paths.py run --data .gpu-data --out $OUT
    # a CPU dry run of every section at a tiny size:
    .venv/bin/python bench/gpu_paths.py run --data .gpu-data --out /tmp/gpu-dry --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS: dict[str, Any] = {}
OUT = Path(".")
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def section(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run one section, keep its result or its error, and save everything so far."""

    def run(*args: Any, **kwargs: Any) -> Any:
        name, t = fn.__name__, time.perf_counter()
        say(f"== {name}")
        try:
            out = fn(*args, **kwargs)
            RESULTS[name] = out if isinstance(out, dict) else {"value": out}
        except Exception as exc:  # noqa: BLE001 - one broken section must not cost the others
            traceback.print_exc()
            RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}"}
            out = None
        RESULTS.setdefault("seconds", {})[name] = round(time.perf_counter() - t, 1)
        (OUT / "gpu_paths.json").write_text(json.dumps(RESULTS, indent=1, default=str))
        return out

    return run


# --------------------------------------------------------------------------- data


def prepare(images: int, dest: Path, seed: int = 0) -> None:
    """A class-balanced subset of the shared train split, 80/20 train/val by patient, in the Kaggle layout."""
    from cxr.data import discover, split_by_patient

    src = Path(os.environ.get("CXR_SHARED", ROOT.parent / "shared")) / "data" / "chest_xray"
    samples = discover(src)
    train, val = split_by_patient(samples, 0.2, seed)
    rng = np.random.default_rng(seed)
    if dest.exists():
        shutil.rmtree(dest)
    for split, part, n in (("train", train, int(images * 0.8)), ("val", val, images - int(images * 0.8))):
        for label in ("NORMAL", "PNEUMONIA"):
            pool = [s for s in part if Path(s.path).parent.name == label]
            pick = rng.choice(len(pool), size=min(n // 2, len(pool)), replace=False)
            (dest / split / label).mkdir(parents=True)
            for i in pick:
                shutil.copy(pool[i].path, dest / split / label / Path(pool[i].path).name)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{sum(1 for f in dest.rglob('*.jpeg'))} images, {size / 2**20:.1f} MiB in {dest}")


def read_split(root: Path, limit: int | None = None) -> tuple[list[bytes], list[int]]:
    files = sorted(root.glob("*/*.jpeg"))
    if limit:
        files = files[:: max(1, len(files) // limit)][:limit]
    return [f.read_bytes() for f in files], [0 if f.parent.name == "NORMAL" else 1 for f in files]


# --------------------------------------------------------------------------- timing


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(step: Callable[[], Any], images: int, seconds: float, device, min_iters: int = 3) -> float:
    """Images/s of ``step`` (one batch), median over ``seconds`` of calls after two warm-up calls."""
    step(), step()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < min_iters:
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return images / statistics.median(times)


# --------------------------------------------------------------------------- sections


@section
def env(device) -> dict[str, Any]:
    import torch
    import torchvision

    import cxr.engine  # noqa: F401 - the whole core, to show it needs no Ray
    import cxr.report  # noqa: F401
    import cxr.screening  # noqa: F401
    import cxr.training  # noqa: F401
    from cxr.engine import preferred_batch, resolve_backend

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cpus": os.cpu_count(), "ray_imported": "ray" in sys.modules,
            "auto_engine": resolve_backend("auto"), "preferred_batch": preferred_batch("auto", device.type == "cuda"),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_precision": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, nccl=".".join(map(str, torch.cuda.nccl.version())))
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["ort_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    # what a fresh screening actor or replica decides before it imports torch (cxr.hardware's probe)
    probe = subprocess.run([sys.executable, "-c", "import sys; from cxr.engine import resolve_backend; "
                            "print(resolve_backend('auto'), 'torch' in sys.modules)"],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    info["auto_engine_fresh_process"] = (probe.stdout.strip() or probe.stderr.strip()[-300:])
    assert not info["ray_imported"], "the cxr core imported Ray"
    say(json.dumps(info))
    return info


def init_process_group(device) -> None:
    """What Ray Train's TorchTrainer does before the loop: one process group per worker."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def ddp(model, device):
    """``ray.train.torch.prepare_model``'s wrap: to the device, then DDP."""
    from torch.nn.parallel import DistributedDataParallel

    model = model.to(device)
    return DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)


TRAINED: dict[str, Any] = {}  # the model the training section ends with, for the export section


@section
def train(device, data: Path, size: int, quick: bool) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.optim.swa_utils import AveragedModel

    from cxr.config import PreprocessConfig, resolve_train_config
    from cxr.model import autocast, build_model
    from cxr.preprocess import make_train_augment
    from cxr.training import (DistributedBalancedSampler, LoadedImages, XrayDataset, build_optimizer,
                              build_scheduler, check_loaded, class_weights, ema_avg_fn, predict, train_one_epoch)

    out: dict[str, Any] = {}
    t = time.perf_counter()
    init_process_group(device)
    # the collectives jobs/train.py runs: read counts gathered from every rank, metrics all-reduced
    counts: list[Any] = [None]
    dist.all_gather_object(counts, ((100, 1), (20, 0)))
    assert check_loaded([c[0] for c in counts], [c[1] for c in counts]) == 1
    x = torch.arange(4.0, device=device)
    dist.all_reduce(x)
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0]
    out["process_group"] = {"backend": dist.get_backend(), "seconds": round(time.perf_counter() - t, 2)}
    say(f"process group {out['process_group']}")

    cfg = resolve_train_config("gpu", {"pretrained": "none", "warmup_epochs": 0, "image_size": size,
                                       "epochs": 12})  # the schedule spans every epoch below
    batch = 8 if quick else cfg.batch_size
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    # (a) the GPU step alone: in-memory batches, the same train_one_epoch
    steps = 2 if quick else 40
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, 1, size, size, generator=gen), torch.randint(0, 2, (batch,), generator=gen))
               for _ in range(8)]
    synthetic = [batches[i % len(batches)] for i in range(steps)]
    for name, amp, cl in (("fp32 NCHW", False, False), ("bf16 channels_last", True, True)):
        model = build_model(2)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        model = ddp(model, device)
        opt = build_optimizer(model, cfg)
        sched = build_scheduler(opt, cfg, steps)
        train_one_epoch(model, synthetic[:3], opt, sched, loss_fn, device, amp, cl)  # warm-up (cudnn picks kernels)
        sync(device)
        r = train_one_epoch(model, synthetic, opt, sched, loss_fn, device, amp, cl)
        out[f"step {name}"] = round(r["images_per_s"], 1)
        say(f"train step only, {name}, batch {batch}: {r['images_per_s']:.0f} img/s")
        if amp and device.type == "cuda":  # build_optimizer's fused AdamW against torch's default (foreach)
            groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in opt.param_groups]
            foreach = torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)
            train_one_epoch(model, synthetic[:3], foreach, sched, loss_fn, device, amp, cl)
            for label, o in (("foreach AdamW", foreach), ("fused AdamW (cxr)", opt), ("foreach AdamW, again", foreach)):
                r = train_one_epoch(model, synthetic, o, sched, loss_fn, device, amp, cl)
                out[f"step {name}, {label}"] = round(r["images_per_s"], 1)
                say(f"train step only, {name}, {label}: {r['images_per_s']:.0f} img/s")
        if amp:  # the same steps without train_one_epoch's per-step host sync (float(loss), int(correct))
            t = time.perf_counter()
            for xb, yb in synthetic:
                xb = xb.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                yb = yb.to(device, non_blocking=True)
                with autocast(device, True):
                    loss = loss_fn(model(xb).float(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            sync(device)
            out[f"step {name}, no per-step sync"] = round(len(synthetic) * batch / (time.perf_counter() - t), 1)
            say(f"train step only, {name}, no per-step sync: {out[f'step {name}, no per-step sync']:.0f} img/s")
        del model, opt
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    # (b) real JPEGs through the one preprocessing path with augmentation, DataLoader processes
    limit = 64 if quick else None
    data_bytes, targets = read_split(data / "train", limit)
    if not quick:  # 75 steps an epoch, as a 5,000-image split has
        data_bytes, targets = data_bytes * 3, targets * 3
    images = LoadedImages(data_bytes, targets, [str(i) for i in range(len(targets))], {})
    pre = PreprocessConfig(image_size=size)
    steps_per_epoch = len(images.data) // batch
    model = build_model(2).to(memory_format=torch.channels_last)
    model = ddp(model, device)
    plain = model.module
    ema = AveragedModel(plain, multi_avg_fn=ema_avg_fn(cfg.ema_decay), use_buffers=True)
    opt = build_optimizer(model, cfg)
    cores = (os.cpu_count() or 2) - 1
    loaders = [("7 loader processes, torchvision v2 on tensors (before), EMA", 7, v2_tensor_augment(cfg.augment), True),
               ("7 loader processes, cxr augment, EMA", 7, make_train_augment(cfg.augment), True),
               ("7 loader processes, cxr augment, no EMA", 7, make_train_augment(cfg.augment), False),
               (f"{cores} loader processes, cxr augment, EMA", cores, make_train_augment(cfg.augment), True)]
    epochs_each = 2 if quick else 3
    sched = build_scheduler(opt, cfg, steps_per_epoch)
    weights = class_weights(targets, 2).to(device)
    loss_w = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)
    history = []
    for epoch_base, (name, workers, augment, use_ema) in enumerate(loaders):
        ds = XrayDataset(images, pre, augment)
        sampler = DistributedBalancedSampler(targets, 0, 1, cfg.seed)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, drop_last=True,
                                             num_workers=workers, pin_memory=device.type == "cuda",
                                             persistent_workers=True)
        rates = []
        for e in range(epochs_each):
            sampler.set_epoch(epoch_base * epochs_each + e)
            r = train_one_epoch(model, loader, opt, sched, loss_w, device, True, True, ema=ema if use_ema else None)
            rates.append(r["images_per_s"])
            history.append(round(r["loss"], 4))
            say(f"  {name}: epoch {e} {r['images_per_s']:.0f} img/s loss {r['loss']:.3f}")
        out[f"real {name}"] = round(statistics.median(rates[1:] or rates), 1)  # the first epoch starts the workers
        del loader
    out["loss_by_epoch"] = history
    if device.type == "cuda":
        out["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    val_bytes, val_targets = read_split(data / "val", 64 if quick else None)
    val = XrayDataset(LoadedImages(val_bytes, val_targets, [str(i) for i in range(len(val_targets))], {}), pre)
    from sklearn.metrics import roc_auc_score

    for name, m in (("model", plain), ("ema", ema.module)):
        p = predict(m, val, 256, device, True, True)
        out[f"val_auc {name}"] = round(float(roc_auc_score(val_targets, p[:, 1])), 4)
    say(f"val AUC {out['val_auc model']} (EMA {out['val_auc ema']}), {len(val_targets)} held-out images")
    dist.destroy_process_group()
    TRAINED["model"] = plain if out["val_auc model"] >= out["val_auc ema"] else ema.module
    return out


def v2_tensor_augment(cfg):
    """The baseline: cxr's augmentation as it was, torchvision v2 transforms on tensors (same parameters)."""
    import torch
    from torchvision.transforms import v2

    def augment(img: np.ndarray, size: int) -> np.ndarray:
        t = v2.RandomResizedCrop(size, scale=(cfg.scale_min, 1.0), ratio=(cfg.ratio_min, cfg.ratio_max),
                                 antialias=True)(torch.from_numpy(img))
        t = v2.RandomAffine(degrees=cfg.rotate_deg, translate=(cfg.translate, cfg.translate))(t)
        t = (t - t.mean()) * (1.0 + (torch.rand(()) * 2 - 1) * cfg.contrast) + t.mean()
        return (t * (1.0 + (torch.rand(()) * 2 - 1) * cfg.brightness)).clamp_(0.0, 1.0).numpy()

    return augment


@section
def export(model_dir: Path, size: int) -> dict[str, Any]:
    import torch

    from cxr.config import PreprocessConfig
    from cxr.export import ModelMetadata, save_export
    from cxr.model import build_model

    model = TRAINED.get("model")
    if model is None:
        torch.manual_seed(0)
        model = build_model(2)
    t = time.perf_counter()
    meta = save_export(model_dir, model.eval(), ModelMetadata(classes=["normal", "pneumonia"],
                                                             preprocess=PreprocessConfig(image_size=size),
                                                             model_version="gpu-paths"))
    return {"seconds": round(time.perf_counter() - t, 1), "trained": "model" in TRAINED,
            "files": sorted(p.name for p in model_dir.iterdir()), "model_id": meta.model_id[:12]}


def val_inputs(data: Path, size: int, limit: int | None) -> tuple[np.ndarray, list[int], list[bytes]]:
    from cxr.config import PreprocessConfig
    from cxr.preprocess import preprocess

    data_bytes, targets = read_split(data / "val", limit)
    cfg = PreprocessConfig(image_size=size)
    return np.stack([preprocess(b, cfg) for b in data_bytes]), targets, data_bytes


@section
def engines(model_dir: Path, x: np.ndarray, targets: list[int]) -> dict[str, Any]:
    import torch
    from sklearn.metrics import roc_auc_score

    from cxr.engine import TorchEngine, load_engine
    from cxr.export import load_export
    from cxr.model import Probabilities

    ref_model = Probabilities(load_export(model_dir)[0]).eval()
    with torch.inference_mode():
        ref = np.concatenate([ref_model(torch.from_numpy(x[i:i + 64])).numpy() for i in range(0, len(x), 64)])
    out: dict[str, Any] = {"images": len(x), "auc fp32 cpu": round(float(roc_auc_score(targets, ref[:, 1])), 4)}
    threshold = 0.5
    candidates: list[tuple[str, Callable[[], Any]]] = [
        ("auto", lambda: load_engine(model_dir, "auto")),
        # How the jobs call it: Ray says whether the actor holds a GPU (Ray 2.60 leaves every GPU
        # visible to an actor that reserved none, so gpu=False must keep it on the CPU).
        ("auto, gpu=True", lambda: load_engine(model_dir, "auto", gpu=True)),
        ("auto, gpu=False", lambda: load_engine(model_dir, "auto", gpu=False)),
        ("torch fp32", lambda: TorchEngine(model_dir, bf16=False)),
        ("onnx", lambda: load_engine(model_dir, "onnx")),
    ]
    for label, make in candidates:
        try:
            t = time.perf_counter()
            eng = make()
            load_s = time.perf_counter() - t
            got = np.concatenate([eng.predict_proba(x[i:i + 64]) for i in range(0, len(x), 64)])
            row = {"engine": eng.name, "load_s": round(load_s, 2),
                   "device": str(getattr(eng, "device", "")) or ",".join(eng.session.get_providers()),
                   "max_abs_diff": float(np.abs(got - ref).max()),
                   "decision_flips": int(((got[:, 1] >= threshold) != (ref[:, 1] >= threshold)).sum()),
                   "auc": round(float(roc_auc_score(targets, got[:, 1])), 4)}
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            row = {"error": f"{type(exc).__name__}: {exc}"}
        out[label] = row
        say(f"  {label}: {row}")
    return out


@section
def forward(model_dir: Path, size: int, batches: list[int], seconds: float, device, compile_: bool) -> dict[str, Any]:
    import torch

    from cxr.engine import load_engine
    from cxr.export import load_export
    from cxr.model import Probabilities, autocast

    base = Probabilities(load_export(model_dir)[0]).eval().to(device)
    cl = Probabilities(load_export(model_dir)[0]).eval().to(device).to(memory_format=torch.channels_last)
    engine = load_engine(model_dir, "auto")

    def eager(model, channels_last: bool, bf16: bool, on_gpu: bool = False):
        def step(x: np.ndarray, xd: torch.Tensor) -> np.ndarray:
            t = xd if on_gpu else torch.from_numpy(x).to(device)
            if channels_last:
                t = t.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast(device, bf16):
                p = model(t)
            return p if on_gpu else p.float().cpu().numpy()
        return step

    variants: list[tuple[str, Callable[..., Any]]] = [
        ("eager fp32 NCHW (notebook)", eager(base, False, False)),
        ("eager fp32 channels_last", eager(cl, True, False)),
        ("eager bf16 channels_last", eager(cl, True, True)),
        (f"cxr auto engine ({engine.name})", lambda x, xd: engine.predict_proba(x)),
        ("bf16 channels_last, input already on device", eager(cl, True, True, on_gpu=True)),
    ]
    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal((b, 1, size, size), dtype=np.float32)
        xd = torch.from_numpy(x).to(device)
        for name, step in variants:
            r = rate(lambda step=step, x=x, xd=xd: step(x, xd), b, seconds, device)
            out.setdefault(name, {})[b] = round(r, 1)
            say(f"  batch {b:4d} {name}: {r:.0f} img/s")
    if compile_:
        try:
            t = time.perf_counter()
            compiled = torch.compile(cl, dynamic=False)
            b = max(batches)
            x = rng.standard_normal((b, 1, size, size), dtype=np.float32)
            step = eager(compiled, True, True)
            step(x, None)
            out["compile_seconds"] = round(time.perf_counter() - t, 1)
            r = rate(lambda: step(x, None), b, seconds, device)
            out.setdefault("torch.compile bf16 channels_last", {})[b] = round(r, 1)
            say(f"  batch {b:4d} torch.compile bf16 channels_last: {r:.0f} img/s (compile {out['compile_seconds']} s)")
        except Exception as exc:  # noqa: BLE001 - no compiler there: keep the eager rows
            traceback.print_exc()
            out["compile_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _preprocess_chunk(args: tuple[list[bytes], int]) -> np.ndarray:
    from cxr.config import PreprocessConfig
    from cxr.preprocess import preprocess

    chunk, size = args
    cfg = PreprocessConfig(image_size=size)
    return np.stack([preprocess(b, cfg) for b in chunk])


def _pool(workers: int):
    import multiprocessing as mp

    return mp.get_context("fork").Pool(workers)  # the children never touch CUDA


@section
def decode(data_bytes: list[bytes], size: int, device, model_dir: Path) -> dict[str, Any]:
    import torch
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg

    from cxr.config import PreprocessConfig
    from cxr.engine import load_engine

    out: dict[str, Any] = {}
    cfg = PreprocessConfig(image_size=size)
    n1 = data_bytes[: min(400, len(data_bytes))]
    t = time.perf_counter()
    ours = _preprocess_chunk((n1, size))
    out["cxr.preprocess, 1 process"] = round(len(n1) / (time.perf_counter() - t), 1)
    workers = max(1, (os.cpu_count() or 2) - 1)
    chunks = [(data_bytes[i:i + 64], size) for i in range(0, len(data_bytes), 64)]
    with _pool(workers) as pool:
        pool.map(_preprocess_chunk, chunks[:workers])  # start the processes
        t = time.perf_counter()
        n = sum(len(a) for a in pool.imap(_preprocess_chunk, chunks))
        out[f"cxr.preprocess, {workers} processes"] = round(n / (time.perf_counter() - t), 1)

    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data_bytes]
    mean, std = torch.tensor(cfg.mean, device=device), torch.tensor(cfg.std, device=device)

    def gpu_batch(ts: list[torch.Tensor]) -> torch.Tensor:
        imgs = decode_jpeg(ts, mode=ImageReadMode.GRAY, device=device)
        xs = []
        for im in imgs:
            f = im.float().div_(255.0)
            if f.shape[-2:] != (size, size):
                f = torch.nn.functional.interpolate(f[None], size=(size, size), mode="bilinear",
                                                    antialias=True, align_corners=False)[0]
            xs.append(f)
        return (torch.stack(xs) - mean) / std

    b = 256
    gpu_batch(tensors[:b])
    sync(device)
    t = time.perf_counter()
    for i in range(0, len(tensors), b):
        gpu_batch(tensors[i:i + b])
    sync(device)
    out[f"torchvision decode_jpeg on {device.type}, batch {b}"] = round(len(tensors) / (time.perf_counter() - t), 1)
    theirs = gpu_batch(tensors[: len(n1)]).cpu().numpy()
    out["max_abs_input_diff"] = float(np.abs(theirs - ours).max())
    out["mean_abs_input_diff"] = float(np.abs(theirs - ours).mean())
    eng = load_engine(model_dir, "auto")
    p_ours = np.concatenate([eng.predict_proba(ours[i:i + 64]) for i in range(0, len(ours), 64)])
    p_theirs = np.concatenate([eng.predict_proba(theirs[i:i + 64]) for i in range(0, len(theirs), 64)])
    out["max_abs_prob_diff"] = float(np.abs(p_ours - p_theirs).max())
    out["torchvision"] = torchvision.__version__
    for k, v in out.items():
        say(f"  {k}: {v}")
    return out


@section
def pipeline(data: Path, data_bytes: list[bytes], size: int, model_dir: Path, device, repeat: int) -> dict[str, Any]:
    import torch
    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from cxr.engine import load_engine, preferred_batch
    from cxr.export import load_export

    out: dict[str, Any] = {}
    workers = max(1, (os.cpu_count() or 2) - 1)
    batch = preferred_batch("auto", device.type == "cuda")
    engine = load_engine(model_dir, "auto")
    engine.predict_proba(np.zeros((batch, 1, size, size), np.float32))
    work = data_bytes * repeat
    chunks = [(work[i:i + batch], size) for i in range(0, len(work), batch)]
    with _pool(workers) as pool:
        pool.map(_preprocess_chunk, chunks[:workers])
        t = time.perf_counter()
        n = 0
        for x in pool.imap(_preprocess_chunk, chunks):
            n += len(engine.predict_proba(x))
        out[f"cxr core: {workers} preprocess processes -> {engine.name} engine, batch {batch}"] = \
            round(n / (time.perf_counter() - t), 1)

    tf = T.Compose([T.Grayscale(1), T.Resize((size, size)), T.ToTensor(), T.Normalize([0.449], [0.226])])
    ds = torch.utils.data.ConcatDataset([ImageFolder(str(data / split), transform=tf)
                                         for split in ("train", "val")] * repeat)
    model = load_export(model_dir)[0].eval().to(device)
    for nw in sorted({4, workers}):
        dl = DataLoader(ds, batch_size=32, num_workers=nw, shuffle=False, pin_memory=device.type == "cuda")
        t = time.perf_counter()
        n = 0
        with torch.no_grad():
            for x, _ in dl:
                n += len(torch.softmax(model(x.to(device)), 1).cpu())
        out[f"plain loop: ImageFolder + transforms, DataLoader({nw} workers), fp32 NCHW, batch 32"] = \
            round(n / (time.perf_counter() - t), 1)
    for k, v in out.items():
        say(f"  {k}: {v} img/s")
    return out


def table() -> str:
    lines = []
    for name, res in RESULTS.items():
        if name == "seconds":
            continue
        lines.append(f"## {name} ({RESULTS['seconds'].get(name)} s)")
        for k, v in res.items():
            lines.append(f"  {k}: {v}")
    return "\n".join(lines)


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="copy a balanced subset of ../shared for a device run")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--dest", type=Path, default=ROOT / ".gpu-data")
    r = sub.add_parser("run", help="measure every section")
    r.add_argument("--data", type=Path, default=ROOT / ".gpu-data")
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-paths")))
    r.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU dry run")
    r.add_argument("--skip", nargs="*", default=[], help="sections to leave out")
    r.add_argument("--seconds", type=float, default=2.5, help="per forward-speed cell")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args.images, args.dest)
        return

    if not all((args.data / split).is_dir() for split in ("train", "val")):
        sys.exit(f"{args.data} has no train/ and val/ folders: run `bench/gpu_paths.py prepare --dest {args.data}` first")
    import torch

    OUT = args.out
    OUT.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = 64 if args.quick else 224
    model_dir = Path(tempfile.mkdtemp(prefix="cxr-gpu-paths-")) / "model"  # ~280 MB: not under --out
    env(device)
    if "train" not in args.skip:
        train(device, args.data, size, args.quick)
    export(model_dir, size)
    if not model_dir.joinpath("metadata.json").is_file():
        print(table())
        sys.exit(1)
    x, targets, _ = val_inputs(args.data, size, 64 if args.quick else None)
    if "engines" not in args.skip:
        engines(model_dir, x, targets)
    if "forward" not in args.skip:
        forward(model_dir, size, [8] if args.quick else [32, 64, 128, 256], 0.3 if args.quick else args.seconds,
                device, compile_="compile" not in args.skip)
    all_bytes = read_split(args.data / "train", 128 if args.quick else None)[0] + \
        read_split(args.data / "val", 64 if args.quick else None)[0]
    if "decode" not in args.skip:
        decode(all_bytes, size, device, model_dir)
    if "pipeline" not in args.skip:
        pipeline(args.data, all_bytes, size, model_dir, device, 1 if args.quick else 2)
    shutil.rmtree(model_dir.parent, ignore_errors=True)
    print("\n" + table())


if __name__ == "__main__":
    main()

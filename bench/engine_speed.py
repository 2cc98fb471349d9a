"""Forward-only speed of the engines cxr can run, on this machine, in one run.

Why: screening and serving both score through ``cxr.engine.load_engine``; which
engine ``auto`` picks on a CPU, and whether dynamic batching can help there,
depends on how each engine's speed grows with the batch size. Baseline: PyTorch
eager fp32 NCHW at batch 32 (what typical notebook code runs).

Each engine runs ResNet-50 (1-channel stem, 2 classes, untrained weights: speed
does not depend on them) on a fixed random batch for ``--seconds`` per cell,
after one warm-up call; all threads of the machine unless ``--threads``.

    .venv/bin/python bench/engine_speed.py                 # ~3 min on 2 cores
    .venv/bin/python bench/engine_speed.py --size 128 --batches 1 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxr.config import CLASSES, PreprocessConfig
from cxr.engine import load_engine
from cxr.export import ModelMetadata, save_export
from cxr.model import build_model


class _EagerFp32Nchw:
    """The notebook baseline: the exported model in plain fp32, NCHW, no autocast."""

    name = "torch-fp32-nchw"

    def __init__(self, model_dir: Path) -> None:
        from cxr.export import load_export

        self.model = load_export(model_dir)[0].eval()

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(self.model(torch.from_numpy(batch)), 1).numpy()


def images_per_s(engine, batch: int, size: int, seconds: float) -> float:
    x = np.random.default_rng(0).standard_normal((batch, 1, size, size), dtype=np.float32)
    engine.predict_proba(x)  # warm-up (oneDNN/ORT pick their kernels on the first call)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        engine.predict_proba(x)
        n += 1
    return n * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32])
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--engines", nargs="+", default=["torch-fp32-nchw", "torch", "torch-bf16", "onnx"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        torch.manual_seed(0)
        save_export(model_dir, build_model(2).eval(), ModelMetadata(
            classes=list(CLASSES["binary"]), preprocess=PreprocessConfig(image_size=args.size),
            model_version="bench-untrained"))
        results: dict[str, dict[int, float]] = {}
        for name in args.engines:
            engine = _EagerFp32Nchw(model_dir) if name == "torch-fp32-nchw" else \
                load_engine(model_dir, name, threads=args.threads)
            label = getattr(engine, "description", name)
            results[label] = {b: images_per_s(engine, b, args.size, args.seconds) for b in args.batches}
            print(f"  {label}: " + ", ".join(f"b{b} {r:.1f}" for b, r in results[label].items()), flush=True)

    base = results[next(iter(results))][max(args.batches)]
    print(f"\nResNet-50 forward only, {args.size} px, img/s (ratio vs the first row at batch {max(args.batches)})\n")
    print("| engine | " + " | ".join(f"batch {b}" for b in args.batches) + " | batch gain |")
    print("|---|" + "---|" * (len(args.batches) + 1))
    for label, row in results.items():
        cells = " | ".join(f"{r:.1f} ({r / base:.2f}x)" for r in row.values())
        print(f"| {label} | {cells} | {row[max(args.batches)] / row[min(args.batches)]:.2f}x |")
    print(json.dumps({"size": args.size, "results": results}))


if __name__ == "__main__":
    main()

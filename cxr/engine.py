"""Inference engines: the same weights, run by PyTorch or ONNX Runtime.

Screening and serving both go through :func:`load_engine`, so they score with
the same engine and give the same probabilities. ``auto`` picks the fastest
engine measured for the hardware (``bench/engine_speed.py``, BENCHMARKS.md):
PyTorch with bf16 autocast and channels_last on GPUs and on CPUs with native
bf16 (1.4x ONNX Runtime at batch 16 on this AVX512-BF16 EPYC, and it gains
from batching where ONNX Runtime does not); ONNX Runtime fp32 on other CPUs
(~2x PyTorch eager fp32 there).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from cxr.errors import CxrError
from cxr.export import ONNX, ModelMetadata, load_export, read_metadata
from cxr.model import cpu_has_fast_bf16


class Engine(Protocol):
    name: str
    meta: ModelMetadata

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        """N x 1 x S x S float32 (output of preprocess) -> N x C class probabilities."""
        ...


class _Softmax(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x).float(), dim=1)


def export_onnx(model: nn.Module, image_size: int, path: str | Path, atol: float = 1e-4) -> None:
    """Export ``softmax(model(x))`` to ONNX with a dynamic batch and check it equals PyTorch."""
    wrapped = _Softmax(model.float().cpu()).eval()
    x = torch.randn(2, 1, image_size, image_size)
    tmp = Path(str(path) + ".tmp")
    torch.onnx.export(
        wrapped, (x,), str(tmp), input_names=["image"], output_names=["probs"],
        dynamic_axes={"image": {0: "batch"}, "probs": {0: "batch"}}, opset_version=17, dynamo=False,
    )
    sess = _ort_session(tmp, threads=0, gpu=False)
    with torch.inference_mode():
        ref = wrapped(x).numpy()
    got = sess.run(None, {"image": x.numpy()})[0]
    if not np.allclose(ref, got, atol=atol):
        tmp.unlink(missing_ok=True)
        raise CxrError(f"ONNX export differs from PyTorch by {np.abs(ref - got).max():.2e} (> {atol})")
    os.replace(tmp, path)


def _ort_session(path: str | Path, threads: int, gpu: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


class OnnxEngine:
    name = "onnx"

    def __init__(self, model_dir: str | Path, threads: int = 0) -> None:
        self.meta = read_metadata(model_dir)
        path = Path(model_dir) / ONNX
        if not path.is_file():  # an export written without ONNX: build it once, beside the weights
            model, _ = load_export(model_dir)
            export_onnx(model, self.meta.preprocess.image_size, path)
        self.session = _ort_session(path, threads, gpu=torch.cuda.is_available())

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": np.ascontiguousarray(batch, dtype=np.float32)})[0]


class TorchEngine:
    """PyTorch, channels_last; bf16 autocast on GPU, and on CPU when asked (``torch-bf16``).

    bf16 is the precision training evaluated in (autocast on GPUs and on CPUs
    with native bf16), so the exported threshold was chosen on bf16 scores; it
    differs from fp32 by ~1e-3 in probability, hence opt-in on CPU.
    """

    def __init__(self, model_dir: str | Path, device: str | None = None, bf16: bool | None = None) -> None:
        model, self.meta = load_export(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.bf16 = self.device.type == "cuda" if bf16 is None else bf16
        self.name = "torch-bf16" if self.bf16 else "torch"
        self.model = _Softmax(model).to(self.device).to(memory_format=torch.channels_last).eval()

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(x).float().cpu().numpy()


def load_engine(model_dir: str | Path, backend: str = "auto", threads: int = 0) -> Engine:
    """The engine screening and serving use (see the module docstring for what ``auto`` picks)."""
    if backend == "auto":
        backend = "torch" if torch.cuda.is_available() else "torch-bf16" if cpu_has_fast_bf16() else "onnx"
    if backend == "onnx":
        return OnnxEngine(model_dir, threads=threads)
    if backend in ("torch", "torch-bf16"):
        if threads:
            torch.set_num_threads(threads)
        return TorchEngine(model_dir, bf16=True if backend == "torch-bf16" else None)
    raise CxrError(f"unknown engine {backend!r} (auto, torch, torch-bf16, onnx)")

"""Inference engines: the same weights, run by PyTorch or ONNX Runtime.

Screening and serving both go through :func:`load_engine`, so they score with
the same engine and give the same probabilities. ``auto`` picks the fastest
engine measured for the hardware (``bench/engine_speed.py``, BENCHMARKS.md):
PyTorch with bf16 autocast and channels_last on GPUs and on CPUs with native
bf16 (1.4x ONNX Runtime at batch 16 on this AVX512-BF16 EPYC, and it gains
from batching where ONNX Runtime does not); ONNX Runtime fp32 on other CPUs
(~2x PyTorch eager fp32 there).

The PyTorch engine runs the export's TorchScript graph. Loading it needs
neither torchvision nor our model code: ~0.2 s instead of ~2 s, most of it
torchvision's import of ``torch._dynamo``, paid by every screening actor and
every new serving replica. ``torch.export`` would be the modern format, but
``torch.export.load`` imports dynamo itself (~4 s here) and its graphs reject
autocast. Without a usable TorchScript file (older exports, a future torch
without ``torch.jit``) the engine builds the model from the weights instead.

The ONNX Runtime engine never imports torch (another ~2 s of CPU per actor):
torch is imported inside the torch paths, and ``cxr.hardware`` probes the
machine without it.
"""

from __future__ import annotations

import io
import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cxr.errors import CxrError
from cxr.export import ONNX, TORCHSCRIPT, ModelMetadata, load_export, read_metadata
from cxr.hardware import cpu_has_fast_bf16, cuda_available

if TYPE_CHECKING:  # torch is imported where a torch path runs: ONNX Runtime processes never load it
    import torch
    from torch import nn


class Engine(Protocol):
    name: str
    meta: ModelMetadata

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        """N x 1 x S x S float32 (output of preprocess) -> N x C class probabilities."""
        ...


def export_onnx(model: nn.Module, image_size: int, path: str | Path, model_id: str, atol: float = 1e-4) -> None:
    """Export ``softmax(model(x))`` to ONNX with a dynamic batch, tagged with ``model_id`` (as the TorchScript
    graph is), and check it equals PyTorch."""
    import onnx
    import torch

    from cxr.model import Probabilities

    wrapped = Probabilities(model.float().cpu()).eval()
    x = torch.randn(2, 1, image_size, image_size)
    tmp = _tmp_beside(path)
    graph = io.BytesIO()  # tagged in memory: the graph is written to disk once
    torch.onnx.export(
        wrapped, (x,), graph, input_names=["image"], output_names=["probs"],
        dynamic_axes={"image": {0: "batch"}, "probs": {0: "batch"}}, opset_version=17, dynamo=False,
    )
    proto = onnx.load_from_string(graph.getvalue())
    onnx.helper.set_model_props(proto, {"model_id": model_id})
    onnx.save(proto, str(tmp))
    sess = _ort_session(tmp, threads=0, gpu=False)
    with torch.inference_mode():
        ref = wrapped(x).numpy()
    got = sess.run(None, {"image": x.numpy()})[0]
    if not np.allclose(ref, got, atol=atol):
        tmp.unlink(missing_ok=True)
        raise CxrError(f"ONNX export differs from PyTorch by {np.abs(ref - got).max():.2e} (> {atol})")
    os.replace(tmp, path)


def export_torchscript(model: nn.Module, image_size: int, path: str | Path, model_id: str) -> None:
    """Trace ``softmax(model(x))`` to TorchScript, tagged with ``model_id``, and check it equals PyTorch.

    Checked at another batch size than the trace's, so the batch dimension is known to be free.
    """
    import torch

    from cxr.model import Probabilities

    wrapped = Probabilities(model.float().cpu()).eval()
    tmp = _tmp_beside(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit: see the module docstring
        traced = torch.jit.trace(wrapped, torch.randn(2, 1, image_size, image_size))
        torch.jit.save(traced, str(tmp), _extra_files={"model_id": model_id})
        x = torch.randn(3, 1, image_size, image_size)
        loaded = _load_torchscript(tmp, model_id, torch.device("cpu"))
        if loaded is None or not torch.allclose(loaded(x), wrapped(x), atol=1e-6):
            tmp.unlink(missing_ok=True)
            raise CxrError("TorchScript export does not reload equal to PyTorch")
    os.replace(tmp, path)


def _load_torchscript(path: str | Path, model_id: str, device: torch.device) -> nn.Module | None:
    """The traced model, or None when the file is missing, unreadable or traced from other weights."""
    import torch

    tag = {"model_id": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device, _extra_files=tag)
    except Exception:  # noqa: BLE001 - missing, truncated, or a torch without TorchScript
        return None
    tag_id = tag["model_id"].decode() if isinstance(tag["model_id"], bytes) else tag["model_id"]
    return module.eval() if tag_id == model_id else None


def _tmp_beside(path: str | Path) -> Path:
    """A temporary name next to ``path``, unique per writer: actors and replicas, on nodes sharing the model
    folder (containers all number their PIDs from 1), may build the same file at once."""
    return Path(f"{path}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


def onnx_model_id(session: Any) -> str:
    """The ``model_id`` an ONNX graph was tagged with at export ('' for graphs exported before tags)."""
    return session.get_modelmeta().custom_metadata_map.get("model_id", "")


def _ort_session(path: str | Path, threads: int, gpu: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    # idle pool threads sleep instead of spinning: decode tasks, the HTTP path and the other actors
    # need those cores between batches (forward-only, 2 threads, no slower: 16.8-18.9 vs 15.7-18.0 img/s)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    elif gpu:  # the plain onnxruntime wheel: it works, on the CPU, which nobody asking for a GPU expects
        logging.getLogger("cxr").warning(
            "onnxruntime %s has no CUDAExecutionProvider: the ONNX engine runs on the CPU, not the GPU "
            "(install onnxruntime-gpu, or use --engine auto, which runs PyTorch on GPUs)", ort.__version__)
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


class OnnxEngine:
    name = "onnx"

    def __init__(self, model_dir: str | Path, threads: int = 0, gpu: bool | None = None) -> None:
        self.meta = read_metadata(model_dir)
        path = Path(model_dir) / ONNX
        gpu = cuda_available() if gpu is None else gpu
        session = _ort_session(path, threads, gpu=gpu) if path.is_file() else None
        if session is None or onnx_model_id(session) not in ("", self.meta.model_id):
            # no graph (an export written without one), or a graph of other weights (an export interrupted
            # between its files): build it from the weights the metadata names, once, beside them
            model, self.meta = load_export(model_dir)
            export_onnx(model, self.meta.preprocess.image_size, path, self.meta.model_id)
            session = _ort_session(path, threads, gpu=gpu)
        self.session = session

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": np.ascontiguousarray(batch, dtype=np.float32)})[0]


class TorchEngine:
    """PyTorch, channels_last; bf16 autocast on GPU, and on CPU when asked (``torch-bf16``).

    bf16 is the precision training evaluated in (autocast on GPUs and on CPUs
    with native bf16), so the exported threshold was chosen on bf16 scores. It
    is not fp32: over 400 held-out images, bf16 probabilities were up to 0.040
    (H200) and 0.020-0.052 (H100s) from fp32 PyTorch on the CPU (fp32 on the GPU, with
    cuDNN's TF32 convolutions, up to 0.0045), no decision changed, and the AUC
    was the same (BENCHMARKS.md, "GPU paths"). Hence opt-in on CPU. On a GPU both
    torch engines run bf16: fp32 there would cost ~1.5x the time for a score
    that still is not the CPU's.
    """

    def __init__(self, model_dir: str | Path, device: str | None = None, bf16: bool | None = None) -> None:
        import torch

        from cxr.model import Probabilities

        self.meta = read_metadata(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.bf16 = self.device.type == "cuda" if bf16 is None else bf16
        self.name = "torch-bf16" if self.bf16 else "torch"
        path = Path(model_dir) / TORCHSCRIPT
        model = _load_torchscript(path, self.meta.model_id, self.device)
        if model is None:  # an export without a (current) TorchScript graph: build it once, beside the weights
            eager, self.meta = load_export(model_dir)
            try:
                export_torchscript(eager, self.meta.preprocess.image_size, path, self.meta.model_id)
            except Exception as exc:  # noqa: BLE001 - read-only volume, no torch.jit: the eager model serves
                logging.getLogger("cxr").warning("no TorchScript cache for %s (%s); using the weights", model_dir, exc)
            model = Probabilities(eager).to(self.device).eval()
        self.model = model.to(memory_format=torch.channels_last)

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        import torch

        from cxr.model import autocast

        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.bf16):
            return self.model(x).float().cpu().numpy()


def resolve_backend(backend: str = "auto", gpu: bool | None = None) -> str:
    """The engine ``auto`` stands for here: torch on a GPU, torch-bf16 on CPUs with native bf16, else onnx."""
    if backend != "auto":
        return backend
    if gpu is None:
        gpu = cuda_available()
    return "torch" if gpu else "torch-bf16" if cpu_has_fast_bf16() else "onnx"


def preferred_batch(backend: str, gpu: bool) -> int:
    """Images per inference call where ``backend`` is fastest (bench/engine_speed.py, BENCHMARKS.md).

    On CPUs bf16 kernels peak at 16 and slow down at 32; ONNX Runtime and fp32 PyTorch keep gaining up
    to 32. On GPUs larger batches amortise the host-to-device copy and kernel launches.
    """
    if gpu:
        return 64
    return 16 if resolve_backend(backend, gpu=False) == "torch-bf16" else 32


def load_engine(model_dir: str | Path, backend: str = "auto", threads: int = 0, gpu: bool | None = None) -> Engine:
    """The engine screening and serving use (see the module docstring for what ``auto`` picks).

    ``gpu``: whether Ray gave this process a GPU; None (scripts, benchmarks): whether torch sees one.
    True with no GPU in sight is an error, not a quiet CPU engine on a GPU node (no NVIDIA device
    plugin, or a driver older than torch's CUDA build needs). False keeps the engine on the CPU even
    where the node's GPUs are visible: since Ray 2.60 an actor given no GPU still sees them all
    (CUDA_VISIBLE_DEVICES is left as it is), and they belong to the actors that reserved them.
    """
    if gpu and not cuda_available():
        import torch

        raise CxrError(f"this worker was given a GPU, but torch {torch.__version__} (CUDA {torch.version.cuda}) "
                       "finds none: check the node's NVIDIA driver (new enough for that CUDA version) and "
                       "device plugin, or run without GPUs")
    if gpu is None:
        gpu = cuda_available()
    backend = resolve_backend(backend, gpu=gpu)
    if backend == "onnx":
        return OnnxEngine(model_dir, threads=threads, gpu=gpu)
    if backend in ("torch", "torch-bf16"):
        if threads:
            import torch

            torch.set_num_threads(threads)
        return TorchEngine(model_dir, device="cuda" if gpu else "cpu", bf16=True if backend == "torch-bf16" else None)
    raise CxrError(f"unknown engine {backend!r} (auto, torch, torch-bf16, onnx)")

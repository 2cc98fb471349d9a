"""The exported model: a directory with weights, ONNX and TorchScript graphs, and metadata.

``save_export`` writes it and ``load_export`` reads it; nothing else touches
the layout. ``model_id`` is the sha256 of the weights file, so screening rows
and serving responses name the exact weights that produced them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr.config import ARCH, PreprocessConfig, from_dict, to_dict
from cxr.errors import CxrError

if TYPE_CHECKING:
    from torch import nn

# torch is imported inside the functions that need it: reading metadata (every
# `cxr screen` driver, `cxr report`) must not pay ~5 s of torch/torchvision import.

WEIGHTS = "weights.pt"
ONNX = "model.onnx"
TORCHSCRIPT = "model.ts"  # softmax(model(x)) traced: loads without torchvision (cxr.engine.TorchEngine)
METADATA = "metadata.json"
FORMAT_VERSION = 1


@dataclass
class ModelMetadata:
    """Everything a consumer needs to use the weights correctly."""

    classes: list[str]
    task: str = "binary"
    arch: str = ARCH
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    threshold: float = 0.5  # on the pneumonia score (p(not normal), cxr.metrics.pneumonia_score)
    target_sensitivity: float | None = None
    model_id: str = ""  # sha256 of WEIGHTS, filled by save_export
    model_version: str = ""  # human label, e.g. the run name
    data_fingerprint: str = ""
    val_metrics: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelMetadata":
        data = dict(data)
        pre = from_dict(PreprocessConfig, data.pop("preprocess", {}) or {})
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(preprocess=pre, **{k: v for k, v in data.items() if k in known})


def versions() -> dict[str, str]:
    """What produced the export: cxr, Python and the libraries whose numbers it depends on (installed
    versions, read from package metadata: nothing more is imported)."""
    from importlib import metadata

    from cxr import __version__

    found = {"cxr": __version__, "python": platform.python_version()}
    for package in ("torch", "torchvision", "numpy", "onnx", "onnxruntime", "pillow", "pydicom", "ray"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_export(directory: str | Path, model: nn.Module, meta: ModelMetadata, graphs: bool = True) -> ModelMetadata:
    """Write weights, metadata, and (``graphs``) the ONNX and TorchScript graphs the engines run, each
    checked against PyTorch; returns the final metadata."""
    import torch

    from cxr.model import build_model

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out / WEIGHTS)
    meta = dataclasses.replace(
        meta,
        model_id=sha256_file(out / WEIGHTS),
        versions=meta.versions or versions(),
        created_at=meta.created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    (out / METADATA).write_text(json.dumps(meta.to_json(), indent=2, sort_keys=True) + "\n")
    if graphs:
        from cxr.engine import export_onnx, export_torchscript

        cpu_model = build_model(len(meta.classes))
        cpu_model.load_state_dict(state)
        export_onnx(cpu_model, meta.preprocess.image_size, out / ONNX, meta.model_id)
        export_torchscript(cpu_model, meta.preprocess.image_size, out / TORCHSCRIPT, meta.model_id)
    return meta


def read_metadata(directory: str | Path) -> ModelMetadata:
    path = Path(directory) / METADATA
    if not path.is_file():
        if not Path(directory).exists():
            raise CxrError(f"model not found: {directory}")
        if (Path(directory) / "model" / METADATA).is_file():  # a run folder: its export is in model/
            raise CxrError(f"{directory} is a training run; its model export is {Path(directory) / 'model'}")
        raise CxrError(f"{directory} is not a cxr model export (no {METADATA}); train one with `cxr train`")
    try:
        return ModelMetadata.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise CxrError(f"{path} is not valid model metadata: {exc}") from None


def load_export(directory: str | Path, verify: bool = True) -> tuple[nn.Module, ModelMetadata]:
    """The one model loader: (eval-mode CPU model, metadata) from an export directory."""
    import torch

    from cxr.model import build_model

    meta = read_metadata(directory)
    weights = Path(directory) / WEIGHTS
    if not weights.is_file():
        raise CxrError(f"{directory}: weights file {WEIGHTS} is missing")
    if verify and sha256_file(weights) != meta.model_id:
        raise CxrError(f"{weights}: sha256 does not match model_id in {METADATA} (file changed or corrupt)")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model = build_model(len(meta.classes))
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001
        raise CxrError(f"{weights}: cannot load weights: {exc}") from None
    return model.eval(), meta


def check_export(model_dir: str, engine: str) -> ModelMetadata:
    """Fail fast, in the driver, with one clear line when the export is unusable for ``engine``.

    `cxr screen` and `cxr serve` call it before any actor or replica starts, so a broken export
    is one line, not a crash in every worker (or a replica crash loop).
    """
    if not model_dir:
        raise CxrError("--model is required (an export directory written by `cxr train`)")
    if not Path(model_dir).is_dir():
        raise CxrError(f"model not found: {model_dir}")
    meta = read_metadata(model_dir)
    if not meta.model_id or not meta.classes or "normal" not in meta.classes:
        raise CxrError(f"{model_dir}: metadata lacks model_id or a 'normal' class; not a usable export")
    onnx, weights = Path(model_dir) / ONNX, Path(model_dir) / WEIGHTS
    needs = [onnx] if engine == "onnx" else [weights] if engine.startswith("torch") else [onnx, weights]
    if not any(p.is_file() and p.stat().st_size > 0 for p in needs):
        raise CxrError(f"{model_dir}: no usable {' or '.join(p.name for p in needs)}")
    if engine == "onnx" or (engine == "auto" and onnx.is_file()):
        _check_onnx_graph(onnx, meta)
    return meta


def _check_onnx_graph(path: Path, meta: ModelMetadata) -> None:
    """Parse the ONNX graph so a corrupt file, or one of other weights or another size than the metadata
    says (an export interrupted between its files, a copy mixing two), fails here in one line, not in
    every actor, and never scores rows under a model_id whose weights did not produce them."""
    if not path.is_file():
        return  # OnnxEngine rebuilds it from the weights
    try:
        import onnx

        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
        graph = proto.graph
    except Exception as exc:  # noqa: BLE001
        raise CxrError(f"unreadable model {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    tag = {p.key: p.value for p in proto.metadata_props}.get("model_id", "")  # '' before graphs were tagged
    if tag and tag != meta.model_id:
        raise CxrError(f"{path} was exported from other weights ({tag[:12]}) than metadata.json's model "
                       f"{meta.model_id[:12]}: the export is stale or mixed up; export the model again")
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] if graph.input else []
    fixed = [d for d in dims[2:] if d > 0]  # N x C x H x W; a dynamic axis has no dim_value
    image_size = meta.preprocess.image_size
    if any(d != image_size for d in fixed):
        raise CxrError(f"{path} takes {'x'.join(map(str, fixed))} px images but metadata.json says "
                       f"image_size {image_size}: the export is stale or mixed up; export the model again")

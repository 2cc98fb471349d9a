"""ResNet-50 for chest X-rays: one builder, one pretrained-weights loader.

The network takes one grayscale channel: ImageNet's RGB ``conv1`` is folded to
one channel by summing over its input channels (as timm's ``adapt_input_conv``
does), which is exact for a gray image replicated to RGB.

torchvision is imported inside the functions that build the network: its
import pulls in ``torch._dynamo`` (~2 s), which inference processes that load
the TorchScript export (cxr.engine) never need.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from cxr.errors import CxrError


def build_model(num_classes: int, pretrained: str = "none") -> nn.Module:
    """ResNet-50 with a 1-channel stem and a ``num_classes`` head.

    ``pretrained``: ``none`` (random init), ``imagenet`` (torchvision's weights
    from its cache, or a download where a network exists) or a path to a local
    state_dict (a torchvision-style ResNet-50 or one of our exports).
    """
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    if pretrained and pretrained != "none":
        load_backbone(model, pretrained_state_dict(pretrained))
    return model


def pretrained_state_dict(source: str) -> dict[str, torch.Tensor]:
    """The state_dict ``--pretrained`` names (``imagenet`` or a file), read once: the training
    driver ships it to the workers, which need neither the file nor a network."""
    if source == "imagenet":
        from torchvision.models import ResNet50_Weights

        weights = ResNet50_Weights.IMAGENET1K_V2
        try:
            return weights.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # noqa: BLE001 - offline: URLError/OSError/socket errors
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            raise CxrError(
                f"ImageNet weights are not cached at {cache} and could not be downloaded ({type(exc).__name__}); "
                "copy the file there, or pass --pretrained PATH (a state_dict) or --pretrained none"
            ) from None
    path = Path(os.path.expanduser(source))
    from cxr.export import WEIGHTS  # here: cxr.export's loaders import this module

    if path.is_dir() and (path / WEIGHTS).is_file():  # an export of ours: fine-tune from its weights
        path = path / WEIGHTS
    if path.is_dir() and (path / "model" / WEIGHTS).is_file():
        raise CxrError(f"--pretrained: {source} is a training run; its exported model is {path / 'model'}")
    if path.name == "state.pt" and path.parent.name.startswith("checkpoint_"):
        raise CxrError(f"--pretrained: {source} is a training checkpoint (model, optimizer and history); give "
                       "its run's exported model/ folder instead")
    if not path.is_file():
        raise CxrError(f"--pretrained: {source!r} is neither 'imagenet', 'none', a weights file nor a cxr model "
                       "export folder")
    with path.open("rb") as f:  # torch.save writes a zip archive (a legacy one, a pickle)
        if not (zipfile.is_zipfile(f) or f.seek(0) == 0 and f.read(1) == b"\x80"):
            raise CxrError(f"--pretrained: {path} is not a PyTorch weights file; give a file written by "
                           "torch.save(model.state_dict())")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - not a torch file, truncated, or pickled objects beyond tensors
        raise CxrError(f"--pretrained: cannot read {path} as a state_dict ({_load_failure(exc)}); "
                       "give a file written by torch.save(model.state_dict())") from None
    # a training script's checkpoint around the weights ("state_dict" as Lightning, "model", "model_state_dict"
    # as the PyTorch tutorials), if it holds only what weights_only=True reads (torchvision's reference
    # scripts also pickle their argparse Namespace: refused above, and never unpickled)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CxrError(f"--pretrained: {path} does not hold a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_failure(exc: Exception) -> str:
    """torch.load's reason in one line. Its weights-only refusal opens with advice to unpickle
    arbitrary code (weights_only=False), which a training job must not take: keep only the cause."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    cause = next((ln for ln in lines if ln.startswith("WeightsUnpickler error:")), None)
    if cause:
        cause = cause.removeprefix("WeightsUnpickler error:").split(". Please")[0].strip()
        return f"torch.load(weights_only=True) refused it: {cause[:200]}"
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a ResNet-50 state_dict into ``model`` except its head.

    RGB ``conv1`` weights are folded to one channel; ``fc`` is kept only when its
    shape matches (fine-tuning a model of ours), else left at its fresh init.
    """
    state = dict(state)
    w = state.get("conv1.weight")
    if w is not None and w.ndim == 4 and w.shape[1] == 3:
        state["conv1.weight"] = w.sum(dim=1, keepdim=True)
    own = model.state_dict()
    for key in ("fc.weight", "fc.bias"):
        if key in state and state[key].shape != own[key].shape:
            del state[key]
    mismatched = [k for k, v in state.items() if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
    if mismatched:  # load_state_dict(strict=False) still raises on these, with a page of torch's text
        k = mismatched[0]
        raise CxrError(f"--pretrained: not a ResNet-50 state_dict ({len(mismatched)} tensors of other shapes, e.g. "
                       f"{k}: {tuple(state[k].shape)} where ResNet-50 has {tuple(own[k].shape)})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise CxrError(
            f"--pretrained: not a ResNet-50 state_dict ({len(missing)} missing keys e.g. {missing[:2]}, "
            f"{len(unexpected)} unexpected e.g. {unexpected[:2]})"
        )
    bad = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.isfinite(v).all()]
    if bad:
        raise CxrError(f"--pretrained: weights contain NaN/Inf (e.g. {bad[0]})")


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze/unfreeze everything but the head (the warm-up phase of fine-tuning)."""
    for name, p in model.named_parameters():
        if not name.startswith("fc."):
            p.requires_grad_(trainable)


class Probabilities(nn.Module):
    """``softmax(model(x))`` in fp32: what the exported graphs (ONNX, TorchScript) and the engines compute."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x).float(), dim=1)


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast, the one mixed-precision context of training, validation and the torch engines
    (used on CUDA, and on CPUs where :func:`cxr.hardware.cpu_has_fast_bf16`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)

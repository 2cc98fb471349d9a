"""Hardware probes that pick the engine and the precision.

Torch-free on purpose: a screening actor or serving replica that runs ONNX
Runtime never imports torch (~2 s of CPU per process on the 2-core machines).
"""

from __future__ import annotations

import os
import sys

#: device nodes a CUDA (or ROCm, or WSL2) GPU driver creates; without any of them torch finds no GPU
_GPU_DRIVER_NODES = ("/dev/nvidiactl", "/proc/driver/nvidia/version", "/dev/kfd", "/dev/dxg")


def cuda_available() -> bool:
    """``torch.cuda.is_available()``, answered without importing torch where no GPU driver is present."""
    if "torch" not in sys.modules and not any(os.path.exists(p) for p in _GPU_DRIVER_NODES):
        return False
    import torch

    return torch.cuda.is_available()


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX): bf16 autocast trains 2-3x faster there
    and infers ~1.5x faster (BENCHMARKS.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags

"""The RayService ``serveConfigV2`` blocks, generated from the same typed config as ``cxr serve``.

``serve.schema.serve_config_document(ServeConfig)`` builds the Serve config for ``cxr serve`` and
``serve/config.yaml``; this script applies the cluster overrides below and writes its output into the
RayService manifests between the ``BEGIN/END serveConfigV2`` markers. tests/test_manifests.py renders the
kustomize overlays and fails when the embedded documents differ from the function's output.

    python deploy/serve_config.py            # rewrite the blocks after changing ServeConfig or the overrides
    python deploy/serve_config.py --check    # exit 1 on drift (what the test checks)

The overrides are the only cluster-specific Serve settings; everything else is ServeConfig's default.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from cxr.config import AutoscalingConfig, ServeConfig  # noqa: E402
from serve.schema import serve_config_document  # noqa: E402

#: every variant: listen on all interfaces inside the pod (the Service routes to it) and load the model
#: promoted on the shared volume (see deploy/base/storage.yaml)
CLUSTER = {"host": "0.0.0.0", "model": "/mnt/cxr/models/current"}
#: CPU replicas (base, cpu overlay): 2 cores each, 1..4 replicas
CPU = {**CLUSTER, "cpus_per_replica": 2.0,
       "autoscaling": {"min_replicas": 1, "max_replicas": 4}}
#: GPU replicas (gpu overlay): one GPU each, larger batches, 1..8 replicas
GPU = {**CLUSTER, "gpus_per_replica": 1.0, "cpus_per_replica": 4.0, "max_batch_size": 32,
       "autoscaling": {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 16.0}}
VARIANTS: dict[str, dict[str, Any]] = {"cpu": CPU, "gpu": GPU}

#: where each variant's block lives
TARGETS = {"cpu": ROOT / "deploy" / "base" / "rayservice.yaml",
           "gpu": ROOT / "deploy" / "overlays" / "gpu" / "rayservice-gpu.yaml"}
BEGIN, END = "# BEGIN serveConfigV2", "# END serveConfigV2"


def serve_config(variant: str) -> ServeConfig:
    """ServeConfig defaults with the variant's overrides (nested ``autoscaling`` merged, not replaced)."""
    overrides = dict(VARIANTS[variant])
    auto = dataclasses.replace(AutoscalingConfig(), **overrides.pop("autoscaling", {}))
    return dataclasses.replace(ServeConfig(), autoscaling=auto, **overrides)


def document(variant: str) -> dict[str, Any]:
    """The Ray Serve config document the RayService of ``variant`` must carry."""
    return serve_config_document(serve_config(variant))


def block(variant: str, text: str) -> str:
    """The marker-delimited block for ``text``: keeps the indent of the BEGIN line and the key in front."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith(BEGIN))
    end = next(i for i, ln in enumerate(lines) if ln.strip().startswith(END))
    indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
    key = lines[start + 1].strip().split("|")[0].rstrip()  # "serveConfigV2:" or "value:"
    body = yaml.safe_dump(document(variant), sort_keys=False, default_flow_style=False)
    new = [lines[start], f"{indent}{key} |", *[f"{indent}  {ln}" if ln else "" for ln in body.splitlines()], lines[end]]
    return "\n".join(lines[:start] + new + lines[end + 1:]) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for variant, path in TARGETS.items():
        text = path.read_text()
        updated = block(variant, text)
        if updated != text:
            stale.append(str(path.relative_to(ROOT)))
            if not check:
                path.write_text(updated)
    if check and stale:
        print(f"serveConfigV2 drifted from ServeConfig in {', '.join(stale)}: run python deploy/serve_config.py",
              file=sys.stderr)
        return 1
    print("\n".join(f"updated {p}" for p in stale) if stale else "serveConfigV2 blocks are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

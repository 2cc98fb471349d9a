"""Ray Data's cost per block on the screening job's input: the listing of N files split into read blocks of
one engine batch each (cxr before 2026-11-26, 16 files a block on CPUs) against
:func:`cxr.screening.files_per_block` (now), in the same Ray instance.

Each dataset is the listing's columns (what ``cxr screen`` hands Ray Data) through one trivial
``map_batches`` task per block and back to the driver: no reading or decoding, so what is left is the
per-block price (object store puts, task scheduling, the streaming executor's bookkeeping), which a real
run pays on top of its work.

    .venv/bin/python bench/read_blocks.py                    # 100,000 files: ~2 min on 2 cores
    .venv/bin/python bench/read_blocks.py --files 300000
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=16, help="the engine's batch (torch-bf16 on CPUs: 16)")
    ap.add_argument("--image-size", type=int, default=224)
    args = ap.parse_args()

    import ray
    import ray.data

    from cxr.screening import files_per_block

    os.environ.setdefault("RAY_ADDRESS", "local")
    temp_dir = tempfile.mkdtemp(prefix="cxr-bench-ray-")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", _temp_dir=temp_dir)
    ray.data.DataContext.get_current().enable_progress_bars = False
    n = args.files
    items = [{"path": f"/archive/site{i % 50}/study{i // 7}/film-{i:09d}.dcm", "fs_path": "", "size": 100_000 + i,
              "mtime_ns": i} for i in range(n)]
    runs = [("one batch a block (before)", args.batch),
            ("files_per_block (now)", files_per_block(n, args.batch, args.image_size))]
    rows = []
    for name, per_block in runs:
        blocks = math.ceil(n / per_block)
        t = time.perf_counter()
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        created = time.perf_counter() - t
        seen = sum(len(b["path"]) for b in ds.map_batches(lambda b: b, batch_size=None, batch_format="numpy")
                   .iter_batches(batch_size=None, batch_format="numpy"))
        assert seen == n, (seen, n)
        rows.append((name, per_block, blocks, created, time.perf_counter() - t))
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)

    base = rows[0][4]
    print(f"\n{n:,} files, {os.cpu_count()} CPUs\n")
    print("| read blocks | files a block | blocks | from_items s | whole pass s | vs before |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, per_block, blocks, created, total in rows:
        print(f"| {name} | {per_block} | {blocks:,} | {created:.1f} | {total:.1f} | {base / total:.1f}x |")


if __name__ == "__main__":
    main()

"""Bounded loopback load test of the cxr Serve app (`make bench`; figures go to BENCHMARKS.md ## Serving).

What it measures, on 127.0.0.1 against the real app (serve.runner.start, as `cxr serve`):
  1. requests/s and p50/p95/p99 latency at concurrency 1, 8, 32, with dynamic batching on
     (max_batch_size 16) and off (max_batch_size 1), one fixed replica (1 reserved CPU, --engine-threads = all cores);
  2. an autoscaling run (min 1, max 2 replicas of 1 CPU): replicas go up under load and back down after.
Every level is bounded by a request count AND a time limit; nothing runs unbounded.

The model is an untrained ResNet-50 export at 224 px (speed does not depend on the
weights); it is written once under runs/bench-serve-model (git-ignored).

    .venv/bin/python bench/serve_load.py                # full run (~5 min on 2 CPU cores)
    .venv/bin/python bench/serve_load.py --quick        # smoke: fewer requests, no autoscaling
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxr.config import AutoscalingConfig, ServeConfig  # noqa: E402
from serve import runner  # noqa: E402


def bench_model(path: Path) -> Path:
    """An untrained 224-px binary export (weights do not change the speed)."""
    from cxr.export import read_metadata

    try:
        read_metadata(path)
        if (path / "model.onnx").is_file():
            return path
    except Exception:  # noqa: BLE001 - absent or partial: (re)write it
        pass
    import torch

    from cxr.config import CLASSES, PreprocessConfig
    from cxr.export import ModelMetadata, save_export
    from cxr.model import build_model

    torch.manual_seed(0)
    save_export(path, build_model(2).eval(), ModelMetadata(classes=list(CLASSES["binary"]),
                                                         preprocess=PreprocessConfig(image_size=224),
                                                         model_version="bench-untrained"))
    return path


def engine_ceiling(model: Path, images: list[bytes], max_seconds: float = 10.0) -> dict:
    """Forward-only img/s of the same engine in-process at batch 1 and 16: the ceiling for req/s.

    Measured in the same run, so the HTTP figures can be read against the load
    the machine had at that moment (it is shared).
    """
    from cxr.engine import load_engine
    from cxr.preprocess import preprocess

    engine = load_engine(model)
    x = np.stack([preprocess(b, engine.meta.preprocess) for b in images[:16]])
    out = {"engine": engine.name}
    for bs in (1, 16):
        engine.predict_proba(x[:bs])  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < max_seconds and n < 64:
            engine.predict_proba(x[:bs])
            n += bs
        out[f"img_per_s_batch{bs}"] = round(n / (time.perf_counter() - t0), 2)
    return out


def load_images(n: int) -> list[bytes]:
    shared = Path(os.environ.get("CXR_SHARED", ROOT.parent / "shared")) / "data" / "chest_xray" / "train"
    paths = sorted((shared / "NORMAL").glob("*.jpeg"))[: n // 2] + sorted((shared / "PNEUMONIA").glob("*.jpeg"))[: n // 2]
    if not paths:
        raise SystemExit(f"no images under {shared} (set CXR_SHARED)")
    return [p.read_bytes() for p in paths]


async def load(url: str, images: list[bytes], concurrency: int, max_requests: int, max_seconds: float) -> dict:
    """`concurrency` closed-loop clients until max_requests are sent or max_seconds pass."""
    import aiohttp

    lat: list[float] = []
    statuses: dict[int, int] = {}
    sent = 0
    deadline = time.perf_counter() + max_seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < max_requests and time.perf_counter() < deadline:
            data = images[sent % len(images)]
            sent += 1
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=data, headers={"Content-Type": "image/jpeg"}) as r:
                    await r.read()
                    status = r.status
            except Exception:  # noqa: BLE001 - a connection failure counts as an error
                status = 599
            lat.append((time.perf_counter() - t0) * 1000.0)
            statuses[status] = statuses.get(status, 0) + 1

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    arr = np.array(lat) if lat else np.array([float("nan")])
    ok = statuses.get(200, 0)
    return {"concurrency": concurrency, "requests": len(lat), "ok": ok, "seconds": round(elapsed, 2),
            "rps": round(ok / elapsed, 2), "p50_ms": round(float(np.percentile(arr, 50)), 1),
            "p95_ms": round(float(np.percentile(arr, 95)), 1), "p99_ms": round(float(np.percentile(arr, 99)), 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "errors_5xx": sum(v for k, v in statuses.items() if k >= 500)}


def run_levels(cfg: ServeConfig, url: str, images: list[bytes], levels: list[int], max_requests: int,
               max_seconds: float) -> list[dict]:
    runner.deploy(cfg)
    asyncio.run(load(url, images, 4, 16, 15.0))  # warm-up (not recorded)
    rows = []
    for c in levels:
        row = asyncio.run(load(url, images, c, max(max_requests, 4 * c), max_seconds))
        row["max_batch_size"] = cfg.max_batch_size
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def autoscaling_run(cfg: ServeConfig, url: str, images: list[bytes], load_seconds: float,
                    settle_seconds: float) -> dict:
    """Load at concurrency 32 while sampling the replica count, then idle until it is back at min."""
    auto = AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=4, upscale_delay_s=2.0,
                             downscale_delay_s=10.0, look_back_period_s=5.0)
    cfg = dataclasses.replace(cfg, autoscaling=auto)
    runner.deploy(cfg)
    timeline: list[tuple[float, str, int, int]] = []  # (t, phase, running, running+starting)
    t0 = time.monotonic()

    def point(phase: str) -> tuple[float, str, int, int]:
        return (round(time.monotonic() - t0, 1), phase, runner.replica_count(cfg.app_name),
                runner.replica_count(cfg.app_name, include_starting=True))

    async def sample(phase: str, until: float) -> None:
        while time.monotonic() < until:
            timeline.append(point(phase))
            await asyncio.sleep(1.0)

    async def loaded() -> dict:
        until = time.monotonic() + load_seconds
        res, _ = await asyncio.gather(load(url, images, 32, 10**6, load_seconds), sample("load", until))
        return res

    result = asyncio.run(loaded())
    load_end = round(time.monotonic() - t0, 1)  # in-flight requests finish after load_seconds
    deadline = time.monotonic() + settle_seconds
    while time.monotonic() < deadline:
        timeline.append(point("idle"))
        peak = max(r for _, _, r, _ in timeline)
        if peak > auto.min_replicas and timeline[-1][2] <= auto.min_replicas:
            break
        time.sleep(1.0)
    decided = next((t for t, _, _, n in timeline if n >= 2), None)
    up = next((t for t, _, r, _ in timeline if r >= 2), None)
    down = next((t for t, p, r, _ in timeline if p == "idle" and up is not None and t > up and r <= 1), None)
    return {"autoscaling": dataclasses.asdict(auto), "load": result,
            "peak_replicas": max(r for _, _, r, _ in timeline), "second_replica_starting_s": decided,
            "second_replica_running_s": up, "back_to_1_s": down, "load_seconds": load_seconds,
            "load_drained_s": load_end, "timeline": timeline}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="requests per level (at least 4x concurrency)")
    ap.add_argument("--seconds", type=float, default=20.0, help="time limit per level")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--autoscale-seconds", type=float, default=45.0)
    ap.add_argument("--settle-seconds", type=float, default=90.0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 40 requests per level, no autoscaling")
    ap.add_argument("--no-autoscale", action="store_true", help="skip the autoscaling run")
    ap.add_argument("--engine-threads", type=int, default=os.cpu_count() or 1,
                    help="engine threads of the fixed replica (`cxr serve --engine-threads`); default: all cores")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-serve.json"))
    args = ap.parse_args()
    if args.quick:
        args.requests, args.seconds = 40, 8.0

    model = bench_model(ROOT / "runs" / "bench-serve-model")
    images = load_images(32)
    os.environ.pop("RAY_ADDRESS", None)
    base = ServeConfig(model=str(model), port=runner.free_port(), metrics_port=runner.free_port(),
                       max_ongoing_requests=64, max_queued_requests=512, cpus_per_replica=1.0,
                       engine_threads=args.engine_threads,
                       autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1))
    results: dict = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                     "model": "resnet50 224px (untrained export)", "images": len(images),
                     "image_bytes_mean": int(np.mean([len(b) for b in images]))}
    t_start = time.monotonic()
    results["load_avg_before"] = os.getloadavg()
    results["engine_ceiling"] = engine_ceiling(model, images)
    print("engine ceiling:", json.dumps(results["engine_ceiling"]), flush=True)
    started = runner.start(dataclasses.replace(base, max_batch_size=16), num_cpus=2, log_to_driver=False)
    url = f"{started.base_url}/v1/predict"
    try:
        results["batching"] = run_levels(dataclasses.replace(base, max_batch_size=16, batch_wait_ms=10.0), url,
                                         images, args.levels, args.requests, args.seconds)
        results["no_batching"] = run_levels(dataclasses.replace(base, max_batch_size=1, batch_wait_ms=0.0), url,
                                            images, args.levels, args.requests, args.seconds)
        if not args.quick and not args.no_autoscale:
            two = dataclasses.replace(base, max_batch_size=16, engine_threads=1)  # 2 replicas x 1 thread on 2 cores
            results["autoscaling_run"] = autoscaling_run(two, url, images, args.autoscale_seconds, args.settle_seconds)
    finally:
        runner.stop(started)
    results["wall_s"] = round(time.monotonic() - t_start, 1)
    results["load_avg_after"] = os.getloadavg()

    by = {(r["max_batch_size"], r["concurrency"]): r for r in results["batching"] + results["no_batching"]}
    top = max(args.levels)
    speedup = by[(16, top)]["rps"] / max(by[(1, top)]["rps"], 1e-9)
    p99_8 = by.get((16, 8), {}).get("p99_ms")
    five = sum(r["errors_5xx"] for r in results["batching"] + results["no_batching"]) + \
        results.get("autoscaling_run", {}).get("load", {}).get("errors_5xx", 0)
    results["goals"] = {f"batching_speedup_at_c{top}": round(speedup, 2), "speedup_ok": speedup >= 1.5,
                        "p99_ms_at_c8": p99_8, "p99_ok": p99_8 is not None and p99_8 < 1000,
                        "errors_5xx": five, "no_5xx": five == 0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("\n| batching | concurrency | req/s | p50 ms | p95 ms | p99 ms | requests | 5xx |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["batching"] + results["no_batching"]:
        print(f"| max_batch_size={r['max_batch_size']} | {r['concurrency']} | {r['rps']} | {r['p50_ms']} | "
              f"{r['p95_ms']} | {r['p99_ms']} | {r['requests']} | {r['errors_5xx']} |")
    if "autoscaling_run" in results:
        a = results["autoscaling_run"]
        print(f"\nautoscaling: peak {a['peak_replicas']} replicas; 2nd replica STARTING at {a['second_replica_starting_s']} s, "
              f"RUNNING at {a['second_replica_running_s']} s, back to 1 at {a['back_to_1_s']} s "
              f"(load sent for {a['load_seconds']} s, drained at {a['load_drained_s']} s); "
              f"load {a['load']['rps']} req/s, p99 {a['load']['p99_ms']} ms, 5xx {a['load']['errors_5xx']}")
    print("goals:", json.dumps(results["goals"]))
    print("engine ceiling (in-process, same run):", json.dumps(results["engine_ceiling"]),
          "load avg before/after:", results["load_avg_before"], results["load_avg_after"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""How busy a command keeps the cores, over time and per process: where a job's wall time goes.

Runs COMMAND in its own session, samples /proc every ``--interval`` seconds, and
prints (1) the cores the command's whole process tree used in each interval
beside how busy the machine was, (2) CPU seconds per process (Ray names its
workers ``ray::Actor``), and (3) the mean cores used per phase, phases split at
``--phases`` seconds. An interval where the job uses one core of two while
nothing else runs is time lost to waiting (start-up latency), not to work.

    RAY_ADDRESS=local .venv/bin/python bench/cpu_timeline.py --phases 2.5,9 -- \\
        .venv/bin/cxr screen /tmp/cxr-bench-screen/archive624 -m /tmp/cxr-bench-screen/model224 \\
        -o /tmp/cxr-tl --no-report -q

(``bench/screen_throughput.py`` leaves that archive and model in its ``--work`` folder.)
Linux only: it reads /proc.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def session_cpu(sid: int) -> dict[int, tuple[float, str]]:
    """CPU seconds (user + system) and command line of every live process in session ``sid``."""
    out: dict[int, tuple[float, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != sid:
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            out[int(entry)] = ((int(fields[11]) + int(fields[12])) / TICK, cmd)
        except (OSError, IndexError, ValueError):  # the process exited while we read it
            continue
    return out


def machine_busy() -> tuple[int, int]:
    """(idle, total) jiffies over all cores since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return values[3] + values[4], sum(values)


def short_name(cmd: str) -> str:
    """``ray::Actor`` for Ray workers, the script for Python processes, else the executable."""
    parts = cmd.split()
    if not parts:
        return "?"
    if parts[0].startswith("ray::"):
        return parts[0]
    exe = Path(parts[0]).name
    if not exe.startswith("python"):
        return exe
    return Path(next((p for p in parts[1:] if not p.startswith("-")), exe)).name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--phases", default="", help="comma-separated times (s) that split the phase summary")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    a = ap.parse_args()
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        ap.error("give the command to run after --")
    cores = os.cpu_count() or 1

    t0 = time.perf_counter()
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    per_proc: dict[int, tuple[float, str]] = {}
    first_seen: dict[int, float] = {}
    samples: list[tuple[float, float, float]] = []  # (t, job cores, machine cores)
    job_prev, t_prev = 0.0, 0.0
    idle_prev, total_prev = machine_busy()
    while proc.poll() is None:
        time.sleep(a.interval)
        now = time.perf_counter() - t0
        for pid, (cpu, cmd) in session_cpu(proc.pid).items():
            first_seen.setdefault(pid, now)
            name = cmd or per_proc.get(pid, (0.0, ""))[1]
            per_proc[pid] = (max(cpu, per_proc.get(pid, (0.0, ""))[0]), name)
        job = sum(cpu for cpu, _ in per_proc.values())  # exited processes keep their last reading
        idle, total = machine_busy()
        machine = cores * (1 - (idle - idle_prev) / max(1, total - total_prev))
        samples.append((now, (job - job_prev) / (now - t_prev), machine))
        job_prev, t_prev, idle_prev, total_prev = job, now, idle, total
    wall = time.perf_counter() - t0

    print(f"{' '.join(command)[:120]}\nexit {proc.returncode}, wall {wall:.1f} s, {cores} cores\n")
    print("| t s | job cores | machine cores |\n|---:|---:|---:|")
    for t, job_cores, machine in samples:
        print(f"| {t:.1f} | {job_cores:.2f} | {machine:.2f} |")
    print("\n| first seen s | CPU s | process |\n|---:|---:|---|")
    for pid in sorted(per_proc, key=lambda p: first_seen[p]):
        cpu, cmd = per_proc[pid]
        print(f"| {first_seen[pid]:.1f} | {cpu:.1f} | {short_name(cmd)} |")
    total_cpu = sum(cpu for cpu, _ in per_proc.values())
    print(f"\nall processes: {total_cpu:.1f} CPU s in {wall:.1f} s = {total_cpu / wall:.2f} of {cores} cores")

    cuts = [0.0] + [float(x) for x in a.phases.split(",") if x.strip()] + [wall]
    print("\n| phase s | job cores (mean) |\n|---|---:|")
    for lo, hi in zip(cuts, cuts[1:]):
        inside = [c for t, c, _ in samples if lo < t <= hi]
        if inside:
            print(f"| {lo:.1f}-{hi:.1f} | {sum(inside) / len(inside):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

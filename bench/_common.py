"""Shared by the benchmarks: the machine, its measured matmul peak, process-tree memory, and the
pure arithmetic (padding, FLOPs, MFU) that turns step records into the reported figures."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Environment every benchmark subprocess gets: no hub, no telemetry, quiet tokenizers.
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TQDM_DISABLE": "1",
    "PYTHONPATH": str(REPO),
}


# ---- the machine ------------------------------------------------------------------------------


def machine_info() -> dict:
    """CPU model, cores, RAM and the versions of the libraries compared."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    versions = {}
    for name in ("torch", "trl", "transformers", "deepspeed", "ray", "accelerate"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram / 2**30, 1),
        "python": platform.python_version(),
        "gpu": None,
        "versions": versions,
    }


def measure_matmul_flops(n: int = 2048, repeats: int = 6) -> float:
    """Best fp32 FLOP/s of an ``n×n @ n×n`` torch.matmul on this machine (all torch threads).

    2n³ FLOPs per product; the best of ``repeats`` timed calls after one warm-up, so the figure is
    what the BLAS reaches when nothing else runs — the denominator of MFU.
    """
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ---- memory of a process tree -----------------------------------------------------------------


@dataclass
class TreeRun:
    """A finished subprocess: exit code, wall time and the peaks of its whole process tree."""

    returncode: int
    wall_s: float
    peak_rss_bytes: int
    """Largest sum of resident set sizes over the tree (shared pages counted once per process)."""
    peak_pss_bytes: int
    """Largest sum of proportional set sizes (shared pages split between sharers): the fairer tree total."""
    peak_single_rss_bytes: int
    """Largest resident set of any one process of the tree."""
    log_tail: str
    peak_breakdown: list
    """(process name, PSS bytes) of each process at the sample with the largest PSS total."""


def run_tree(cmd: list[str], *, env: dict, log_path: Path, interval_s: float = 0.25,
             timeout_s: float = 1800) -> TreeRun:
    """Run ``cmd`` and sample RSS/PSS of it and every descendant (Ray's raylet, GCS and workers
    included) every ``interval_s`` until it exits."""
    import psutil

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO),
                                start_new_session=True)
        peaks = {"rss": 0, "pss": 0, "single": 0, "breakdown": []}
        stop = threading.Event()

        def sample() -> None:
            root = psutil.Process(proc.pid)
            while not stop.is_set():
                rss = pss = single = 0
                breakdown = []
                try:
                    procs = [root, *root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    break
                for p in procs:
                    try:
                        info = p.memory_full_info()
                    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                        continue
                    rss += info.rss
                    pss += getattr(info, "pss", info.rss)
                    breakdown.append((_process_name(p), getattr(info, "pss", info.rss)))
                    single = max(single, info.rss)
                if pss > peaks["pss"]:
                    peaks["pss"], peaks["breakdown"] = pss, sorted(breakdown, key=lambda b: -b[1])
                peaks["rss"] = max(peaks["rss"], rss)
                peaks["single"] = max(peaks["single"], single)
                stop.wait(interval_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            returncode = proc.wait()
        finally:
            stop.set()
            sampler.join()
        _kill_tree(proc.pid)  # stragglers (a Ray process that outlived its driver) of this run only
        wall = time.perf_counter() - start
    tail = log_path.read_text(errors="replace")[-4000:]
    return TreeRun(returncode, wall, peaks["rss"], peaks["pss"], peaks["single"], tail, peaks["breakdown"])


def _process_name(p) -> str:
    """A short name: Ray sets worker titles such as 'ray::RayTrainWorker'; else the executable and script."""
    try:
        cmd = p.cmdline()
    except Exception:  # noqa: BLE001 - a process may vanish between listing and reading
        return "?"
    if not cmd:
        return p.name()
    if cmd[0].startswith("ray::") or len(cmd) == 1:
        return cmd[0].split()[0][:40]
    script = next((Path(c).name for c in cmd[1:] if c.endswith(".py")), Path(cmd[0]).name)
    return script[:40]


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def self_command(script: Path, *args: str) -> list[str]:
    return [sys.executable, str(script), *args]


# ---- pure arithmetic --------------------------------------------------------------------------


def padding_fraction(batch_lengths: list[list[int]]) -> float:
    """Share of padded positions when each batch pads its rows to its own longest row.

    ``batch_lengths[i]`` are the real-token lengths of batch ``i``'s rows (chosen and rejected).
    """
    padded = total = 0
    for lengths in batch_lengths:
        width = max(lengths)
        total += width * len(lengths)
        padded += sum(width - n for n in lengths)
    return padded / total if total else 0.0


def dpo_step_flops(*, body_params: int, head_params: int, real_tokens: int, completion_tokens: int,
                   live_reference: bool) -> float:
    """Useful FLOPs of one DPO step: forward+backward of the policy (6 per parameter per token) and,
    with a live reference, its forward (2 per parameter per token).

    The decoder body (every matmul weight except the LM head; the embedding is a lookup) runs on
    every real token; the LM head is only needed at completion positions, which is all either
    trainer projects. Attention-score FLOPs (O(seq²)) are left out: under 3% at these lengths.
    """
    per_param = 6 + (2 if live_reference else 0)
    return per_param * (body_params * real_tokens + head_params * completion_tokens)


def mfu(flops_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved useful FLOP/s over the measured peak."""
    return flops_per_s / peak_flops_per_s if peak_flops_per_s > 0 else float("nan")


def step_durations(end_times: list[float], warmup: int) -> list[float]:
    """Durations of the steps after ``warmup``, from the wall-clock times at which each step ended.

    ``end_times[i]`` is when step ``i + 1`` ended; step ``k``'s duration is ``end[k] - end[k-1]``, so
    the first measured step needs ``warmup >= 1``.
    """
    if warmup < 1:
        raise ValueError("warmup must be >= 1: the first step's start is not recorded")
    return [b - a for a, b in zip(end_times[warmup - 1 : -1], end_times[warmup:])]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2

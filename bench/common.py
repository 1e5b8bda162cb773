"""Shared benchmark plumbing: machine description, commit, result files, memory bandwidth."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def write_result(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "commit": commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def read_bandwidth_probes(mbytes: int = 1024, repeats: int = 7) -> dict[str, float]:
    """Best sustained read bandwidth (GB/s) over a buffer larger than the last-level cache (1 GiB;
    the 2-core Xeon of 2026-12-08 reports 480 MiB of L3), by two readers: a reduction (``sum``)
    and a one-row matrix-vector product over the same bytes seen as a square matrix, both
    orientations (``sgemv``). There MKL's sgemv read ~34 GB/s where the reduction read ~27: the
    reduction alone made a decode that is nothing but sgemv over its weights look faster than
    its own roofline."""
    x = torch.ones(mbytes * (1 << 20) // 4, dtype=torch.float32)
    side = int(x.numel() ** 0.5)
    m = x[:side * side].view(side, side)
    v = torch.ones(1, side)

    def best(f, nbytes):
        f()
        t_min = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            f()
            t_min = min(t_min, time.perf_counter() - t)
        return nbytes / t_min / 1e9

    with torch.inference_mode():
        return {"sum": best(x.sum, x.numel() * 4),
                "sgemv": max(best(lambda: v @ m, m.numel() * 4), best(lambda: m @ v[0], m.numel() * 4))}


def median(xs):
    s = sorted(xs)
    return s[len(s) // 2]

"""The machine the figures were taken on: CPU, cores, memory, load, library versions, memory bandwidth.

numpy and the standard library only (``psutil`` when present). Nothing here imports torch,
onnxruntime or llama_cpp: versions are read from package metadata.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

# Packages whose versions go beside every figure (read from metadata, never imported).
VERSION_PACKAGES = ("edgeft", "numpy", "torch", "transformers", "peft", "bitsandbytes", "onnxruntime", "onnx",
                    "llama-cpp-python", "gguf", "tokenizers")

BANDWIDTH_BUFFER_BYTES = 256 * 2**20  # far beyond any L3 cache, so the sum streams from DRAM
BANDWIDTH_REPEATS = 5  # best of N: bandwidth is a ceiling, and other processes only lower it


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    """Physical cores (llama-bench's default thread count); logical CPUs when unknown."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except ImportError:
        pass
    return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: a busy machine shows here, beside the timings it spoiled."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, memory, OS and load average."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_average": load_average(),
    }
    try:
        import psutil

        info["memory_bytes"] = int(psutil.virtual_memory().total)
    except ImportError:
        pass
    return info


def measure_bandwidth(threads: int, *, buffer_bytes: int = BANDWIDTH_BUFFER_BYTES,
                      repeats: int = BANDWIDTH_REPEATS) -> dict[str, Any]:
    """Memory read bandwidth in GB/s (1e9 bytes/s): a large float32 array summed in ``threads`` slices.

    Decoding reads the weights once per token, so a streaming read is the relevant ceiling.
    numpy releases the GIL in reductions, so the slices run in parallel. The best of
    ``repeats`` runs is kept, at 1 thread and at ``threads``; the copy figure (read + write
    bytes) is reported beside it for comparison with STREAM-style numbers.
    """
    a = np.ones(buffer_bytes // 4, np.float32)
    b = np.empty_like(a)

    def best(fn, n: int) -> float:
        with ThreadPoolExecutor(max_workers=n) as pool:
            fastest = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(pool.map(fn, range(n)))
                fastest = min(fastest, time.perf_counter() - t0)
        return fastest

    results: dict[str, Any] = {"buffer_bytes": a.nbytes, "repeats": repeats}
    read, copy = {}, {}
    for n in sorted({1, max(1, threads)}):
        src, dst = np.array_split(a, n), np.array_split(b, n)
        read[n] = a.nbytes / best(lambda i: float(np.add.reduce(src[i])), n) / 1e9
        copy[n] = 2 * a.nbytes / best(lambda i: np.copyto(dst[i], src[i]), n) / 1e9
    results["read_gbps_by_threads"] = {str(k): round(v, 2) for k, v in read.items()}
    results["copy_gbps_by_threads"] = {str(k): round(v, 2) for k, v in copy.items()}
    results["read_gbps"] = round(max(read.values()), 2)
    results["copy_gbps"] = round(max(copy.values()), 2)
    return results

"""What machine a measurement came from, for benchmark records (torch-free)."""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import resource
import shutil
import subprocess
import sys
from pathlib import Path



def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name (``nvidia-smi``, else a Jetson's device-tree model), or None."""
    # Asked of the driver's tools, not of CUDA: creating a CUDA context here would cost GPU memory.
    if shutil.which("nvidia-smi"):
        try:
            done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=10)
            out = done.stdout.strip() if done.returncode == 0 else ""  # else its stdout is an error message
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            return out.splitlines()[0].strip()
    try:
        model = Path("/proc/device-tree/model").read_text().strip("\x00\n ")
    except OSError:
        return None
    return model if "jetson" in model.lower() else None


def machine_info() -> dict:
    """CPU model, core count, OS, GPU (None without one) and library versions, as recorded next to every
    benchmark result.

    Versions come from package metadata, so recording torch's version never imports torch.
    """
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(), "gpu": gpu_name(),
            "versions": library_versions("tensorrt", "pycuda")}


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (MiB), since it started or since :func:`reset_peak_rss`.

    Linux's VmHWM first: ``ru_maxrss`` survives exec, so a process started by a big parent (a test
    runner holding torch) would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def current_rss_mb() -> float:
    """This process's resident memory now, MB (MiB); the peak where the OS does not say (not Linux)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_mb()
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def release_freed_memory() -> None:
    """Give the heap's freed pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    glibc keeps freed small blocks for reuse, so the resident memory of a process that built and
    dropped big temporaries (an ONNX Runtime session's graph optimisation leaves some) stays
    high until it is trimmed.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the peak that :func:`peak_rss_mb` reads to the current RSS; False where the OS cannot.

    Linux (4.0+) resets VmHWM when "5" is written to /proc/self/clear_refs; then the peak covers only
    what ran since, e.g. one benchmark row instead of the whole process.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def library_versions(*extra: str) -> dict[str, str]:
    """Versions of the libraries that shape a run's numbers (plus ``extra`` distributions), when installed."""
    versions = {"python": platform.python_version()}
    for dist in ("pah-edge", "torch", "torchvision", "numpy", "onnx", "onnxruntime", *extra):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions

"""What machine a measurement came from, for benchmark records (torch-free)."""

from __future__ import annotations

import os
import platform
import resource
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


def machine_info() -> dict:
    """CPU model, core count and OS, as recorded next to every benchmark result."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()}


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (MiB).

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

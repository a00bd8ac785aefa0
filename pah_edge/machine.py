"""What machine a measurement came from, for benchmark records (torch-free)."""

from __future__ import annotations

import os
import platform
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

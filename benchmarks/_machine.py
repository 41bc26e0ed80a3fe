"""The machine line every benchmark prints: CPU model, cores, date (UTC), Python."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone


def cpu_and_date() -> str:
    """e.g. ``AMD EPYC, 2 cores; 2026-11-21 18:59 UTC; Python 3.11.7``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; Python {platform.python_version()}"

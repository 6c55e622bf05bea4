"""The CPU a benchmark ran on, for its results file: ratios differ between CPU models (the same
read_dicom code measures 1.06× pydicom on an Intel Xeon VM and 0.81× on an AMD EPYC VM)."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo where there is one, else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} CPU, Python {platform.python_version()}"

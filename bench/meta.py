"""Provenance stamped into every bench JSON: device, commit, date, command line."""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys

import torch


def run_meta() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {platform.processor() or platform.machine()}"
    return {
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        "commit": commit + ("+dirty" if dirty else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }

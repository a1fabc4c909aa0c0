"""Provenance stamped into every bench JSON: device, commit, date, command line."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

import torch


def run_meta() -> dict:
    commit = os.environ.get("DECDEC_COMMIT")  # the device machine's copy of the tree has no usable .git
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True).stdout.strip()
            commit += "+dirty" if dirty else ""
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {platform.processor() or platform.machine()}"
    return {
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }

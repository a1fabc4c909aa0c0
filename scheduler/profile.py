"""The device profile: what `decdec tune` measured on one GPU, saved as JSON for `runtime.compile`.

It holds the measured latency model (`MeasuredModel`: per linear shape and bits, the base GEMV alone
and base + correction over the measured k_chunk x n_tb grid) and, for the record, the bandwidths
that bound it (HBM read, zero-copy read of mapped host memory). Plain JSON, never
pickle; pure Python (the measuring is `ops/timing.py`'s, on the GPU).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from decdec.config import cache_root
from decdec.errors import ConfigError
from decdec.scheduler.latency import MeasuredModel

FORMAT = 2  # bumped when the JSON layout or what its times measure changes (2: pairs timed with programmatic
# edges, as in the engine's step); an older file is refused with a clear error


@dataclass
class MeasuredProfile:
    device: str  # torch.cuda.get_device_name() of the GPU measured
    n_sm: int
    hbm_read_GBps: float
    zero_copy_GBps: float  # zero-copy read of 128 MiB of mapped host memory by one kernel
    model: MeasuredModel
    k_chunks: list[int]  # the grids asked for (n_tb per shape: the counts the correction really launches)
    n_tbs: list[int]
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    format: int = FORMAT

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")  # never a half-written profile under the real name
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "MeasuredProfile":
        """The profile at `path`; ConfigError naming the path when it is unreadable or of another format
        (`runtime.tune.load_profile` says how to make a missing one)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise _invalid(path, e) from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise ConfigError(f"device profile '{path}' has format {found!r}, this version reads {FORMAT}: "
                              "measure it again with `decdec tune`")
        try:
            return cls(**{**data, "model": MeasuredModel(**data["model"])})
        except (TypeError, KeyError) as e:
            raise _invalid(path, e) from e

    def check_device(self, device: str, where: str | Path) -> None:
        """ConfigError when this profile was measured on another GPU than `device`."""
        if self.device != device:
            raise ConfigError(f"device profile '{where}' was measured on '{self.device}', but this GPU is "
                              f"'{device}': run `decdec tune CFG` on this GPU (or point "
                              "'decdec.device_profile' at its profile)")


def _invalid(path: Path, e: Exception) -> ConfigError:
    return ConfigError(f"device profile '{path}' is not a valid profile ({type(e).__name__}: {e}): "
                       "measure it again with `decdec tune`")


def slug(name: str) -> str:
    """A file name for a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def default_path(device: str) -> Path:
    """Where `decdec tune` saves, and `runtime.compile` looks for, the profile of `device`: in the same
    per-user cache as the artifacts (`decdec.config.cache_root`)."""
    return cache_root() / "device-profiles" / f"{slug(device)}.json"

"""The tuner's GPU side: `decdec tune` measures this GPU on a model's linear shapes into a device
profile (`scheduler/profile.py`); `runtime.compile` finds that profile again and times the base
decode step, the two inputs `scheduler.tuner.tune_groups` needs besides the target.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from decdec.config import Config
from decdec.errors import ConfigError, DeviceError
from decdec.scheduler.latency import MeasuredModel
from decdec.scheduler.profile import MeasuredProfile, default_path
from decdec.scheduler.tuner import frontier

# The tuner picks only within what was measured (MeasuredModel never extrapolates), so the k_chunk grid
# bounds its choices: a k_chunk of a few dozen already costs a large share of a layer's GEMV on a
# datacenter GPU, so 64 is past any target of a few %; the grid is dense below 16, where such targets land.
K_CHUNKS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
N_TBS = (2, 4, 8, 16, 32)
REPS = 20
K_CHUNKS_QUICK = (1, 4, 16, 64)
N_TBS_QUICK = (4, 16)
REPS_QUICK = 10
STEP_REPLAYS = 20  # replays of the base step whose median is the tuner's step_us
# The tuner times steps at this decode position (clipped to max_seq - 1): past the first tokens, where the
# attention reads 256 keys as in bench/engine.py's first position; at position 0 the step is shorter and
# every compensation looks dearer than a user sees it.
TUNE_POSITION = 255
PAIR_TURNS, PAIR_BLOCK = 4, 5  # a paired measurement: turns of PAIR_BLOCK replays of each step


def require_gpu(what: str) -> None:
    """One DeviceError, before anything slow, when there is no GPU for `what` (which asks for one)."""
    if not torch.cuda.is_available():
        raise DeviceError(f"{what}, but no CUDA device is available here")
    from decdec.ops.base_gemv import SIMULATED

    if SIMULATED:
        raise DeviceError(f"{what}, but Numba's CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1)")


def profile_path(cfg: Config, device: str) -> Path:
    """'decdec.device_profile' where set, else the default path of this GPU's profile."""
    return Path(cfg.decdec.device_profile) if cfg.decdec.device_profile else default_path(device)


def load_profile(cfg: Config, device: str, cfg_name: str) -> tuple[MeasuredProfile, Path]:
    """The device profile `compile` tunes with, and its path; ConfigError when it is missing, unreadable
    or measured on another GPU."""
    path = profile_path(cfg, device)
    if not path.is_file():
        raise ConfigError(f"config field 'decdec.target_slowdown' needs the device profile of this GPU ({device}), "
                          f"and '{path}' was not found: run `decdec tune {cfg_name}` first "
                          "(or set 'decdec.device_profile' to a profile's path)")
    profile = MeasuredProfile.load(path)
    profile.check_device(device, path)
    return profile, path


def measure_profile(shapes: dict, quick: bool = False, progress: bool = True) -> MeasuredProfile:
    """This GPU's profile over the distinct (out, in, bits) of `shapes` ((kind, bits) -> (out, in, bits,
    count), `models.graph.group_shapes`): bandwidths, then base and pair times over the grids."""
    from decdec.ops import timing

    ks, tbs, reps = (K_CHUNKS_QUICK, N_TBS_QUICK, REPS_QUICK) if quick else (K_CHUNKS, N_TBS, REPS)
    info = timing.device_info()
    bw = timing.bandwidth(reps)
    streams = timing.Streams.make()
    rows = []
    for out, inp, bits in tqdm(sorted({s[:3] for s in shapes.values()}), desc="measuring shapes",
                               disable=not progress):
        rows += timing.measure_shape(out, inp, bits, ks, tbs, reps, streams=streams)
    return MeasuredProfile(info["device"], info["n_sm"], bw["hbm_read_GBps"], bw["zero_copy_read_128MiB_GBps"],
                           MeasuredModel.from_rows(info["device"], rows), list(ks), list(tbs))


def measure_step_us(executor, position: int = 0) -> float:
    """Median µs of one replay of a captured `CUDAExecutor` step at `position` (CUDA events on its stream)."""
    from decdec.ops.timing import event_us

    with torch.cuda.stream(executor.stream):
        return event_us(lambda: executor.replay_only(position), STEP_REPLAYS, warmup=3)


def measure_pair_us(base, executor, position: int) -> tuple[float, float]:
    """Median µs of a replay of `base` and of `executor` at `position`, timed in turns of PAIR_BLOCK
    replays each: the two steps then see the same clocks and the same state of the host's page tables
    (a fetch-heavy step's time moves by a few % of itself between measurements minutes apart)."""
    from decdec.ops.timing import event_times

    times: tuple[list, list] = ([], [])
    for _ in range(PAIR_TURNS):
        for ex, out in zip((base, executor), times):
            with torch.cuda.stream(ex.stream):
                out += event_times(lambda: ex.replay_only(position), PAIR_BLOCK)
    return statistics.median(times[0]), statistics.median(times[1])


def format_profile(profile: MeasuredProfile, shapes: dict) -> str:
    """Per group shape: base µs and its frontier at the measured k_chunk (k_chunk/n_tb slowdown)."""
    lines = [f"{profile.device}: {profile.n_sm} SMs, HBM read {profile.hbm_read_GBps:.0f} GB/s, "
             f"zero-copy read {profile.zero_copy_GBps:.1f} GB/s",
             f"{'group':<8} {'bits':>4} {'out x in':>11} {'count':>5} {'base µs':>8}  "
             "frontier (k_chunk/n_tb slowdown)"]
    for (kind, bits), (out, inp, b, count) in sorted(shapes.items()):
        points = [c for c in frontier(profile.model, out, inp, b) if c.k_chunk in profile.k_chunks]
        lines.append(f"{kind:<8} {bits:>4} {f'{out}x{inp}':>11} {count:>5} {profile.model.base_us(out, inp, b):>8.1f}  "
                     + "  ".join(f"{c.k_chunk}/{c.n_tb} {c.slowdown:+.0%}" for c in points))
    return "\n".join(lines)

"""Constants every layer shares, and the arithmetic of selection chunks (pure Python).

The why of each number sits beside it; the config validates user values against these.
"""

from __future__ import annotations

from decdec.errors import ConfigError

CHUNK_SIZE = 1024  # channels per selection chunk: the paper's unit (one thread block scans one)
N_BUCKETS = 32  # approximate top-k: 16 buckets between the two thresholds, 16 below the lower one
PASS_CHUNKS = 4  # chunks one 512-thread correction block selects in one pass (128 threads a chunk)
GROUP_SIZE = 128  # quantization group: one scale + zero point per 128 inputs (the AWQ / GPTQ standard)
LINEAR_KINDS = ("qkv", "o", "gate_up", "down")  # the linear groups of one layer, in forward order
SELECTION_MODES = ("bucket", "exact", "static", "none")  # how the channels to compensate are chosen


def chunk_ks(width: int, k_chunk: int, chunk_size: int = CHUNK_SIZE) -> list[int]:
    """Channels taken from each chunk: k_chunk per full chunk, floor-scaled for a partial last one."""
    if not 0 <= k_chunk <= chunk_size:
        raise ConfigError(f"k_chunk = {k_chunk} is out of range: allowed 0 .. {chunk_size} (the chunk size)")
    return [k_chunk * min(chunk_size, width - s) // chunk_size for s in range(0, width, chunk_size)]


def n_selected(width: int, k_chunk: int, chunk_size: int = CHUNK_SIZE) -> int:
    """Channels selected over a whole input vector of `width`."""
    return sum(chunk_ks(width, k_chunk, chunk_size))

"""The fused add + RMSNorm kernel's time by block size at Llama-3-8B's and Gemma 3 270M's widths.

    python bench/norm_threads.py        (GPU; µs per launch: the kernel's own duration from CUPTI)
"""

import sys
from pathlib import Path

import torch
from numba import cuda

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decdec.args import ModelArgs  # noqa: E402
from bench.step_profile import kernel_times  # noqa: E402
from decdec.ops import norm  # noqa: E402


def time_norm(dim: int, threads: int, post: bool, n: int = 200) -> float:
    args = ModelArgs("gemma3" if post else "llama", vocab_size=8, dim=dim, n_layers=1, n_heads=1, n_kv_heads=1,
                     head_dim=128, ffn_dim=8, norm_eps=1e-6, rope_base=1e4)
    t = lambda *s, dt=torch.float32: torch.randn(*s, device="cuda").to(dt)  # noqa: E731
    x, w, pw, b, h = t(dim), t(dim), t(dim), t(dim, dt=torch.float16), t(dim, dt=torch.float16)
    v = [cuda.as_cuda_array(a) for a in (w, x, h, b, x, pw)]
    norm.MAX_THREADS, norm.PAIRS_PER_THREAD = threads, 1  # blocks of min(threads, dim / 2)
    op = norm.AddRmsNorm(args, v[0], v[1], v[2], branch=v[3], x_out=v[4], post_weight=v[5] if post else None)
    times = kernel_times(lambda: [op() for _ in range(n)], 1)
    return sum(t for _, t in times.values()) / n



if __name__ == "__main__":
    for dim, post in ((4096, False), (640, True), (576, False)):
        print(dim, "post" if post else "", {th: round(time_norm(dim, th, post), 2) for th in (128, 256, 512, 1024)})

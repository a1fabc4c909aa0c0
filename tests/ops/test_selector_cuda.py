"""GPU selector (`ops.selector_cuda.select_chunks`, launched stand-alone by bench/op_kernels.py): the same
indices, in the same order, as the CPU reference `ops.selector.select_bucket`.

Simulator on tiny inputs by default; DECDEC_GPU_TESTS=1 runs everything on the GPU, plus real widths.
"""

from tests.ops.cudasim import GPU_RUN, ON_GPU, SIMULATED, cuda, gpu, kernels  # noqa: F401 - first: the simulator

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from numba import cuda, float32  # noqa: E402

from bench.op_kernels import select_bucket_cuda  # noqa: E402 - `select_chunks` in a stand-alone kernel
from decdec.constants import n_selected  # noqa: E402
from decdec.ops import selector  # noqa: E402
from decdec.ops.selector_cuda import bucket_of  # noqa: E402



def profile(rng, width: int) -> np.ndarray:
    """Calibrated thresholds as models/calibrate.py makes them: t[r] = max over samples of the r-th |x|."""
    calib = rng.standard_t(df=3, size=(16, width)).astype(np.float32)
    return np.sort(np.abs(calib), axis=-1)[:, ::-1].max(axis=0).astype(np.float32)


def hard_inputs(rng, rows: int, width: int, dtype=np.float32) -> np.ndarray:
    """Heavy-tailed activations with NaN, +-inf and exact ties between channels."""
    x = rng.standard_t(df=3, size=(rows, width)).astype(np.float32)
    x[0, rng.integers(0, width, 5)] = np.nan
    x[-1, rng.integers(0, width, 3)] = np.inf
    x[-1, rng.integers(0, width, 3)] = -np.inf
    x[:, : width // 4] = x[:, width // 4: 2 * (width // 4)]  # ties: equal |x| at different indices
    return x.astype(dtype)


def run(x: np.ndarray, k_chunk: int, bounds, act_scale=None):
    n = n_selected(x.shape[-1], k_chunk)
    out = cuda.to_device(np.full((x.shape[0], n), -1, np.int32))  # poison: -1 is no channel
    out_x = cuda.to_device(np.full((x.shape[0], n), np.nan, np.float32))
    scale = None if act_scale is None else cuda.to_device(act_scale)
    select_bucket_cuda(cuda.to_device(x), k_chunk, bounds, out=out, out_x=out_x, act_scale=scale)
    return out.copy_to_host(), out_x.copy_to_host()


@kernels
@pytest.mark.parametrize("width, k_chunk", [
    (576, 37), (640, 1024), (640, 0), (1536, 64), (1536, 1), (2112, 100),  # 2112: a 64-wide last chunk
    (3072, 1),  # k_chunk 1: the atomic-min path, three chunks
])
def test_kernel_matches_reference(width, k_chunk):
    rng = np.random.default_rng(width * 1031 + k_chunk)
    x = hard_inputs(rng, 2, width)
    bounds = selector.bucket_bounds(profile(rng, width), k_chunk)
    want = selector.select_bucket(torch.from_numpy(x), k_chunk, bounds).numpy()
    got, got_x = run(x, k_chunk, bounds)
    assert got.shape == want.shape
    assert (got == want).all()  # same set and same (bucket, index) order
    np.testing.assert_array_equal(got_x, np.take_along_axis(x, got.astype(np.int64), axis=-1))


@kernels
@pytest.mark.parametrize("chunk_size", [256, 96])  # runs of 2 and 1 channels a thread (1024: above)
def test_kernel_matches_reference_at_k_chunk_1_on_short_chunks(chunk_size):
    rng = np.random.default_rng(chunk_size)
    width = 5 * chunk_size + chunk_size // 2  # a half-full last chunk: k_last 0, no pick there
    x = hard_inputs(rng, 2, width)
    bounds = selector.bucket_bounds(profile(rng, width), 1, chunk_size)  # every bucket in use
    want = selector.select_bucket(torch.from_numpy(x), 1, bounds, chunk_size).numpy()
    out = cuda.to_device(np.full(want.shape, -1, np.int32))  # poison: -1 is no channel
    out_x = cuda.to_device(np.full(want.shape, np.nan, np.float32))
    select_bucket_cuda(cuda.to_device(x), 1, bounds, chunk_size, out=out, out_x=out_x)
    got = out.copy_to_host()
    assert want.shape == (2, 5) and (got == want).all()
    np.testing.assert_array_equal(out_x.copy_to_host(), np.take_along_axis(x, got.astype(np.int64), axis=-1))


@kernels
def test_kernel_selects_on_scaled_fp16_input():
    rng = np.random.default_rng(5)
    width, k_chunk = 640, 48
    x = hard_inputs(rng, 1, width, np.float16)
    act = (rng.random(width) + 0.5).astype(np.float32)
    xs = torch.from_numpy(x.astype(np.float32)) * torch.from_numpy(act)  # what the GEMV sees, in float32
    bounds = selector.bucket_bounds(profile(rng, width), k_chunk)
    want = selector.select_bucket(xs, k_chunk, bounds).numpy()
    got, got_x = run(x, k_chunk, bounds, act_scale=act)
    assert (got == want).all()
    np.testing.assert_array_equal(got_x, np.take_along_axis(xs.numpy(), got.astype(np.int64), axis=-1))


@cuda.jit
def _buckets_kernel(v, a, b, hi_scale, lo_scale, out):
    i = cuda.grid(1)
    if i < v.shape[0]:
        out[i] = bucket_of(abs(float32(v[i])), a, b, hi_scale, lo_scale)


@kernels
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf * 0 in the simulator's NumPy
@pytest.mark.parametrize("a, b", [(3.0, 0.5), (2.0, 2.0), (np.inf, 1.0), (4.0, 0.0), (np.inf, np.inf)])
def test_bucket_of_edges(a, b):
    """Thresholds themselves, their float neighbours, 0, subnormals, NaN, inf, degenerate bounds."""
    a, b = np.float32(a), np.float32(b)
    with np.errstate(all="ignore"):
        bounds = selector.BucketBounds(a, b, np.float32(15) / np.float32(a - b), np.float32(16) / b)
    finite = [s for s in (a, b) if np.isfinite(s)]
    v = np.array([0.0, 1e-45, 1e-38, 0.25, 1.0, 7.5, 1e30, np.inf, -np.inf, np.nan]
                 + [np.nextafter(s, d) for s in finite for d in (0, np.inf)] + finite, np.float32)
    out = cuda.to_device(np.full(v.shape, -1, np.int32))
    _buckets_kernel[1, 64](cuda.to_device(v), bounds.a, bounds.b, bounds.hi_scale, bounds.lo_scale, out)
    want = selector.bucket_ids(torch.from_numpy(v), bounds).numpy()
    assert (out.copy_to_host() == want).all()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("width", [4096, 14336])
@pytest.mark.parametrize("k_chunk", [0, 1, 8, 64, 1024])
def test_kernel_matches_reference_on_gpu(width, k_chunk):
    rng = np.random.default_rng(width + k_chunk)
    x = hard_inputs(rng, 16, width, np.float16)
    bounds = selector.bucket_bounds(profile(rng, width), k_chunk)
    want = selector.select_bucket(torch.from_numpy(x.astype(np.float32)), k_chunk, bounds).numpy()
    got, _ = run(x, k_chunk, bounds)
    assert (got == want).all()

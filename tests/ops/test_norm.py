"""Fused residual add + RMSNorm: the kernel against its CPU reference, with and without a branch and a
Gemma post-norm; tiny widths in the simulator, real ones (`gpu`) on the device."""

from tests.ops.cudasim import cuda, gpu, kernels  # noqa: F401 - first: the simulator

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from decdec.models.arch import ModelArgs  # noqa: E402
from decdec.ops.norm import AddRmsNorm, add_rms_norm_reference  # noqa: E402


def norm_args(family: str) -> ModelArgs:
    return ModelArgs(family, vocab_size=8, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, ffn_dim=8,
                     norm_eps=1e-6, rope_base=1e4)


def run_norm(dim: int, branch: bool, post: bool, scale: float = 1.0):
    """Random inputs (x of magnitude `scale`: Gemma's stream reaches 1e5), poisoned outputs; (got, want)."""
    rng = np.random.default_rng(dim + 2 * branch + post)
    args = norm_args("gemma3" if post else "llama")
    x = (rng.standard_normal(dim) * scale).astype(np.float32)
    b = rng.standard_normal(dim).astype(np.float16) if branch else None
    w = (rng.random(dim) + 0.5).astype(np.float32)
    pw = (rng.random(dim) + 0.5).astype(np.float32) if post else None
    want_x, want_h = add_rms_norm_reference(args, torch.from_numpy(x), torch.from_numpy(w),
                                            None if b is None else torch.from_numpy(b),
                                            None if pw is None else torch.from_numpy(pw))
    x_out = cuda.to_device(np.full(dim, np.nan, np.float32))
    h = cuda.to_device(np.full(dim, np.nan, np.float16))
    AddRmsNorm(args, cuda.to_device(w), cuda.to_device(x), h, None if b is None else cuda.to_device(b),
               x_out if branch else None, None if pw is None else cuda.to_device(pw))()
    return (x_out.copy_to_host(), h.copy_to_host().astype(np.float32)), (want_x.numpy(), want_h.float().numpy())


def check(got, want, branch: bool):
    (gx, gh), (wx, wh) = got, want
    assert not np.isnan(gh).any()
    np.testing.assert_allclose(gh, wh, rtol=2e-3, atol=2e-3 * np.abs(wh).max())
    if branch:
        np.testing.assert_allclose(gx, wx, rtol=1e-5, atol=1e-5 * np.abs(wx).max())


@kernels
@pytest.mark.parametrize("dim, branch, post, scale", [
    (96, False, False, 1.0),  # plain norm (layer 0's first, the final one): 48 pairs on one warp, 2 a thread
    (160, True, False, 1.0),  # Llama / Qwen2: x + branch, then the norm
    (136, True, True, 3e4),  # Gemma: post-norm of the branch, a residual stream beyond fp16's range
])
def test_kernel_matches_reference(dim, branch, post, scale):
    got, want = run_norm(dim, branch, post, scale)
    check(got, want, branch)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dim", [4096, 640, 576])
@pytest.mark.parametrize("branch, post", [(False, False), (True, False), (True, True)])
def test_kernel_matches_reference_on_gpu(dim, branch, post):
    got, want = run_norm(dim, branch, post, 1e4 if post else 1.0)
    check(got, want, branch)


def test_too_wide_is_a_clear_error():
    with pytest.raises(ValueError, match="even width"):
        AddRmsNorm(norm_args("llama"), np.zeros(10_000, np.float32), None, None)

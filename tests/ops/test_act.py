"""act(gate) * up: the kernel against its CPU reference (SiLU and tanh-GELU), tiny widths in the
simulator, real ones (`gpu`) on the device."""

from tests.ops.cudasim import cuda, gpu, kernels  # noqa: F401 - first: the simulator

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from decdec.ops.act import ActMul, act_mul_reference  # noqa: E402
from tests.ops.test_norm import norm_args  # noqa: E402


def check_act(family: str, ffn: int):
    rng = np.random.default_rng(ffn)
    args = norm_args(family)
    gate_up = (rng.standard_normal(2 * ffn) * 3).astype(np.float16)  # +-9: both tails of the activation
    want = act_mul_reference(args, torch.from_numpy(gate_up)).float().numpy()
    out = cuda.to_device(np.full(ffn, np.nan, np.float16))
    ActMul(args, cuda.to_device(gate_up), out)()
    got = out.copy_to_host().astype(np.float32)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-3)


@kernels
@pytest.mark.parametrize("family, ffn", [("llama", 600), ("gemma3", 40)])  # 600: 300 pairs, a partial second block
def test_kernel_matches_reference(family, ffn):
    check_act(family, ffn)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("ffn", [14336, 2048, 1536])
def test_kernel_matches_reference_on_gpu(family, ffn):
    check_act(family, ffn)


def test_odd_width_is_a_clear_error():
    with pytest.raises(ValueError, match="ffn even"):
        ActMul(norm_args("llama"), np.zeros(6, np.float16), np.zeros(3, np.float16))

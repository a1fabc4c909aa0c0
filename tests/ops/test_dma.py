"""DMA: row layout on the CPU, and pinned, device-mapped host memory on a real GPU (DECDEC_GPU_TESTS=1);
the stand-alone gather and memcpy paths of bench/op_kernels.py, the gather also in the simulator."""

from tests.ops.cudasim import GPU_RUN, ON_GPU, SIMULATED, cuda, gpu, kernels  # noqa: F401 - first: the simulator

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from bench import op_kernels  # noqa: E402
from decdec.ops import dma  # noqa: E402
from decdec.errors import DeviceError  # noqa: E402



def random_table(rng, n_rows: int, out_features: int) -> np.ndarray:
    return rng.integers(0, 256, (n_rows, -(-out_features // 2)), dtype=np.uint8)


def test_stride_is_padded_to_alignment():
    assert [dma.padded_stride(b) for b in (1, 16, 17, 288, 320, 2048, 7168)] == [16, 16, 32, 288, 320, 2048, 7168]
    assert dma.padded_stride(20, 8) == 24


def test_pad_rows_keeps_rows_and_pads_with_zero_residual():
    rng = np.random.default_rng(0)
    table = random_table(rng, 5, 577)  # 289 bytes a row -> stride 304
    padded = dma.pad_rows(table)
    assert padded.shape == (5, 304) and padded.dtype == np.uint8
    assert (padded[:, :289] == table).all()
    assert (padded[:, 289:] == 0x88).all()  # both nibbles 8: residual code 0


def test_fetch_rows_reference_is_row_gather():
    rng = np.random.default_rng(1)
    table = random_table(rng, 10, 64)
    idx = [7, 0, 7, 3]
    got = op_kernels.fetch_rows_reference(table, idx)
    assert got.shape == (4, 32)
    for r, i in enumerate(idx):
        assert (got[r] == table[i]).all()


def test_pinned_allocation_failure_names_the_bytes():
    # on a machine without a driver this fails at once; on a GPU, 2**50 bytes cannot be pinned
    with pytest.raises(DeviceError, match=r"\b1125899906842624 bytes\b"):
        dma.PinnedTable(2**40, 1024)


def test_stream_handle_accepts_the_usual_stream_objects():
    class Ctypes:
        value = 1234

    class NumbaLike:
        handle = Ctypes()

    class TorchLike:
        cuda_stream = 99

    assert [op_kernels.stream_handle(s) for s in (None, 0, 5, NumbaLike(), TorchLike())] == [0, 0, 5, 1234, 99]


@kernels
@pytest.mark.parametrize("out_features, idx, as_words", [(576, [3, 0, 17, 3], False), (640, [19], True),
                                                         (100, [], False)])
def test_fetch_kernel_matches_reference(out_features, idx, as_words):
    rng = np.random.default_rng(out_features)
    table = dma.pad_rows(random_table(rng, 20, out_features))
    out = cuda.to_device(np.full((len(idx), table.shape[1]), 0xEE, np.uint8))  # poison
    table_d = cuda.to_device(table.view(np.uint32) if as_words else table)  # any dtype: rows are bytes
    op_kernels.fetch_rows_cuda(table_d, cuda.to_device(np.array(idx, np.int32)), out=out)
    assert (out.copy_to_host() == op_kernels.fetch_rows_reference(table, idx)).all()


# ---------------------------------------------------------------------------------------------------
# real GPU


@pytest.mark.gpu
@gpu
def test_pinned_table_zero_copy_and_memcpy_paths():
    rng = np.random.default_rng(2)
    table = random_table(rng, 4096, 14336)
    idx = rng.choice(4096, 64, replace=False).astype(np.int32)
    want = op_kernels.fetch_rows_reference(dma.pad_rows(table), idx)
    with dma.PinnedTable.from_array(table) as pinned:
        assert pinned.stride % dma.ROW_ALIGN == 0 and (pinned.host[:, : table.shape[1]] == table).all()
        out = cuda.to_device(np.full(want.shape, 0xEE, np.uint8))
        op_kernels.fetch_rows_cuda(pinned.device_array(), cuda.to_device(idx), out=out)
        cuda.synchronize()
        assert (out.copy_to_host() == want).all()
        pinned.host[idx[0], 0] ^= 0xFF  # zero-copy: the kernel sees the host's current bytes
        op_kernels.fetch_rows_cuda(pinned.device_array(np.uint32), cuda.to_device(idx), out=out)
        cuda.synchronize()
        assert out.copy_to_host()[0, 0] == want[0, 0] ^ 0xFF
        pinned.host[idx[0], 0] ^= 0xFF
        staged = cuda.to_device(np.full(want.shape, 0xEE, np.uint8))
        stream = cuda.stream()
        op_kernels.copy_rows_memcpy(pinned, idx, staged, stream)
        stream.synchronize()
        assert (staged.copy_to_host() == want).all()
    pinned.close()  # idempotent
    with pytest.raises(DeviceError):
        pinned.device_array()

"""ops/timing.py's CPU-checkable parts: it imports without touching Numba's CUDA module, and the n_tb
grid it measures is the block counts the correction really launches."""

from tests.ops.cudasim import cuda  # noqa: F401 - first: the simulator

import subprocess  # noqa: E402
import sys  # noqa: E402

from decdec.ops import timing  # noqa: E402
from decdec.ops.correction import plan_correction  # noqa: E402


def test_import_needs_no_gpu_and_leaves_numba_cuda_alone():
    code = "import sys, ops.timing; assert 'numba.cuda' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_supported_n_tbs_are_launched_block_counts():
    # 3072 outputs = 48 tiles of 64 rows: 32 blocks would own 1.5 tiles each, so 24 blocks of 2 launch
    assert timing.supported_n_tbs(3072, (2, 4, 8, 16, 32), 64) == [2, 4, 8, 16, 24]
    assert timing.supported_n_tbs(128, (2, 4, 8, 16, 32), 64) == [2]  # two tiles: two blocks at most
    for n_tb in timing.supported_n_tbs(640, (2, 4, 8, 16, 32), 64):
        assert plan_correction(640, n_tb, 64).blocks == n_tb  # a measured count launches as measured


def test_copies_for_rotates_past_l2():
    l2 = 50 << 20
    assert timing.copies_for(58 << 20, l2) == 3 and timing.copies_for(1 << 10, l2) == timing.MAX_COPIES
    assert timing.copies_for(1 << 30, l2) == 2
